"""CFL client: plain local SGD on its cluster's model (a new client first picks a cluster by loss)."""

from clients.cluster_pick import CLUSTER_ID_KEY, pick_cluster
from clients.training import LocalPlan, TrainJob, plan_trainer


def cfl_plan(job: TrainJob) -> LocalPlan:
    return LocalPlan(metrics={CLUSTER_ID_KEY: pick_cluster(job)})


train_cfl = plan_trainer(cfl_plan)
