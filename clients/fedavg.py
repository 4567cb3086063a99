"""FedAvg client: plain local SGD on cross-entropy."""

from clients.training import TrainJob, TrainResult, local_sgd, updates_parameters_only


@updates_parameters_only
def train_fedavg(job: TrainJob) -> TrainResult:
    return local_sgd(job)
