"""FedAvg client: plain local SGD on cross-entropy."""

from clients.training import LocalPlan, TrainJob, plan_trainer, updates_parameters_only


def fedavg_plan(job: TrainJob) -> LocalPlan:
    return LocalPlan()


train_fedavg = updates_parameters_only(plan_trainer(fedavg_plan))
