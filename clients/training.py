"""Local training and evaluation loops shared by every backprop trainer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn
from torch.nn import functional as F

from algorithms.meta import run_perfedavg
from clients.data import ClientData
from scenarios.config import Scenario, TrainConfig

# (model, logits, y) -> loss of one mini-batch
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# A method's local objective, declared once for every way of running it:
# (params by name, logits, y, per-sample weight or None, client context) -> scalar loss.
# The sequential trainer calls it on one model (weight None: every sample of the batch counts);
# the pack (clients/packed.py) calls the very same function under ``torch.func.vmap`` over a
# stack of clients, with a 0/1 weight that masks the padding of short batches and the client
# context's tensors (e.g. FedProx's mu and received model) stacked along the client axis.
# Objectives that take hyperparameters are frozen dataclasses, so equal ones pack together.
# A plan with a ``forward`` (:data:`PlanForward`) hands the objective that forward's outputs
# instead of the logits: layer-local rules (tpSGD) see every block's output.
Objective = Callable[
    [dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]],
    torch.Tensor,
]


@dataclass
class TrainResult:
    """What a local trainer reports; ``metrics`` are extra scalars sent to the server."""

    num_examples: int
    train_loss: float
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    # What to reply instead of the full state dict (e.g. a sparse LoRA update); None = the model.
    reply_arrays: ArrayRecord | None = None


@dataclass
class TrainJob:
    """Everything a local trainer may use: model already holds the server's weights."""

    model: nn.Module
    data: ClientData
    scenario: Scenario
    config: ConfigRecord  # what the server sent with this round
    state: RecordDict  # the node's persistent Context.state
    generator: torch.Generator
    device: torch.device
    received: RecordDict | None = None  # the whole instruction content (e.g. several models)


def updates_parameters_only(trainer: Callable) -> Callable:
    """Marks a local trainer that changes nothing of its model but parameter values, in place
    (as ``torch.optim`` does; it may set ``.grad`` and train/eval mode): no new modules, hooks,
    ``requires_grad`` flags, replaced tensors or references kept after it returns. The ClientApp
    may then hand it the process's one model of the scenario, reloaded for each client, instead of
    a new one: building a small model costs ~0.2 ms, more than a quarter of its local epoch."""
    trainer.updates_parameters_only = True  # type: ignore[attr-defined]
    return trainer


