"""Forward-forward (Hinton 2022): layer-local goodness training, inference by scoring every label.

Model (``model.name = "ff_mlp"``): ``FFMLP`` — Linear+ReLU layers whose first layer reads the
flattened features **concatenated** with a one-hot label (input width = features + C). We
concatenate instead of overwriting the first C inputs (Hinton's MNIST trick) because on mnist1d
(40 values) and digits (64 pixels) the first 10 inputs carry signal; concatenation loses nothing.

* Goodness of a layer: ``G(h) = mean_j h_j²``.
* Positive data: the sample with its true label embedded; negative data: the same sample with a
  uniformly drawn **wrong** label (seeded by the client's generator).
* Layer loss: ``softplus(−(G_pos − θ)) + softplus(G_neg − θ)`` (θ = ``edge.ff_threshold``).
* Between layers the activity is normalised to unit length (``h / (||h|| + ε)``), so the next layer
  cannot read the previous layer's goodness off the vector's norm.
* All layers train simultaneously, each on its own **detached** input: autograd never spans more
  than one layer (the physical-network "model-free" constraint).
* The local update is declared once (:func:`forward_forward_plan`, a ``LocalPlan``): Adam
  (``rule="adam"``) on :class:`FFObjective`, the sum of the layers' losses (the stop-gradients make
  one backward of the sum per-layer training), with the negative labels drawn per batch by
  :class:`NegativeLabels`. The ClientApp runs it on the model, the packed engine on a stack of
  clients (each with its own Adam moments and its own draws); :func:`ff_step` back-propagates the
  same layer losses one at a time, as a device would. Like every plan, it stops at the virtual
  clock's step cap (partial work).
* Inference (``FFMLP.forward``): for each of the C labels embed it, run the layers, sum the goodness
  of every layer, return the (B, C) scores; the prediction is the argmax. Hinton skips the first
  layer (``skip_first_layer=True``); on our 2-layer nets that scored *below chance* for the first
  epochs (the second layer's goodness starts anti-correlated with the label: digits, 2×128, test
  accuracy 0.01→0.42 over 6 epochs vs 0.24→0.87 when every layer is scored), so all layers is the
  default. The whole procedure is in ``forward``, so the ONNX export contains it.

How FF clients combine with others: an FF client's reply is the ``ff_mlp`` state dict, so it can
only be averaged with clients training the same ``ff_mlp`` architecture. Backprop clients can take
part in such a federation: ``FFMLP.forward`` returns differentiable label scores, so the ordinary
fedavg/fedprox trainers fit the same weights with cross-entropy on those scores (the run's model is
``ff_mlp`` for every client). Mixing FF with clients of the plain ``mlp`` is not possible: the
first layer has a different input width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clients.training import LocalPlan, TrainJob, plan_trainer, weighted_mean

EPS = 1e-6


def goodness(h: torch.Tensor) -> torch.Tensor:
    """G(h) = mean_j h_j² per sample."""
    return h.pow(2).mean(1)


def ff_layer_loss(
    g_pos: torch.Tensor, g_neg: torch.Tensor, theta: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """mean over the batch of softplus(−(G_pos − θ)) + softplus(G_neg − θ); with ``weight``
    (0/1 per sample) over the weighted samples only."""
    return weighted_mean(F.softplus(-(g_pos - theta)) + F.softplus(g_neg - theta), weight)


def normalize(h: torch.Tensor) -> torch.Tensor:
    """h / (||h||₂ + ε): hides the previous layer's goodness from the next layer."""
    return h / (h.norm(dim=1, keepdim=True) + EPS)


