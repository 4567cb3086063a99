"""Packed local training: many clients' local updates in one set of tensor ops (``torch.func``).

The clients of one round whose local plans agree (``clients/training.py::LocalPlan.pack_key``:
same objective, update rule and optimizer settings) are trained *together*: their parameters are
stacked along a leading client axis, and one ``vmap(grad(objective))`` over
``torch.func.functional_call`` computes every client's mini-batch gradient at once. The objective
is the method's own declaration, the very function its sequential trainer calls; each client
brings its own starting model (e.g. the cluster model it was sent or picked), its own objective
context (e.g. FedProx's mu and received model, stacked), its own data, its own shuffling (the
generator ``clients/app.py::train`` would give it), its own step count and its own SGD momentum
buffers, so the result is the sequential trainer's up to float summation order:

- ragged data: client i runs ``epochs * ceil(n_i / B)`` steps (or its cap); clients are sorted by
  step count so step s trains only the first k_s clients (the ones with steps left) — no wasted
  compute, no masking of parameters; the short last batch of an epoch is padded and given weight
  0 in the objective;
- rule ``"sgd"`` is ``torch.optim.SGD``'s update written out: d = g + wd * w; buf = d (first
  step) or momentum * buf + d; w -= lr * buf;
- rule ``"perfedavg_fo"`` (``algorithms/meta.py::perfedavg_fo_step``) over consecutive batch
  pairs: w~ = w - alpha * g(w; D), w -= beta * g(w~; D') (an unpaired last batch is both D and D').

Which clients can be packed is decided by the engine (``fedge/engines/packed.py``); this module only trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap
from torch.utils._pytree import tree_map

from clients.data import ClientData
from clients.training import LocalPlan
from scenarios.config import TrainConfig


@dataclass
class PackedClient:
    """One client's share of a pack: its data, the model it starts from, its shuffling generator
    and the context its objective reads (``LocalPlan.context``)."""

    data: ClientData
    state: dict[str, torch.Tensor]  # the starting model (read-only; stacked copies are trained)
    generator: torch.Generator
    context: dict[str, Any] = field(default_factory=dict)
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
    if max_steps is not None:  # the epochs a capped run starts (it draws no later shuffle)
        epochs = min(epochs, math.ceil(max(max_steps, 1) / per_epoch))
    plan = np.full((epochs, per_epoch * batch_size), -1, dtype=np.int64)
    for epoch in range(epochs):
        plan[epoch, :n] = torch.randperm(n, generator=generator).numpy()
    plan = plan.reshape(epochs * per_epoch, batch_size)
    # local_sgd checks its cap after a step: a cap of 0 still trains one step
    return plan if max_steps is None else plan[: max(max_steps, 1)]


def _context_tensors(context: dict[str, Any]) -> list[torch.Tensor]:
    out = []
    for value in context.values():
        if isinstance(value, dict):
            out.extend(v for v in value.values() if isinstance(v, torch.Tensor))
        elif isinstance(value, torch.Tensor):
            out.append(value)
    return out


def pack_bytes(model: nn.Module, clients: list[PackedClient], cfg: TrainConfig) -> int:
    """Bytes the stacked state of ``clients`` takes: parameters, gradients, momentum buffers and
    the objective's context tensors (e.g. FedProx's received model)."""
    per_client = sum(p.numel() * p.element_size() for p in model.parameters())
    copies = 2 + (1 if cfg.momentum else 0)
    context = sum(
        t.numel() * t.element_size() for c in clients for t in _context_tensors(c.context)
    )
    return per_client * copies * len(clients) + context


def _stack_contexts(contexts: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The clients' objective contexts as one context whose leaves have a leading client axis."""

    def stack(values: list[Any]) -> torch.Tensor:
        if isinstance(values[0], torch.Tensor):
            return torch.stack(values).to(device)
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)

    out: dict[str, Any] = {}
    for key, value in contexts[0].items():
        if isinstance(value, dict):
            out[key] = {k: stack([c[key][k] for c in contexts]) for k in value}
        else:
            out[key] = stack([c[key] for c in contexts])
    return out


