"""FedLAW (Li, Lin, Shang, Wu, ICML 2023): learn the aggregation weights on a server proxy set.

The global model is ``w(theta) = gamma * sum_i lambda_i w_i`` over the K client models; ``lambda``
(relative weights, on the simplex) and ``gamma`` (the *shrinking factor*, gamma < 1 acts like weight
decay) are learned each round by minimising the cross-entropy of the model with weights
``w(theta)`` on the server's small proxy set, through a functional forward
(``torch.func.functional_call``): no model copy per step, gradients flow to theta only.
Buffers (e.g. BatchNorm statistics) are averaged FedAvg-style and not learned.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from algorithms.base import AlgorithmConfig


class FedLAWConfig(AlgorithmConfig):
    """FedLAW hyperparameters (defaults: the reference code's non-CIFAR-10 settings).

    Ablations: ``learn_gamma = false`` (lambda only, gamma = 1) and ``learn_lambda = false``
    (gamma only, lambda = FedAvg's weights)."""

    name: Literal["fedlaw"] = "fedlaw"
    server_factory: ClassVar[str] = "server.fedlaw:make_fedlaw"
    client_trainer: ClassVar[str] = "clients.fedlaw:train_fedlaw"
    packable: ClassVar[bool] = True
    variant: Literal["exp", "quad", "swa"] = Field(
        "exp",
        description="exp: lambda=softmax(a), gamma=exp(b); quad: lambda=a^2/sum a^2, gamma=b^2; "
        "swa: lambda for half the epochs (SWA-averaged), then gamma alone",
    )
    server_epochs: int = Field(20, ge=1, description="passes over the proxy set per round")
    server_lr: float = Field(0.005, gt=0.0, description="Adam lr (reference: 0.01 on CIFAR-10)")
    proxy_batch_size: int = Field(128, ge=1)
    lr_step_epochs: int = Field(20, ge=1, description="StepLR: halve the lr every this many epochs")
    learn_gamma: bool = Field(True, description="learn the shrinking factor (False: gamma = 1)")
    learn_lambda: bool = Field(True, description="learn lambda (False: FedAvg's sample weights)")
    gamma_warn_below: float = Field(
        0.5, ge=0.0, le=1.0, description="warn when gamma* falls below this (tiny proxy sets)"
    )
    proxy_file: str | None = Field(
        None,
        description="deployment: the operator's proxy set, an .npz with arrays x and y "
        "(default: carve data.proxy_fraction out of train)",
    )

    def needs_server_proxy(self) -> bool:
        return self.proxy_file is None


class FedLAWResult(NamedTuple):
    global_state: dict[str, torch.Tensor]
    gamma: float
    lambdas: torch.Tensor  # (K,), sums to 1
    proxy_loss_before: float  # FedAvg weights (gamma = 1)
    proxy_loss_after: float  # learned weights


def lambda_entropy(lambdas: torch.Tensor) -> float:
    """Shannon entropy (nats) of lambda; log K means uniform weights, 0 means one client counts."""
    p = lambdas.clamp_min(0)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def fedavg_weights(num_examples: Sequence[float]) -> torch.Tensor:
    n = torch.as_tensor([float(v) for v in num_examples], dtype=torch.float64)
    if (n < 0).any() or float(n.sum()) <= 0:
        raise ValueError(f"num_examples must be non-negative with a positive sum, got {list(n)}")
    return n / n.sum()


def learn_aggregation(
    model: nn.Module,
    client_states: Sequence[dict[str, torch.Tensor]],
    num_examples: Sequence[float],
    proxy_x: torch.Tensor,
    proxy_y: torch.Tensor,
    cfg: FedLAWConfig,
    generator: torch.Generator | None = None,
) -> FedLAWResult:
    """Learn (gamma, lambda) on the proxy set; return ``w = gamma * sum_i lambda_i w_i`` and the rest.

    exp: theta = (a, b), lambda = softmax(a), gamma = exp(b), init a_i = log(n_i / sum n), b = 0.
    quad: lambda = a^2 / sum a^2, gamma = b^2, init a_i = sqrt(1/K), b = 1 (as the reference).
    swa: exp parameterization; a alone for ceil(E/2) epochs with lambda SWA-averaged per epoch, then b
    alone with lambda fixed at its average. Adam(lr, betas=(0.5, 0.999)), StepLR(lr_step_epochs, 0.5),
    ``server_epochs`` shuffled passes over the proxy set in batches of ``proxy_batch_size``.
    """
    num_clients = len(client_states)
    if num_clients == 0:
        raise ValueError("learn_aggregation needs at least one client model")
    if len(num_examples) != num_clients:
        raise ValueError(f"{len(num_examples)} sample counts for {num_clients} client models")
    if len(proxy_x) == 0:
        raise ValueError("the proxy set is empty; FedLAW needs labelled proxy data on the server")
    device = proxy_x.device
    param_names = [n for n, _ in model.named_parameters()]
    buffer_names = [n for n, _ in model.named_buffers() if n in client_states[0]]
    stacked = {
        n: torch.stack([cs[n].to(device, torch.float32) for cs in client_states]).reshape(
            num_clients, -1
        )
        for n in param_names
    }
    shapes = {n: client_states[0][n].shape for n in param_names}
    buffers = {n: _mean_buffer([cs[n] for cs in client_states]).to(device) for n in buffer_names}
    base_weights = fedavg_weights(num_examples).to(device, torch.float32)

    def combine(lam: torch.Tensor, gamma: torch.Tensor) -> dict[str, torch.Tensor]:
        weights = gamma * lam
        return {n: (weights @ stacked[n]).reshape(shapes[n]) for n in param_names}

    def proxy_loss(lam: torch.Tensor, gamma: torch.Tensor) -> float:
        model.eval()
        with torch.no_grad():
            params = {**combine(lam, gamma), **buffers}
            total = 0.0
            for start in range(0, len(proxy_x), 1024):
                logits = functional_call(model, params, (proxy_x[start : start + 1024],))
                total += float(
                    F.cross_entropy(logits, proxy_y[start : start + 1024], reduction="sum")
                )
            return total / len(proxy_x)

    one = torch.ones((), device=device)
    loss_before = proxy_loss(base_weights, one)

    if cfg.variant == "quad":
        a = torch.full((num_clients,), math.sqrt(1.0 / num_clients), device=device)
        b = torch.ones((), device=device)

        def to_lambda(a: torch.Tensor) -> torch.Tensor:
            return a.pow(2) / a.pow(2).sum()

        def to_gamma(b: torch.Tensor) -> torch.Tensor:
            return b.pow(2)
    else:
        a = base_weights.clamp_min(1e-12).log()
        b = torch.zeros((), device=device)

        def to_lambda(a: torch.Tensor) -> torch.Tensor:
            return torch.softmax(a, dim=0)

        def to_gamma(b: torch.Tensor) -> torch.Tensor:
            return b.exp()

    fixed_lambda = base_weights if cfg.variant != "quad" else to_lambda(a)
    a.requires_grad_(cfg.learn_lambda)
    b.requires_grad_(cfg.learn_gamma)

    def run_phase(params: list[torch.Tensor], epochs: int, lam_fn, gamma_fn, swa: bool):
        """Optimise ``params`` for ``epochs``; return the SWA mean of lambda when ``swa``."""
        lam_sum, lam_count = None, 0
        if not params or epochs == 0:
            return None
        opt = torch.optim.Adam(params, lr=cfg.server_lr, betas=(0.5, 0.999))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs, gamma=0.5)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(proxy_x), generator=generator).to(device)
            for start in range(0, len(proxy_x), cfg.proxy_batch_size):
                idx = order[start : start + cfg.proxy_batch_size]
                params_now = {**combine(lam_fn(), gamma_fn()), **buffers}
                loss = F.cross_entropy(
                    functional_call(model, params_now, (proxy_x[idx],)), proxy_y[idx]
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            if swa:
                lam = lam_fn().detach()
                lam_sum = lam if lam_sum is None else lam_sum + lam
                lam_count += 1
        return None if lam_sum is None else lam_sum / lam_count

    def current_lambda() -> torch.Tensor:
        return to_lambda(a) if cfg.learn_lambda else fixed_lambda

    def current_gamma() -> torch.Tensor:
        return to_gamma(b) if cfg.learn_gamma else one

    if cfg.variant == "swa":
        lambda_epochs = (cfg.server_epochs + 1) // 2 if cfg.learn_lambda else 0
        swa_lambda = run_phase(
            [a] if cfg.learn_lambda else [], lambda_epochs, current_lambda, lambda: one, swa=True
        )
        final_lambda = swa_lambda if swa_lambda is not None else fixed_lambda
        run_phase(
            [b] if cfg.learn_gamma else [],
            cfg.server_epochs - lambda_epochs,
            lambda: final_lambda,
            current_gamma,
            swa=False,
        )
        lam_star, gamma_star = final_lambda, current_gamma().detach()
    else:
        learned = [p for p, flag in ((a, cfg.learn_lambda), (b, cfg.learn_gamma)) if flag]
        run_phase(learned, cfg.server_epochs, current_lambda, current_gamma, swa=False)
        lam_star, gamma_star = current_lambda().detach(), current_gamma().detach()

    loss_after = proxy_loss(lam_star, gamma_star)
    gamma_value = float(gamma_star)
    if gamma_value < cfg.gamma_warn_below:
        warnings.warn(
            f"FedLAW shrinking factor gamma*={gamma_value:.3f} < {cfg.gamma_warn_below}: the global "
            "model is being shrunk hard, usually a sign of a too small proxy set (raise "
            "data.proxy_fraction) or too many server_epochs",
            RuntimeWarning,
            stacklevel=2,
        )
    with torch.no_grad():
        new_params = combine(lam_star, gamma_star)
    global_state = {}
    for name, value in client_states[0].items():
        if name in new_params:
            global_state[name] = new_params[name].to(value.device, value.dtype)
        elif name in buffers:
            global_state[name] = buffers[name].to(value.device)
        else:  # state entries that are neither parameters nor registered buffers
            global_state[name] = _mean_buffer([cs[name] for cs in client_states])
    return FedLAWResult(global_state, gamma_value, lam_star.cpu().double(), loss_before, loss_after)


def _mean_buffer(values: Sequence[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(list(values))
    if stacked.is_floating_point():
        return stacked.mean(0)
    return stacked.double().mean(0).round().to(stacked.dtype)
