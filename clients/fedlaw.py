"""FedLAW client: plain local SGD (FedLAW changes only the server's aggregation)."""

from clients.training import TrainJob, TrainResult, local_sgd


def train_fedlaw(job: TrainJob) -> TrainResult:
    return local_sgd(job)