class FFMLP(nn.Module):
    """Forward-forward MLP; ``forward(x)`` returns (B, C) goodness scores for every label."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: list[int],
        skip_first_layer: bool = False,
    ) -> None:
        super().__init__()
        self.skip_first_layer = skip_first_layer
        if not hidden:
            raise ValueError("model.name='ff_mlp' needs at least one hidden layer (model.hidden)")
        self.num_classes = num_classes
        self.num_features = math.prod(input_shape)
        widths = [self.num_features + num_classes, *hidden]
        self.layers = nn.ModuleList(
            nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.register_buffer("label_codes", torch.eye(num_classes), persistent=False)

    def embed(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Flattened features with the one-hot of ``labels`` appended (rows of ``label_codes``:
        ``F.one_hot`` reads the labels' values, which ``torch.func.vmap`` cannot)."""
        return torch.cat([x.flatten(1), self.label_codes[labels].to(x.dtype)], dim=1)

    def layer_outputs(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Activity of every layer for embedded inputs ``z`` (normalised between layers)."""
        outs, a = [], z
        for index, layer in enumerate(self.layers):
            h = F.relu(layer(a if index == 0 else normalize(a)))
            outs.append(h)
            a = h
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        flat = x.reshape(batch, self.num_features)
        c = self.num_classes
        # every (sample, label) pair: (B, C, F) ++ (B, C, C) -> (B*C, F+C)
        feats = flat.unsqueeze(1).expand(batch, c, self.num_features)
        codes = self.label_codes.unsqueeze(0).expand(batch, c, c)
        z = torch.cat([feats, codes], dim=2).reshape(batch * c, self.num_features + c)
        outs = self.layer_outputs(z)
        scored = outs[1:] if self.skip_first_layer and len(outs) > 1 else outs
        total = torch.stack([goodness(h) for h in scored]).sum(0)
        return total.reshape(batch, c)


def wrong_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly drawn label different from ``y`` for every sample."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator).to(y.device)
    return (y + shift) % num_classes


@dataclass(frozen=True)
class NegativeLabels:
    """FF's per-batch draw (a ``BatchDraw``): (B, 2) labels, the true one and a wrong one
    (:func:`wrong_labels`) per sample, drawn from the client's shuffling generator."""

    num_classes: int

    def __call__(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.stack([y, wrong_labels(y, self.num_classes, generator)], dim=1)


def layer_losses(
    model: FFMLP,
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None,
    x: torch.Tensor,
    labels: torch.Tensor,
    theta: float,
    weight: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Every layer's FF loss (:func:`ff_layer_loss`) for batch ``x`` with ``labels[:, 0]``
    (positive) and ``labels[:, 1]`` (negative) embedded, in layer order. Each layer reads the
    *detached* activity of the layer before (normalised), so no loss reaches an earlier layer; the
    losses are computed lazily, so a caller may back-propagate (and free) one before the next
    layer runs. ``call(layer, input)`` runs a layer on other parameters (the pack)."""
    a_pos, a_neg = model.embed(x, labels[:, 0]), model.embed(x, labels[:, 1])
    for index, layer in enumerate(model.layers):
        in_pos, in_neg = a_pos.detach(), a_neg.detach()
        if index > 0:
            in_pos, in_neg = normalize(in_pos), normalize(in_neg)
        if call is None:
            h_pos, h_neg = F.relu(layer(in_pos)), F.relu(layer(in_neg))
        else:
            h_pos, h_neg = F.relu(call(layer, in_pos)), F.relu(call(layer, in_neg))
        yield ff_layer_loss(goodness(h_pos), goodness(h_neg), theta, weight)
        a_pos, a_neg = h_pos.detach(), h_neg.detach()


@dataclass
class FFBatch:
    """What FF's objective sees of a batch: the model, the parameters to run it on and the batch,
    scored once the labels are known (:func:`layer_losses`)."""

    model: FFMLP
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    x: torch.Tensor

    def layer_losses(
        self, labels: torch.Tensor, theta: float, weight: torch.Tensor | None
    ) -> Iterator[torch.Tensor]:
        return layer_losses(self.model, self.call, self.x, labels, theta, weight)


@dataclass(frozen=True)
class FFForward:
    """FF's forward (a ``PlanForward``): the batch, held until the objective embeds the labels."""

    def __call__(self, model: nn.Module, call, x: torch.Tensor) -> FFBatch:
        return FFBatch(require_ff_model(model), call, x)


@dataclass(frozen=True)
class FFObjective:
    """FF's local objective (an ``Objective`` over :class:`FFForward` and :class:`NegativeLabels`):
    the sum of every layer's loss. The stop-gradients between layers make the gradient of each
    layer's weights that of its own loss only, so one backward of the sum is per-layer training."""

    theta: float

    def __call__(
        self,
        params: dict[str, torch.Tensor],
        batch: FFBatch,
        labels: torch.Tensor,
        weight: torch.Tensor | None,
        context: dict[str, Any],
    ) -> torch.Tensor:
        return sum(batch.layer_losses(labels, self.theta, weight))


def ff_step(
    model: FFMLP, xb: torch.Tensor, yb: torch.Tensor, theta: float, generator: torch.Generator
) -> torch.Tensor:
    """Accumulate every layer's local FF gradient for one batch; return the summed layer loss.

    The update :func:`forward_forward_plan` declares, with each layer's loss back-propagated as
    soon as it is computed, so at most one layer's graph is alive at a time (what a device does;
    ``edge/memory.py`` measures it)."""
    labels = NegativeLabels(model.num_classes)(yb, generator)
    total = torch.zeros((), device=xb.device)
    for loss in layer_losses(model, None, xb, labels, theta):
        loss.backward()
        total = total + loss.detach()
    return total


def require_ff_model(model: nn.Module) -> FFMLP:
    if not isinstance(model, FFMLP):
        raise ValueError(
            "the forward_forward trainer needs model.name = 'ff_mlp' (its first layer reads the "
            f"label); this run's model is {type(model).__name__}"
        )
    return model


def forward_forward_plan(job: TrainJob) -> LocalPlan:
    """Forward-forward on the client's data (Adam, lr = ``edge.ff_lr``) for ``train.epochs`` epochs."""
    model = require_ff_model(job.model)
    edge = job.scenario.edge
    # Adam with FF's own learning rate and no weight decay (momentum is not Adam's).
    cfg = job.scenario.train.model_copy(
        update={"lr": edge.ff_lr, "momentum": 0.0, "weight_decay": 0.0}
    )
    return LocalPlan(
        FFObjective(edge.ff_threshold),
        cfg=cfg,
        rule="adam",
        forward=FFForward(),
        draw=NegativeLabels(model.num_classes),
    )


train_forward_forward = plan_trainer(forward_forward_plan)
