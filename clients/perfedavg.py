"""Per-FedAvg (first-order) client: ``train.epochs`` epochs of Per-FedAvg-FO steps over batch pairs."""

from torch.nn import functional as F

from algorithms.meta import run_perfedavg
from clients.training import TrainJob, TrainResult, batches


def epoch_batches(job: TrainJob):
    """``train.epochs`` shuffled epochs of the local train split, as one stream of batches."""
    for _ in range(job.scenario.train.epochs):
        yield from batches(
            job.data.x_train,
            job.data.y_train,
            job.scenario.train.batch_size,
            job.generator,
            job.device,
        )


def train_perfedavg(job: TrainJob) -> TrainResult:
    if len(job.data.x_train) == 0:
        raise ValueError(f"client {job.data.partition_id} has no training data")
    algo = job.scenario.algorithm
    job.model.train()
    res = run_perfedavg(
        job.model, epoch_batches(job), algo.perfedavg_alpha, algo.perfedavg_beta, F.cross_entropy
    )
    return TrainResult(len(job.data.x_train), res.mean_loss, res.num_steps)
