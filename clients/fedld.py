"""FedLD client: local SGD on cross-entropy + the margin-control term.

lambda (``algorithm.margin_lambda``) and the batch-Frobenius / per-sample choice come from the
scenario. The authors' optimizer settings (SGD lr 0.01, momentum 0.5, weight decay 5e-4, batch 50,
5 local epochs) are the ``[train]`` values of the shipped ``scenarios/fedld_*.toml``.
"""

import torch
from torch import nn

from algorithms.fedld import margin_control_loss
from clients.training import TrainJob, TrainResult, local_sgd


def train_fedld(job: TrainJob) -> TrainResult:
    cfg = job.scenario.algorithm
    lam, per_sample = float(cfg.margin_lambda), bool(cfg.per_sample)

    def loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return margin_control_loss(logits, y, lam, per_sample)

    return local_sgd(job, loss)
