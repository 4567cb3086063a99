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
- rule ``"adam"`` is ``torch.optim.Adam``'s (betas (0.9, 0.999), eps 1e-8), with every client's
  own moments: d = g + wd * w; m = lerp(m, d, 1 - b1); v = b2 * v + (1 - b2) * d²;
  w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), t the client's step count (the
  same for every client of a step: they all start together);
- a plan's per-batch draw (``LocalPlan.draw``, e.g. forward-forward's negative labels) is made
  when the batches are planned, from each client's generator right after its batch's epoch
  shuffle, in the order the sequential trainer makes it;
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
from clients.training import BatchDraw, LocalPlan
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
    """Why ``model`` cannot be trained packed (None when it can). Non-persistent buffers are
    constants of the model's definition (e.g. ``FFMLP.label_codes``): the pack reads the
    template's own."""
    state = model.state_dict()
    if any(name in state for name, _ in model.named_buffers()):
        return "the model has buffers (e.g. BatchNorm statistics), which the pack does not carry"
    if [k for k, _ in model.named_parameters()] != list(state):
        return "the model's state dict is not exactly its parameters"
    return None


def _batch_plan(
    data: ClientData,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
    max_steps: int | None,
    draw: BatchDraw | None,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """(steps, batch_size) sample indices, -1 = padding, with the same shuffles as ``batches()``;
    and with ``draw``, its (steps, batch_size, ...) draws (padding: zeros), drawn as
    ``clients/training.py::local_steps`` draws them: after each batch, before the next shuffle."""
    n = len(data.x_train)
    per_epoch = math.ceil(n / batch_size)
    # local_steps checks its cap after a step: a cap of 0 still trains one step
    steps = epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max(max_steps, 1))
    plan = np.full((math.ceil(steps / per_epoch), per_epoch * batch_size), -1, dtype=np.int64)
    draws: list[torch.Tensor] = []
    for epoch in range(len(plan)):  # the epochs a capped run starts (it draws no later shuffle)
        plan[epoch, :n] = torch.randperm(n, generator=generator).numpy()
        if draw is None:
            continue
        for start in range(0, n, batch_size):
            if len(draws) == steps:
                break
            idx = plan[epoch, start : min(start + batch_size, n)]
            draws.append(draw(torch.from_numpy(data.y_train[idx]), generator))
    plan = plan.reshape(-1, batch_size)[:steps]
    if draw is None:
        return plan, None
    drawn = torch.zeros((steps, batch_size, *draws[0].shape[1:]), dtype=draws[0].dtype)
    for step, values in enumerate(draws):
        drawn[step, : len(values)] = values
    return plan, drawn


def _context_tensors(context: dict[str, Any]) -> list[torch.Tensor]:
    out = []
    for value in context.values():
        if isinstance(value, dict):
            out.extend(v for v in value.values() if isinstance(v, torch.Tensor))
        elif isinstance(value, torch.Tensor):
            out.append(value)
    return out


