"""Meta-learning local objectives (framework-free: a torch model and mini-batches in, model updated).

* **Reptile** (Nichol et al. 2018): from weights θ run k inner SGD steps with lr α to θ', then move
  ``θ ← θ + ε (θ' − θ)``. ε = 1 is plain SGD; smaller ε keeps θ a good *starting point* for a
  few steps of adaptation rather than the minimizer of the local loss.
* **Per-FedAvg, first-order** (Fallah et al. 2020): per step, with two independent batches D, D',
  ``θ̃ = θ − α ∇f(θ; D)`` then ``θ ← θ − β ∇f(θ̃; D')`` (the Hessian term of MAML dropped).

The hyperparameter models live here too, shared by every algorithm that offers these objectives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

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
        5, ge=1, le=1000, description="k inner SGD steps per meta step"
    )
    reptile_inner_lr: float = Field(0.05, gt=0.0, description="inner SGD learning rate")
    reptile_epsilon: float = Field(
        0.5, gt=0.0, le=1.0, description="outer step ε toward the adapted weights (1 = plain SGD)"
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


def reptile_step(
    model: nn.Module,
    batches: Iterable[Batch],
    inner_lr: float,
    epsilon: float,
    loss_fn: LossFn = F.cross_entropy,
) -> float:
    """One Reptile meta step: SGD over ``batches`` (the k inner steps) from θ to θ', then
    ``θ ← θ + ε (θ' − θ)`` in place. Returns the mean inner loss."""
    params = _params(model)
    start = [p.detach().clone() for p in params]
    losses = [_sgd_step(model, b, inner_lr, loss_fn) for b in batches]
    if not losses:
        raise ValueError("reptile_step needs at least one batch")
    with torch.no_grad():
        for p, p0 in zip(params, start, strict=True):
            p.copy_(p0 + epsilon * (p - p0))
    return sum(losses) / len(losses)


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


def run_reptile(
    model: nn.Module,
    batches: Iterable[Batch],
    inner_steps: int,
    inner_lr: float,
    epsilon: float,
    loss_fn: LossFn = F.cross_entropy,
) -> MetaResult:
    """Reptile over a stream of batches, ``inner_steps`` batches per meta step (last one shorter)."""
    losses = [
        reptile_step(model, chunk, inner_lr, epsilon, loss_fn)
        for chunk in _chunks(batches, inner_steps)
    ]
    return MetaResult(len(losses), sum(losses) / len(losses) if losses else float("nan"))


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
