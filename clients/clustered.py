"""Clustered-personalization client.

Warm-up rounds (config ``warmup`` = True): plain local SGD, so the updates the server clusters are
FedAvg updates from one global model. Afterwards: the cluster's model trained with the configured
meta-learning objective (Reptile by default, or first-order Per-FedAvg, or plain SGD). A client the
server has not placed yet receives every cluster model and keeps the lowest-loss one (IFCA rule).
"""

from torch.nn import functional as F

from algorithms.meta import run_perfedavg, run_reptile
from clients.cluster_pick import CLUSTER_ID_KEY, pick_cluster
from clients.perfedavg import epoch_batches
from clients.training import TrainJob, TrainResult, local_sgd

WARMUP_KEY = "warmup"


def train_clustered(job: TrainJob) -> TrainResult:
    chosen = pick_cluster(job)
    algo = job.scenario.algorithm
    if bool(job.config.get(WARMUP_KEY, False)) or algo.meta == "none":
        result = local_sgd(job)
    else:
        if len(job.data.x_train) == 0:
            raise ValueError(f"client {job.data.partition_id} has no training data")
        job.model.train()
        if algo.meta == "reptile":
            res = run_reptile(
                job.model,
                epoch_batches(job),
                algo.reptile_inner_steps,
                algo.reptile_inner_lr,
                algo.reptile_epsilon,
                F.cross_entropy,
            )
        else:
            res = run_perfedavg(
                job.model,
                epoch_batches(job),
                algo.perfedavg_alpha,
                algo.perfedavg_beta,
                F.cross_entropy,
            )
        result = TrainResult(len(job.data.x_train), res.mean_loss, res.num_steps)
    result.metrics[CLUSTER_ID_KEY] = chosen
    return result
