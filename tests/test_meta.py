"""algorithms/meta.py: Reptile's server step and first-order Per-FedAvg against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from algorithms.meta import perfedavg_fo_step, reptile_meta_step, run_perfedavg


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, generator=gen), torch.randint(0, 2, (4,), generator=gen))
        for _ in range(n)
    ]


def _plain_sgd(model: nn.Module, batches, lr: float) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_reptile_meta_step_moves_epsilon_toward_the_weighted_mean_of_tasks() -> None:
    theta = {"w": np.array([0.0, 2.0], dtype=np.float32)}
    adapted = [
        {"w": np.array([2.0, 2.0], dtype=np.float32)},
        {"w": np.array([5.0, 8.0], np.float32)},
    ]
    out = reptile_meta_step(theta, adapted, [3.0, 1.0], epsilon=0.5)
    # weighted mean = (3·[2,2] + [5,8]) / 4 = [2.75, 3.5]; θ + 0.5·(mean − θ) = [1.375, 2.75]
    np.testing.assert_allclose(out["w"], [1.375, 2.75])
    assert out["w"].dtype == np.float32
    fedavg = reptile_meta_step(theta, adapted, [3.0, 1.0], epsilon=1.0)
    np.testing.assert_allclose(fedavg["w"], [2.75, 3.5])  # ε = 1 is FedAvg
    with pytest.raises(ValueError):
        reptile_meta_step(theta, [], [], 0.5)


def test_perfedavg_first_order_step_by_hand() -> None:
    (x1, y1), (x2, y2) = _batches(2)
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    # By hand: θ̃ = θ − α∇f(θ; D1); θ ← θ − β∇f(θ̃; D2).
    ref = _model()
    g1 = torch.autograd.grad(F.cross_entropy(ref(x1), y1), list(ref.parameters()))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), g1, strict=True):
            p.sub_(0.01 * g)
    g2 = torch.autograd.grad(F.cross_entropy(ref(x2), y2), list(ref.parameters()))
    perfedavg_fo_step(model, (x1, y1), (x2, y2), alpha=0.01, beta=0.5)
    for p, p0, g in zip(model.parameters(), start, g2, strict=True):
        assert torch.allclose(p, p0 - 0.5 * g, atol=1e-6)


def test_perfedavg_runner_counts_steps_and_learns() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, generator=gen)
    y = (x[:, 0] > 0).long()
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]  # 8 batches
    with torch.no_grad():
        before = float(F.cross_entropy(_model()(x), y))
    model = _model()
    res = run_perfedavg(model, data * 5, alpha=0.01, beta=0.5)
    assert res.num_steps == 20  # pairs of batches
    assert float(F.cross_entropy(model(x), y).detach()) < before