def cross_entropy(model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-sample ``values``; with ``weight`` (0/1 per sample) over the weighted ones."""
    return values.mean() if weight is None else (values * weight).sum() / weight.sum()


def cross_entropy_objective(
    params: dict[str, torch.Tensor],
    logits: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    context: dict[str, Any],
) -> torch.Tensor:
    """Plain local SGD's objective: the batch's mean cross-entropy (:data:`Objective`)."""
    if weight is None:
        return F.cross_entropy(logits, y)
    return weighted_mean(F.cross_entropy(logits, y, reduction="none"), weight)


# (model, call, x) -> what the objective sees of batch x; ``call(module, input)`` runs a submodule
# of ``model`` on the parameters being trained (the module itself sequentially, a
# ``functional_call`` on the client's slice of the stack in the pack).
PlanForward = Callable[
    [nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor], torch.Tensor], Any
]


def _call_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


# (y of a batch, the client's shuffling generator) -> the labels the forward's outputs are scored
# against: drawn right after the batch (and its epoch's shuffle) from the same generator, so a
# client's stream of draws is the same one batch at a time or planned ahead by the pack.
BatchDraw = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

Rule = Literal["sgd", "adam", "perfedavg_fo"]


@dataclass
class LocalPlan:
    """What one client's local update is, declared once and run either by :func:`run_local_plan`
    (one client, the ClientApp) or by ``clients/packed.py::train_packed`` (a stack of clients).

    A trainer's plan function ``(TrainJob) -> LocalPlan`` may only choose the starting point by
    loading other weights into ``job.model`` (e.g. IFCA's lowest-loss cluster model); it never
    trains. ``rule`` names the update rule applied to ``objective``:

    - ``"sgd"``: mini-batch SGD (``torch.optim.SGD`` with ``cfg``'s lr, momentum, weight decay)
      for ``cfg.epochs`` shuffled epochs, or ``max_steps`` steps;
    - ``"adam"``: the same steps with ``torch.optim.Adam`` (``cfg``'s lr and weight decay, the
      default betas and eps; ``cfg.momentum`` is not read);
    - ``"perfedavg_fo"``: first-order Per-FedAvg over consecutive batch pairs (D, D'):
      ``θ̃ = θ − α∇f(θ;D)``, ``θ ← θ − β∇f(θ̃;D')`` with ``(α, β) = meta_steps``
      (``algorithms/meta.py::run_perfedavg``).
    """

    objective: Objective = cross_entropy_objective
    context: dict[str, Any] = field(default_factory=dict)  # client constants for the objective
    cfg: TrainConfig | None = None  # None: the scenario's [train]
    max_steps: int | None = None  # None: the virtual clock's cap (config max-local-steps), if any
    rule: Rule = "sgd"
    meta_steps: tuple[float, float] = (0.0, 0.0)  # Per-FedAvg's (alpha, beta)
    metrics: dict[str, float] = field(default_factory=dict)  # extra reply metrics
    forward: PlanForward | None = None  # None: the objective sees the model's logits
    draw: BatchDraw | None = None  # None: the objective sees the batch's labels

    def resolved(self, job: TrainJob) -> LocalPlan:
        """This plan with ``cfg`` and ``max_steps`` filled in from the scenario and the config."""
        max_steps = self.max_steps
        if max_steps is None and "max-local-steps" in job.config:
            # Partial work: the virtual clock (clients/clock.py) caps a slow device's steps at
            # what fits the round's deadline.
            max_steps = int(job.config["max-local-steps"])
        return dataclasses.replace(self, cfg=self.cfg or job.scenario.train, max_steps=max_steps)

    def pack_key(self) -> Hashable:
        """Plans with equal keys train in one pack (same objective, rule and optimizer)."""
        return (self.objective, self.forward, self.draw, self.rule, self.meta_steps, self.cfg)


PlanFn = Callable[["TrainJob"], LocalPlan]


def run_local_plan(job: TrainJob, plan: LocalPlan) -> TrainResult:
    """Run ``plan`` on ``job.model`` (one client): what every plan-declared trainer does."""
    plan = plan.resolved(job)
    params = dict(job.model.named_parameters())  # the same tensors across optimizer steps

    def loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return plan.objective(params, logits, y, None, plan.context)

    if plan.rule in ("sgd", "adam"):
        forward = plan.forward
        result = local_steps(
            job,
            loss,
            plan.cfg,
            plan.max_steps,
            None if forward is None else lambda x: forward(job.model, _call_module, x),
            plan.draw,
            plan.rule,
        )
    else:
        if plan.forward is not None or plan.draw is not None:
            raise ValueError("the perfedavg_fo rule runs objectives of the logits and labels only")
        if len(job.data.x_train) == 0:
            raise ValueError(f"client {job.data.partition_id} has no training data")
        job.model.train()
        alpha, beta = plan.meta_steps
        res = run_perfedavg(
            job.model,
            _epoch_batches(job, plan.cfg),
            alpha,
            beta,
            lambda logits, y: plan.objective(params, logits, y, None, plan.context),
        )
        result = TrainResult(len(job.data.x_train), res.mean_loss, res.num_steps)
    result.metrics.update(plan.metrics)
    return result


def plan_trainer(plan_fn: PlanFn) -> Callable[[TrainJob], TrainResult]:
    """The local trainer declared by ``plan_fn``: ``run_local_plan(job, plan_fn(job))``. The
    trainer carries ``plan_fn`` as ``local_plan``, which is how the packed engine finds it."""

    def trainer(job: TrainJob) -> TrainResult:
        return run_local_plan(job, plan_fn(job))

    trainer.local_plan = plan_fn  # type: ignore[attr-defined]
    trainer.__name__ = f"train_from_{plan_fn.__name__}"
    trainer.__doc__ = plan_fn.__doc__
    return trainer


def local_plan_of(trainer: Callable) -> PlanFn | None:
    """The plan function a trainer was declared with (:func:`plan_trainer`), or None."""
    return getattr(trainer, "local_plan", None)


def _epoch_batches(job: TrainJob, cfg: TrainConfig):
    """``cfg.epochs`` shuffled epochs of the local train split, as one stream of batches."""
    for _ in range(cfg.epochs):
        yield from batches(
            job.data.x_train, job.data.y_train, cfg.batch_size, job.generator, job.device
        )


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, generator: torch.Generator, device: torch.device
):
    """One shuffled epoch of (x, y) tensors on ``device``; the order comes from ``generator``."""
    order = torch.randperm(len(x), generator=generator).numpy()
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield torch.from_numpy(x[idx]).to(device), torch.from_numpy(y[idx]).to(device)


def local_sgd(
    job: TrainJob,
    loss_fn: BatchLoss = cross_entropy,
    cfg: TrainConfig | None = None,
    max_steps: int | None = None,
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> TrainResult:
    """Mini-batch SGD over the client's train split for ``cfg.epochs`` epochs (or ``max_steps``).
    ``loss_fn`` sees ``forward(x)`` of each batch (default: the model's logits)."""
    return local_steps(job, loss_fn, cfg, max_steps, forward)


def _optimizer(rule: str, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if rule == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def local_steps(
    job: TrainJob,
    loss_fn: BatchLoss = cross_entropy,
    cfg: TrainConfig | None = None,
    max_steps: int | None = None,
    forward: Callable[[torch.Tensor], Any] | None = None,
    draw: BatchDraw | None = None,
    rule: Literal["sgd", "adam"] = "sgd",
) -> TrainResult:
    """Mini-batch steps of ``rule`` (a :class:`LocalPlan`'s) over the client's train split for
    ``cfg.epochs`` epochs (or ``max_steps``). ``loss_fn`` sees ``forward(x)`` of each batch
    (default: the model's logits) and ``draw(y, job.generator)`` (default: the labels y)."""
    cfg = cfg or job.scenario.train
    model, data = job.model, job.data
    if max_steps is None and "max-local-steps" in job.config:
        # Partial work: the virtual clock (clients/clock.py) caps a slow device's steps at what
        # fits the round's deadline.
        max_steps = int(job.config["max-local-steps"])
    if len(data.x_train) == 0:
        raise ValueError(
            f"client {data.partition_id} has no training data; lower data.num_clients or change the partitioner"
        )
    model.train()
    opt = _optimizer(rule, model, cfg)
    total, seen, steps = 0.0, 0, 0
    for _ in range(cfg.epochs):
        for xb, yb in batches(
            data.x_train, data.y_train, cfg.batch_size, job.generator, job.device
        ):
            opt.zero_grad(set_to_none=True)
            labels = yb if draw is None else draw(yb, job.generator)
            loss = loss_fn(model, model(xb) if forward is None else forward(xb), labels)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(yb)
            seen += len(yb)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return TrainResult(len(data.x_train), total / seen, steps)
    return TrainResult(len(data.x_train), total / max(seen, 1), steps)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y); (nan, nan) for an empty set."""
    if len(x) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size]).to(device)
        yb = torch.from_numpy(y[start : start + batch_size]).to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(x), correct / len(x)
