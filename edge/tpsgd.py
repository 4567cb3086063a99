"""tpSGD — target-projection SGD: backprop-free, layer-wise training with random label projections.

How it works (DRTP generalised, after "Learning with Local Gradients at the Edge"):

* The model is split into *blocks*: each parametrised layer (``Linear`` / ``Conv1d`` / ``Conv2d``)
  together with the parameter-free modules after it (ReLU, pooling). Before a ``Linear`` block the
  input is flattened; before a conv block a missing channel axis is added — exactly what the zoo
  models' ``forward`` does, so ``compose(blocks)(x) == model(x)``.
* Hidden block l sees its input **detached** (no gradient reaches earlier layers) and is trained
  against a local target built from the label: ``t_l = B_l · onehot(y)`` where ``B_l`` (width_l × C)
  is drawn once from the scenario seed. ``B_l`` is part of the model *definition*: every client
  derives the same matrices, nothing is communicated.
  - ``loss="mse"``: ``ℓ_l = ½||pool(h_l) − t_l||²`` with ``t_l = ReLU(√C · B_l · onehot(y))`` (the
    target passed through the layer's non-linearity and scaled to unit variance; the raw
    ``B_l · y`` target, half negative and ~0.3 in size, collapsed ReLU activations to ~0.03)
  - ``loss="ce"`` (default): cross-entropy of a fixed random readout, ``ℓ_l = CE(pool(h_l) · B_l, y)``
    (the same ``B_l`` used as a width_l × C readout; gradients flow only into block l).
* **Conv layers**: the target lives in the *channel* dimension (width_l = out_channels) and the
  activation is global-average-pooled over its spatial axes before the loss (``pool`` above), i.e.
  "pool the activation" rather than "broadcast the target". For Linear blocks ``pool`` is identity.
* The output block is trained on the task loss (cross-entropy) on the detached last hidden activation.
* The local update is declared once (``tpsgd_plan``): every block's output computed from the
  detached output of the block before (:class:`BlockOutputs`), and the objective
  :class:`TpsgdObjective` = sum of the hidden blocks' local losses + the output block's task loss.
  The stop-gradients make the gradient of each block's weights that of its own local loss only, so
  one backward of the sum and one SGD over all parameters is exactly per-block training; the
  ClientApp runs it on the model, the packed engine on a stack of clients.
* On a device, each block's local loss can be back-propagated immediately and the block stepped
  right away (:func:`tpsgd_step`, one SGD per block: the same update), so at most one block's
  activations, graph and gradients are alive at any time — the memory the virtual clock charges
  (``edge/memory.py``) and ``benchmarks/edge_memory.py`` measures.

How a tpSGD client combines with others: it trains the *same* zoo model (same architecture, same
state-dict keys) as backprop clients, only the way the gradient of each weight is obtained differs.
Its reply is a full state dict, so any strategy (FedAvg, FedProx, ...) averages it with backprop
clients' replies unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clients.seeding import derive_seed
from clients.training import (
    LocalPlan,
    TrainJob,
    cross_entropy_objective,
    plan_trainer,
    weighted_mean,
)

TPSGD_SEED_TAG = 0x7059  # separates the projection matrices' seed stream from everything else
PARAM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class Block:
    """One trainable layer and the parameter-free modules that follow it."""

    layer: nn.Module
    post: list[nn.Module]

    @property
    def width(self) -> int:
        return (
            self.layer.out_features
            if isinstance(self.layer, nn.Linear)
            else self.layer.out_channels
        )

    def __call__(
        self,
        x: torch.Tensor,
        call: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The block's output; ``call(layer, input)`` runs the layer on other parameters (the pack)."""
        if isinstance(self.layer, nn.Linear):
            x = x.flatten(1)
        elif (
            isinstance(self.layer, nn.Conv1d)
            and x.dim() == 2
            or isinstance(self.layer, nn.Conv2d)
            and x.dim() == 3
        ):
            x = x.unsqueeze(1)
        x = self.layer(x) if call is None else call(self.layer, x)
        for module in self.post:
            x = module(x)
        return x


def _leaf_modules(module: nn.Module) -> list[nn.Module]:
    children = list(module.children())
    if not children:
        return [module]
    return [leaf for child in children for leaf in _leaf_modules(child)]


def split_blocks(model: nn.Module) -> list[Block]:
    """The model's blocks in forward order (works for every feed-forward zoo model)."""
    blocks: list[Block] = []
    for leaf in _leaf_modules(model):
        if isinstance(leaf, PARAM_LAYERS):
            blocks.append(Block(leaf, []))
        elif any(True for _ in leaf.parameters()):
            raise ValueError(
                f"tpSGD cannot train layer {type(leaf).__name__}; it supports Linear/Conv1d/Conv2d "
                "models (model.name = mlp, cnn1d, cnn2d, softmax)"
            )
        elif blocks:
            blocks[-1].post.append(leaf)
        else:
            raise ValueError(f"model starts with a parameter-free {type(leaf).__name__}")
    return blocks


def projection_matrices(blocks: list[Block], num_classes: int, seed: int) -> list[torch.Tensor]:
    """Fixed B_l (width_l × C) for every hidden block, N(0, 1)/sqrt(C), from the scenario seed."""
    return list(_projections(tuple(b.width for b in blocks[:-1]), num_classes, seed))


