"""Packed local training: many clients' SGD in one set of tensor ops (``torch.func``).

The clients of one round that share model and trainer are trained *together*: their parameters are
stacked along a leading client axis, and one ``vmap(grad(loss))`` over
``torch.func.functional_call`` computes every client's mini-batch gradient at once. Each client
keeps its own data, its own shuffling (the generator ``clients/app.py::train`` would give it), its
own step count and its own SGD momentum buffers, so the result is the sequential trainer's
(``clients/training.py::local_sgd``) up to float summation order:

- ragged data: client i runs ``epochs * ceil(n_i / B)`` steps; clients are sorted by step count so
  step s trains only the first k_s clients (the ones with steps left) — no wasted compute, no
  masking of parameters; the short last batch of an epoch is padded and masked out of the mean;
- FedAvg's loss is cross-entropy; FedProx adds ``mu/2 ||w - w_global||^2`` (each client's own mu
  and w_global), as ``clients/fedprox.py`` does;
- SGD is ``torch.optim.SGD``'s update written out: d = g + wd * w; buf = d (first step) or
  momentum * buf + d; w -= lr * buf.

Which clients can be packed is decided by the engine (``fedge/engines/packed.py``); this module only trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from clients.data import ClientData
from scenarios.config import TrainConfig


@dataclass
class PackedClient:
    """One client's share of a pack: its data, the model it received, its shuffling generator."""

    data: ClientData
    state: dict[str, torch.Tensor]  # the received model (read-only; stacked copies are trained)
    generator: torch.Generator
    mu: float = 0.0  # FedProx's proximal coefficient (0 = FedAvg)
    max_steps: int | None = None  # partial work: stop after this many steps


@dataclass
class PackedResult:
    num_examples: int
    train_loss: float
    num_steps: int
    stack: dict[str, torch.Tensor]  # the whole pack's trained parameters (CPU), a row per client
    row: int

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """This client's trained parameters: row ``row`` of every ``stack`` tensor."""
        return {k: v[self.row] for k, v in self.stack.items()}


