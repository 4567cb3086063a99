"""FedLAW client: plain local SGD (FedLAW changes only the server's aggregation)."""

from clients.training import LocalPlan, TrainJob, plan_trainer


def fedlaw_plan(job: TrainJob) -> LocalPlan:
    return LocalPlan()


train_fedlaw = plan_trainer(fedlaw_plan)
