"""IFCA client: pick the lowest-loss cluster model, train it with local SGD, report the choice."""

from clients.cluster_pick import CLUSTER_ID_KEY, pick_cluster
from clients.training import TrainJob, TrainResult, local_sgd


def train_ifca(job: TrainJob) -> TrainResult:
    chosen = pick_cluster(job)
    result = local_sgd(job)
    result.metrics[CLUSTER_ID_KEY] = chosen
    return result
