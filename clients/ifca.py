"""IFCA client: pick the lowest-loss cluster model, train it with local SGD, report the choice."""

from clients.cluster_pick import CLUSTER_ID_KEY, pick_cluster
from clients.training import LocalPlan, TrainJob, plan_trainer


def ifca_plan(job: TrainJob) -> LocalPlan:
    return LocalPlan(metrics={CLUSTER_ID_KEY: pick_cluster(job)})


train_ifca = plan_trainer(ifca_plan)
