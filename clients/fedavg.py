"""FedAvg client: plain local SGD on cross-entropy."""

from clients.trainers import register_trainer
from clients.training import TrainJob, TrainResult, local_sgd


@register_trainer("fedavg")
def train_fedavg(job: TrainJob) -> TrainResult:
    return local_sgd(job)