def _pool(h: torch.Tensor) -> torch.Tensor:
    """Conv activations (B, C, *spatial) -> (B, C) by spatial mean; linear ones unchanged."""
    return h.flatten(2).mean(2) if h.dim() > 2 else h


def mse_target(proj: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """t = f(√C · B·onehot(y)) with f = ReLU: the projection passed through the layer's
    non-linearity (a ReLU layer cannot reach negative targets, so raw B·y drives half its units to
    zero) and scaled to unit variance per entry (B is N(0, 1/C)), the scale of ReLU activations."""
    return F.relu(proj[:, y].T * proj.shape[1] ** 0.5)


def local_loss(
    h: torch.Tensor,
    y: torch.Tensor,
    proj: torch.Tensor,
    kind: str,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden-block loss: ``mse`` = ½‖pool(h) − t‖² per sample (summed over units, averaged over
    the batch) with t = :func:`mse_target`; ``ce`` = CE of the fixed random readout pool(h)·B.
    ``weight`` (0/1 per sample) averages over the weighted samples only."""
    pooled = _pool(h)
    if kind == "mse":
        target = mse_target(proj, y)
        return weighted_mean(0.5 * (pooled - target).pow(2).sum(1), weight)
    if weight is None:
        return F.cross_entropy(pooled @ proj, y)
    return weighted_mean(F.cross_entropy(pooled @ proj, y, reduction="none"), weight)


@dataclass(frozen=True)
class BlockOutputs:
    """tpSGD's forward (a ``PlanForward``): every block's output, each block fed the *detached*
    output of the block before, so no loss reaches the layers before its own."""

    def __call__(self, model: nn.Module, call, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, a = [], x
        for block in split_blocks(model):
            a = block(a.detach(), call)
            outputs.append(a)
        return outputs


@lru_cache(maxsize=32)
def _projections(widths: tuple[int, ...], num_classes: int, seed: int) -> list[torch.Tensor]:
    """:func:`projection_matrices` from the hidden blocks' widths (shared: never modify them)."""
    out = []
    for index, width in enumerate(widths):
        gen = torch.Generator().manual_seed(derive_seed(seed, TPSGD_SEED_TAG, index))
        out.append(torch.randn(width, num_classes, generator=gen) / num_classes**0.5)
    return out


@dataclass(frozen=True)
class TpsgdObjective:
    """tpSGD's local objective (an ``Objective`` over :class:`BlockOutputs`): the hidden blocks'
    local losses plus the output block's cross-entropy. Its value is the task loss alone (what the
    client reports); its gradient that of the whole sum."""

    kind: str
    seed: int

    def __call__(
        self,
        params: dict[str, torch.Tensor],
        outputs: list[torch.Tensor],
        y: torch.Tensor,
        weight: torch.Tensor | None,
        context: dict[str, Any],
    ) -> torch.Tensor:
        logits = outputs[-1]
        widths = tuple(int(h.shape[1]) for h in outputs[:-1])
        projections = _projections(widths, int(logits.shape[1]), self.seed)
        local = sum(
            local_loss(h, y, proj.to(h.device), self.kind, weight)
            for h, proj in zip(outputs[:-1], projections, strict=True)
        )
        task = cross_entropy_objective(params, logits, y, weight, context)
        if len(outputs) == 1:  # a single-layer model: no hidden block
            return task
        return task + (local - local.detach())  # value: the task loss; gradient: every term


def tpsgd_step(
    blocks: list[Block],
    projections: list[torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor,
    kind: str,
    optimizers: list[torch.optim.Optimizer] | None = None,
) -> torch.Tensor:
    """One batch of tpSGD; return the output block's task loss.

    With ``optimizers`` (one per block) each block is stepped and its gradients freed right after
    its own backward, so only one block's gradients exist at a time. This is the same update as
    stepping all blocks at the end: block l+1's input was computed before block l was stepped.
    Without, gradients are only accumulated (the caller steps).
    """
    a = xb
    for index, (block, proj) in enumerate(zip(blocks[:-1], projections, strict=True)):
        h = block(a.detach())
        local_loss(h, yb, proj.to(h.device), kind).backward()
        a = h.detach()  # the graph of this block is freed here
        if optimizers is not None:
            optimizers[index].step()
            optimizers[index].zero_grad(set_to_none=True)
    logits = blocks[-1](a)
    loss = F.cross_entropy(logits, yb)
    loss.backward()
    if optimizers is not None:
        optimizers[-1].step()
        optimizers[-1].zero_grad(set_to_none=True)
    return loss.detach()


def block_optimizers(
    blocks: list[Block], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> list[torch.optim.Optimizer]:
    """One SGD per block (the same hyperparameters as the backprop trainer)."""
    return [
        torch.optim.SGD(b.layer.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        for b in blocks
    ]


def tpsgd_plan(job: TrainJob) -> LocalPlan:
    """tpSGD on the client's data for ``train.epochs`` epochs (SGD, same lr/momentum as backprop)."""
    split_blocks(job.model)  # a model tpSGD cannot train fails here, with the reason
    return LocalPlan(
        TpsgdObjective(job.scenario.edge.tpsgd_loss, job.scenario.seed), forward=BlockOutputs()
    )


train_tpsgd = plan_trainer(tpsgd_plan)