def pack_bytes(model: nn.Module, clients: list[PackedClient], plan: LocalPlan) -> int:
    """Bytes the stacked state of ``clients`` takes: parameters, gradients, the optimizer's
    buffers (SGD momentum, Adam's two moments) and the objective's context tensors (e.g.
    FedProx's received model)."""
    per_client = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = plan.cfg
    if cfg is None:
        raise ValueError("pack_bytes needs a resolved plan (LocalPlan.resolved sets cfg)")
    copies = 2 + (2 if plan.rule == "adam" else 1 if cfg.momentum and plan.rule == "sgd" else 0)
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
    if meta and plan.draw is not None:
        raise ValueError("the perfedavg_fo rule runs objectives of the logits and labels only")
    plans = [
        # Per-FedAvg ignores the step cap, as algorithms/meta.py::run_perfedavg does.
        _batch_plan(
            c.data, batch, cfg.epochs, c.generator, None if meta else c.max_steps, plan.draw
        )
        for c in clients
    ]
    # Longest first: at step s the clients still training are a prefix of the pack.
    order = sorted(range(len(clients)), key=lambda i: -len(plans[i][0]))
    batch_rows = np.array([len(plans[i][0]) for i in order])
    total_rows = int(batch_rows[0])

    # All clients' samples in one tensor; a plan's local indices become global row numbers.
    sizes = np.array([len(clients[i].data.x_train) for i in order])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    x_all = torch.from_numpy(np.concatenate([clients[i].data.x_train for i in order])).to(device)
    index_np = np.full((len(order), total_rows, batch), -1, dtype=np.int64)
    for row, i in enumerate(order):
        index_np[row, : len(plans[i][0])] = plans[i][0]
    valid_np = index_np >= 0
    index = torch.from_numpy(np.where(valid_np, index_np + offsets[:, None, None], 0)).to(device)
    valid = torch.from_numpy(valid_np).to(device, torch.float32)
    # What the objective sees as labels at every (client, step, slot): the samples' own, or the
    # plan's draws (padding: zeros, weighted 0 like the padded samples).
    if plan.draw is None:
        y_all = np.concatenate([clients[i].data.y_train for i in order])
        labels = torch.from_numpy(y_all).to(device)[index]
    else:
        drawn = [plans[i][1] for i in order]
        labels = torch.zeros((len(order), total_rows, *drawn[0].shape[1:]), dtype=drawn[0].dtype)
        for row, values in enumerate(drawn):
            labels[row, : len(values)] = values
        labels = labels.to(device)

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
            labels,
            index,
            valid,
            loss_sum,
            seen,
        )
    else:
        num_steps = batch_rows
        update = _AdamUpdate(params, cfg) if plan.rule == "adam" else _SgdUpdate(params, cfg)
        _local_steps(
            client_loss,
            params,
            context,
            update,
            num_steps,
            x_all,
            labels,
            index,
            valid,
            loss_sum,
            seen,
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


class _SgdUpdate:
    """``torch.optim.SGD``'s update, on every client's tensors at once; per-client momentum."""

    def __init__(self, params: dict[str, torch.Tensor], cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.momentum = [torch.zeros_like(v) for v in params.values()] if cfg.momentum else None

    def __call__(self, step: int, k: int, weights: list[torch.Tensor], grads: list[torch.Tensor]):
        cfg = self.cfg
        if cfg.weight_decay:
            grads = torch._foreach_add(grads, weights, alpha=cfg.weight_decay)
        if self.momentum is not None:
            bufs = [buf[:k] for buf in self.momentum]
            if step == 0:
                torch._foreach_copy_(bufs, grads)
            else:
                torch._foreach_mul_(bufs, cfg.momentum)
                torch._foreach_add_(bufs, grads)
            grads = bufs
        torch._foreach_add_(weights, grads, alpha=-cfg.lr)


class _AdamUpdate:
    """``torch.optim.Adam``'s update (default betas and eps, L2 weight decay), on every client's
    tensors at once, with every client's own moments. Every client of step ``step`` is at Adam
    step ``step + 1``: the bias corrections are one number per step."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, params: dict[str, torch.Tensor], cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.exp_avg = [torch.zeros_like(v) for v in params.values()]
        self.exp_avg_sq = [torch.zeros_like(v) for v in params.values()]

    def __call__(self, step: int, k: int, weights: list[torch.Tensor], grads: list[torch.Tensor]):
        cfg, (beta1, beta2) = self.cfg, self.BETAS
        if cfg.weight_decay:
            grads = torch._foreach_add(grads, weights, alpha=cfg.weight_decay)
        exp_avg = [m[:k] for m in self.exp_avg]
        exp_avg_sq = [v[:k] for v in self.exp_avg_sq]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        t = step + 1
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, self.EPS)
        torch._foreach_addcdiv_(weights, exp_avg, denom, value=-cfg.lr / bias_correction1)


def _local_steps(
    client_loss, params, context, update, num_steps, x_all, labels, index, valid, loss_sum, seen
) -> None:
    """Mini-batch steps on every client at once: ``update`` (SGD's, Adam's) applied to the
    vmapped gradients of the clients with a step left."""
    names = list(params)
    step_fn = vmap(grad_and_value(client_loss))
    for s in range(int(num_steps[0])):
        k = int((num_steps > s).sum())  # the clients with a step left are a prefix
        mask = valid[:k, s]
        p_k = _prefix(params, k)
        grads, losses = step_fn(p_k, x_all[index[:k, s]], labels[:k, s], mask, _prefix(context, k))
        counts = mask.sum(1).to(torch.float64)
        loss_sum[:k] += losses.detach().to(torch.float64) * counts
        seen[:k] += counts
        with torch.no_grad():
            update(s, k, [p_k[name] for name in names], [grads[name] for name in names])


def _perfedavg_steps(
    client_loss, params, context, meta_steps, num_pairs, x_all, labels, index, valid, loss_sum, seen
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
        w1, w2 = valid[:k, first], valid[clients, second]
        p_k = _prefix(params, k)
        grads, losses = step_fn(
            p_k,
            x_all[index[:k, first]],
            labels[:k, first],
            w1,
            x_all[index[clients, second]],
            labels[clients, second],
            w2,
            _prefix(context, k),
        )
        loss_sum[:k] += losses.detach().to(torch.float64)
        seen[:k] += 1.0
        with torch.no_grad():
            torch._foreach_add_([p_k[n] for n in names], [grads[n] for n in names], alpha=-beta)
