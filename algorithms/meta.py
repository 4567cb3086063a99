"""Meta-learning local objectives (framework-free: a torch model and mini-batches in, model updated).

* **Reptile** (Nichol et al. 2018) across tasks, as the clustered-personalization paper's code does
  it: every member k of a cluster (a task) adapts the cluster model θ with k inner SGD steps to
  θ_k; the *server* then moves ``θ ← θ + ε (Σ n_k θ_k / Σ n_k − θ)``. ε = 1 is FedAvg; smaller ε
  keeps θ a good *starting point* for a few steps of adaptation on every member. (Reptile on one
  client over its own batches is only SGD with a scaled step: the meta step needs several tasks.)
* **Per-FedAvg, first-order** (Fallah et al. 2020): per step, with two independent batches D, D',
  ``θ̃ = θ − α ∇f(θ; D)`` then ``θ ← θ − β ∇f(θ̃; D')`` (the Hessian term of MAML dropped).

The hyperparameter models live here too, shared by every algorithm that offers these objectives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from algorithms.base import AlgorithmConfig

# (logits, y) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


class ReptileParams(AlgorithmConfig):
    """Reptile's hyperparameters."""

    reptile_inner_steps: int = Field(
        5, ge=1, le=1000, description="k inner SGD steps of each member per round (the task)"
    )
    reptile_inner_lr: float = Field(0.05, gt=0.0, description="inner SGD learning rate")
    reptile_epsilon: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="server outer step ε toward the members' mean (1 = FedAvg)",
    )


class PerFedAvgParams(AlgorithmConfig):
    """First-order Per-FedAvg's hyperparameters (defaults of the spec: α=0.01, β=0.001)."""

    perfedavg_alpha: float = Field(0.01, gt=0.0, description="inner (adaptation) step size α")
    perfedavg_beta: float = Field(0.001, gt=0.0, description="outer (meta) step size β")


@dataclass(frozen=True)
class MetaResult:
    """What a meta-training pass did: the number of outer steps and the mean inner-batch loss."""

    num_steps: int
    mean_loss: float


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _sgd_step(model: nn.Module, batch: Batch, lr: float, loss_fn: LossFn) -> float:
    x, y = batch
    params = _params(model)
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(lr * g)
    return float(loss.detach())


def reptile_meta_step(
    theta: dict[str, np.ndarray],
    adapted: list[dict[str, np.ndarray]],
    weights: list[float],
    epsilon: float,
) -> dict[str, np.ndarray]:
    """Reptile's outer step over tasks: ``θ + ε (Σ w_k θ_k / Σ w_k − θ)`` per array (float64 sum)."""
    if not adapted or len(adapted) != len(weights) or sum(weights) <= 0:
        raise ValueError("reptile_meta_step needs at least one adapted model and positive weights")
    total = float(sum(weights))
    out = {}
    for key, base in theta.items():
        mean = sum(w * m[key].astype(np.float64) for m, w in zip(adapted, weights, strict=True))
        out[key] = (base + epsilon * (mean / total - base)).astype(base.dtype)
    return out


def perfedavg_fo_step(
    model: nn.Module,
    inner_batch: Batch,
    outer_batch: Batch,
    alpha: float,
    beta: float,
    loss_fn: LossFn = F.cross_entropy,
) -> float:
    """One first-order Per-FedAvg step in place: ``θ̃ = θ − α∇f(θ;D)``, ``θ ← θ − β∇f(θ̃;D')``.

    Returns the loss at θ̃ on D' (the post-adaptation loss the step minimizes).
    """
    params = _params(model)
    start = [p.detach().clone() for p in params]
    _sgd_step(model, inner_batch, alpha, loss_fn)  # θ -> θ̃
    x, y = outer_batch
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params)  # ∇f(θ̃; D'), first-order: no Hessian
    with torch.no_grad():
        for p, p0, g in zip(params, start, grads, strict=True):
            p.copy_(p0 - beta * g)
    return float(loss.detach())


def _chunks(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    chunk: list[Batch] = []
    for b in batches:
        chunk.append(b)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_perfedavg(
    model: nn.Module,
    batches: Iterable[Batch],
    alpha: float,
    beta: float,
    loss_fn: LossFn = F.cross_entropy,
) -> MetaResult:
    """First-order Per-FedAvg over a stream of batches: consecutive pairs are (D, D').

    A trailing unpaired batch is used as both D and D'.
    """
    losses = []
    for chunk in _chunks(batches, 2):
        inner, outer = chunk[0], chunk[-1]
        losses.append(perfedavg_fo_step(model, inner, outer, alpha, beta, loss_fn))
    return MetaResult(len(losses), sum(losses) / len(losses) if losses else float("nan"))
