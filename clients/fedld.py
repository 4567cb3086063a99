"""FedLD client: local SGD on cross-entropy + the margin-control term.

lambda (``algorithm.margin_lambda``) and the batch-Frobenius / per-sample choice come from the
scenario. The authors' optimizer settings (SGD lr 0.01, momentum 0.5, weight decay 5e-4, batch 50,
5 local epochs) are the ``[train]`` values of the shipped ``scenarios/fedld_*.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from algorithms.fedld import margin_control_loss
from clients.training import LocalPlan, TrainJob, plan_trainer


@dataclass(frozen=True)
class MarginObjective:
    """FedLD's local objective (an ``Objective``): ``margin_control_loss`` with its lambda."""

    lam: float
    per_sample: bool

    def __call__(
        self,
        params: dict[str, torch.Tensor],
        logits: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor | None,
        context: dict[str, Any],
    ) -> torch.Tensor:
        return margin_control_loss(logits, y, self.lam, self.per_sample, weight)


def fedld_plan(job: TrainJob) -> LocalPlan:
    cfg = job.scenario.algorithm
    return LocalPlan(MarginObjective(float(cfg.margin_lambda), bool(cfg.per_sample)))


train_fedld = plan_trainer(fedld_plan)
