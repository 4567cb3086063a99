"""CFL client: plain local SGD on its cluster's model (a new client first picks a cluster by loss)."""

from clients.cluster_pick import CLUSTER_ID_KEY, pick_cluster
from clients.training import TrainJob, TrainResult, local_sgd


def train_cfl(job: TrainJob) -> TrainResult:
    chosen = pick_cluster(job)
    result = local_sgd(job)
    result.metrics[CLUSTER_ID_KEY] = chosen
    return result
