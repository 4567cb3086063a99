"""FedProx client: local SGD on cross-entropy + mu/2 ||w - w_global||^2.

``mu`` is read from the server's ``proximal-mu`` config (what Flower's own FedProx strategy sends),
so this trainer also works against a stock Flower server.
"""

from __future__ import annotations

from typing import Any

import torch

from algorithms.fedprox import proximal_term
from clients.training import (
    LocalPlan,
    TrainJob,
    cross_entropy_objective,
    plan_trainer,
    updates_parameters_only,
)


def proximal_objective(
    params: dict[str, torch.Tensor],
    logits: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    context: dict[str, Any],
) -> torch.Tensor:
    """CE + mu/2 ||w - w_global||^2 with ``context = {"mu", "global"}`` (the received model)."""
    ce = cross_entropy_objective(params, logits, y, weight, context)
    return ce + proximal_term(params.values(), context["global"].values(), context["mu"])


def fedprox_plan(job: TrainJob) -> LocalPlan:
    mu = float(job.config.get("proximal-mu", getattr(job.scenario.algorithm, "mu", 0.0)))
    received = {k: p.detach().clone() for k, p in job.model.named_parameters()}
    return LocalPlan(proximal_objective, {"mu": mu, "global": received})


train_fedprox = updates_parameters_only(plan_trainer(fedprox_plan))
