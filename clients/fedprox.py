"""FedProx client: local SGD on cross-entropy + mu/2 ||w - w_global||^2.

``mu`` is read from the server's ``proximal-mu`` config (what Flower's own FedProx strategy sends),
so this trainer also works against a stock Flower server.
"""

import torch
from torch import nn
from torch.nn import functional as F

from algorithms.fedprox import proximal_term
from clients.training import TrainJob, TrainResult, local_sgd, updates_parameters_only


@updates_parameters_only
def train_fedprox(job: TrainJob) -> TrainResult:
    mu = float(job.config.get("proximal-mu", getattr(job.scenario.algorithm, "mu", 0.0)))
    global_params = [p.detach().clone() for p in job.model.parameters()]

    def loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y) + proximal_term(model.parameters(), global_params, mu)

    return local_sgd(job, loss)