def unpackable_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained packed (None when it can)."""
    if any(True for _ in model.buffers()):
        return "the model has buffers (e.g. BatchNorm statistics), which the pack does not carry"
    if [k for k, _ in model.named_parameters()] != list(model.state_dict()):
        return "the model's state dict is not exactly its parameters"
    return None


def _batch_plan(
    n: int, batch_size: int, epochs: int, generator: torch.Generator, max_steps: int | None
) -> np.ndarray:
    """(steps, batch_size) sample indices, -1 = padding; the same shuffles as ``batches()``."""
    per_epoch = math.ceil(n / batch_size)
    plan = np.full((epochs, per_epoch * batch_size), -1, dtype=np.int64)
    for epoch in range(epochs):
        plan[epoch, :n] = torch.randperm(n, generator=generator).numpy()
    plan = plan.reshape(epochs * per_epoch, batch_size)
    # local_sgd checks its cap after a step: a cap of 0 still trains one step
    return plan if max_steps is None else plan[: max(max_steps, 1)]


def pack_bytes(model: nn.Module, num_clients: int, cfg: TrainConfig, prox: bool) -> int:
    """Bytes the stacked state of ``num_clients`` clients takes: parameters, gradients, momentum
    buffers and (FedProx) the global copy."""
    per_client = sum(p.numel() * p.element_size() for p in model.parameters())
    copies = 2 + (1 if cfg.momentum else 0) + (1 if prox else 0)
    return per_client * copies * num_clients


def train_packed(
    model: nn.Module, clients: list[PackedClient], cfg: TrainConfig, device: torch.device
) -> list[PackedResult]:
    """Train every client of ``clients`` from its received state; results in the input order."""
    if any(len(c.data.x_train) == 0 for c in clients):
        raise ValueError("a packed client has no training data (train it sequentially)")
    batch = cfg.batch_size
    plans = [
        _batch_plan(len(c.data.x_train), batch, cfg.epochs, c.generator, c.max_steps)
        for c in clients
    ]
    # Longest first: at step s the clients still training are a prefix of the pack.
    order = sorted(range(len(clients)), key=lambda i: -len(plans[i]))
    num_steps = np.array([len(plans[i]) for i in order])
    total_steps = int(num_steps[0])
    active = [int((num_steps > s).sum()) for s in range(total_steps)]  # clients with step s

    # All clients' samples in one tensor; a plan's local indices become global row numbers.
    sizes = np.array([len(clients[i].data.x_train) for i in order])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    x_all = torch.from_numpy(np.concatenate([clients[i].data.x_train for i in order])).to(device)
    y_all = torch.from_numpy(np.concatenate([clients[i].data.y_train for i in order])).to(device)
    index_np = np.full((len(order), total_steps, batch), -1, dtype=np.int64)
    for row, i in enumerate(order):
        index_np[row, : len(plans[i])] = plans[i]
    valid_np = index_np >= 0
    index = torch.from_numpy(np.where(valid_np, index_np + offsets[:, None, None], 0)).to(device)
    valid = torch.from_numpy(valid_np).to(device, torch.float32)

    names = [k for k, _ in model.named_parameters()]
    params = {
        k: torch.stack([clients[i].state[k] for i in order]).to(device, torch.float32)
        for k in names
    }
    mus = torch.tensor([clients[i].mu for i in order], dtype=torch.float32, device=device)
    prox = bool((mus > 0).any())
    anchor = {k: v.clone() for k, v in params.items()} if prox else None
    momentum = {k: torch.zeros_like(v) for k, v in params.items()} if cfg.momentum else None
    template = model.to(device)

    def client_loss(p, x, y, mask, mu, w_global):
        logits = functional_call(template, p, (x,))
        ce = F.cross_entropy(logits, y, reduction="none")
        loss = (ce * mask).sum() / mask.sum()
        if w_global is not None:
            total = torch.zeros((), device=x.device)
            for k in names:
                total = total + (p[k] - w_global[k]).pow(2).sum()
            loss = loss + 0.5 * mu * total
        return loss

    step_fn = vmap(grad_and_value(client_loss), in_dims=(0, 0, 0, 0, 0, 0 if prox else None))

    loss_sum = torch.zeros(len(order), dtype=torch.float64, device=device)
    seen = torch.zeros(len(order), dtype=torch.float64, device=device)
    for s, k in enumerate(active):  # the clients with a step left are a prefix
        mask = valid[:k, s]
        rows = index[:k, s]
        p_k = {name: v[:k] for name, v in params.items()}
        g_k = {name: v[:k] for name, v in anchor.items()} if anchor is not None else None
        grads, losses = step_fn(p_k, x_all[rows], y_all[rows], mask, mus[:k], g_k)
        counts = mask.sum(1).to(torch.float64)
        loss_sum[:k] += losses.detach().to(torch.float64) * counts
        seen[:k] += counts
        with torch.no_grad():  # torch.optim.SGD's update, on every client's tensors at once
            weights = [p_k[name] for name in names]
            steps = [grads[name] for name in names]
            if cfg.weight_decay:
                steps = torch._foreach_add(steps, weights, alpha=cfg.weight_decay)
            if momentum is not None:
                bufs = [momentum[name][:k] for name in names]
                if s == 0:
                    torch._foreach_copy_(bufs, steps)
                else:
                    torch._foreach_mul_(bufs, cfg.momentum)
                    torch._foreach_add_(bufs, steps)
                steps = bufs
            torch._foreach_add_(weights, steps, alpha=-cfg.lr)

    cpu_params = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    train_loss = (loss_sum / seen.clamp(min=1)).tolist()
    results: list[PackedResult | None] = [None] * len(clients)
    for row, i in enumerate(order):
        results[i] = PackedResult(
            num_examples=int(sizes[row]),
            train_loss=train_loss[row],
            num_steps=int(num_steps[row]),
            stack=cpu_params,
            row=row,
        )
    return results  # type: ignore[return-value]
