"""Local training and evaluation loops shared by every backprop trainer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn
from torch.nn import functional as F

from clients.data import ClientData
from scenarios.config import Scenario, TrainConfig

# (model, logits, y) -> loss of one mini-batch
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


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
) -> TrainResult:
    """Mini-batch SGD over the client's train split for ``cfg.epochs`` epochs (or ``max_steps``)."""
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
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    total, seen, steps = 0.0, 0, 0
    for _ in range(cfg.epochs):
        for xb, yb in batches(
            data.x_train, data.y_train, cfg.batch_size, job.generator, job.device
        ):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, model(xb), yb)
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