def train_packed(
    model: nn.Module, clients: list[PackedClient], plan: LocalPlan, device: torch.device
) -> list[PackedResult]:
    """Train every client of ``clients`` by ``plan`` (objective, rule and ``cfg``, shared by the
    pack; ``plan.cfg`` must be set) from its own starting state; results in the input order."""
    if any(len(c.data.x_train) == 0 for c in clients):
        raise ValueError("a packed client has no training data (train it sequentially)")
    cfg = plan.cfg
    if cfg is None:
        raise ValueError("train_packed needs a resolved plan (LocalPlan.resolved sets cfg)")
    batch = cfg.batch_size
    meta = plan.rule == "perfedavg_fo"
    plans = [
        # Per-FedAvg ignores the step cap, as algorithms/meta.py::run_perfedavg does.
        _batch_plan(
            len(c.data.x_train), batch, cfg.epochs, c.generator, None if meta else c.max_steps
        )
        for c in clients
    ]
    # Longest first: at step s the clients still training are a prefix of the pack.
    order = sorted(range(len(clients)), key=lambda i: -len(plans[i]))
    batch_rows = np.array([len(plans[i]) for i in order])
    total_rows = int(batch_rows[0])

    # All clients' samples in one tensor; a plan's local indices become global row numbers.
    sizes = np.array([len(clients[i].data.x_train) for i in order])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    x_all = torch.from_numpy(np.concatenate([clients[i].data.x_train for i in order])).to(device)
    y_all = torch.from_numpy(np.concatenate([clients[i].data.y_train for i in order])).to(device)
    index_np = np.full((len(order), total_rows, batch), -1, dtype=np.int64)
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
    context = _stack_contexts([clients[i].context for i in order], device)
    template = model.to(device).train()
    objective = plan.objective

    forward = plan.forward
    prefixes = {id(m): f"{name}." if name else "" for name, m in template.named_modules()}

    def client_loss(p, x, y, weight, ctx):
        if forward is None:
            return objective(p, functional_call(template, p, (x,)), y, weight, ctx)

        def call(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
            prefix = prefixes[id(module)]
            own = {k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix)}
            return functional_call(module, own, (inputs,))

        return objective(p, forward(template, call, x), y, weight, ctx)

    loss_sum = torch.zeros(len(order), dtype=torch.float64, device=device)
    seen = torch.zeros(len(order), dtype=torch.float64, device=device)
    if meta:
        num_steps = (batch_rows + 1) // 2  # batch pairs
        _perfedavg_steps(
            client_loss,
            params,
            context,
            plan.meta_steps,
            num_steps,
            x_all,
            y_all,
            index,
            valid,
            loss_sum,
            seen,
        )
    else:
        num_steps = batch_rows
        _sgd_steps(
            client_loss, params, context, cfg, num_steps, x_all, y_all, index, valid, loss_sum, seen
        )

    # Contiguous stacks: each client's reply arrays are rows of them (clients/arrays.py).
    cpu_params = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    train_loss = (loss_sum / seen.clamp(min=1)).tolist()
    results: list[PackedResult | None] = [None] * len(clients)
    for row, i in enumerate(order):
        results[i] = PackedResult(
            num_examples=int(sizes[row]),
            train_loss=train_loss[row] if seen[row] > 0 else float("nan"),
            num_steps=int(num_steps[row]),
            stack=cpu_params,
            row=row,
        )
    return results  # type: ignore[return-value]


def _prefix(tree: Any, k: int) -> Any:
    return tree_map(lambda t: t[:k], tree)


def _sgd_steps(
    client_loss, params, context, cfg, num_steps, x_all, y_all, index, valid, loss_sum, seen
) -> None:
    """Mini-batch SGD on every client at once (``torch.optim.SGD``'s update written out)."""
    names = list(params)
    step_fn = vmap(grad_and_value(client_loss))
    momentum = {k: torch.zeros_like(v) for k, v in params.items()} if cfg.momentum else None
    for s in range(int(num_steps[0])):
        k = int((num_steps > s).sum())  # the clients with a step left are a prefix
        mask = valid[:k, s]
        rows = index[:k, s]
        p_k = _prefix(params, k)
        grads, losses = step_fn(p_k, x_all[rows], y_all[rows], mask, _prefix(context, k))
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


def _perfedavg_steps(
    client_loss, params, context, meta_steps, num_pairs, x_all, y_all, index, valid, loss_sum, seen
) -> None:
    """First-order Per-FedAvg on every client at once; ``loss_sum / seen`` ends as the mean
    post-adaptation loss over pairs (unweighted, as ``run_perfedavg`` reports it)."""
    alpha, beta = meta_steps
    names = list(params)

    def meta_step(p, x1, y1, w1, x2, y2, w2, ctx):
        inner = grad(client_loss)(p, x1, y1, w1, ctx)
        adapted = {k: p[k] - alpha * inner[k] for k in names}
        return grad_and_value(client_loss)(adapted, x2, y2, w2, ctx)

    step_fn = vmap(meta_step)
    rows_per_client = valid.shape[1]
    for s in range(int(num_pairs[0])):
        k = int((num_pairs > s).sum())
        first = 2 * s
        # An unpaired last batch is both D and D' (its client's second row is padding or absent).
        second = torch.full((k,), min(first + 1, rows_per_client - 1), device=index.device)
        has_second = valid[:k, second[0], 0] > 0 if first + 1 < rows_per_client else None
        if has_second is None:
            second[:] = first
        else:
            second = torch.where(has_second, second, torch.full_like(second, first))
        clients = torch.arange(k, device=index.device)
        rows1, w1 = index[:k, first], valid[:k, first]
        rows2, w2 = index[clients, second], valid[clients, second]
        p_k = _prefix(params, k)
        grads, losses = step_fn(
            p_k,
            x_all[rows1],
            y_all[rows1],
            w1,
            x_all[rows2],
            y_all[rows2],
            w2,
            _prefix(context, k),
        )
        loss_sum[:k] += losses.detach().to(torch.float64)
        seen[:k] += 1.0
        with torch.no_grad():
            torch._foreach_add_([p_k[n] for n in names], [grads[n] for n in names], alpha=-beta)
