"""FedLAW client: plain local SGD (FedLAW changes only the server's aggregation)."""

from clients.trainers import register_trainer
from clients.training import TrainJob, TrainResult, local_sgd


@register_trainer("fedlaw")
def train_fedlaw(job: TrainJob) -> TrainResult:
    return local_sgd(job)
