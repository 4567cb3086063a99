"""FedLAW's server step on toy problems: init, convergence, and the proxy-loss improvement."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from algorithms.fedlaw import FedLAWConfig, fedavg_weights, lambda_entropy, learn_aggregation


def toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels drawn from a softmax model with true weights w*: (x, y, w*)."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(3, 5, generator=g)
    x = torch.randn(n, 5, generator=g)
    y = torch.multinomial(F.softmax(x @ w_true.T, dim=1), 1, generator=g).squeeze(1)
    return x, y, w_true


def proxy_ce(model: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    model.load_state_dict(state)
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_one_client_gamma_converges_to_the_right_shrink() -> None:
    # One client whose weights are 3x the true ones (over-confident): lambda = 1 necessarily, and the
    # best shrink on the proxy set is about 1/3.
    x, y, w_true = toy_data(1000, seed=0)
    model = nn.Linear(5, 3, bias=False)
    client = {"weight": 3.0 * w_true}
    cfg = FedLAWConfig(server_lr=0.1, server_epochs=20, gamma_warn_below=0.0)
    res = learn_aggregation(model, [client], [100], x, y, cfg, torch.Generator().manual_seed(0))
    assert res.lambdas.tolist() == pytest.approx([1.0])
    assert 0.25 < res.gamma < 0.45
    # gamma found by the optimiser is close to the best gamma on a fine grid
    grid = torch.linspace(0.1, 1.0, 91)
    losses = [float(F.cross_entropy(x @ (g * client["weight"]).T, y)) for g in grid]
    best = float(grid[int(torch.tensor(losses).argmin())])
    assert res.gamma == pytest.approx(best, abs=0.05)
    assert res.proxy_loss_after < res.proxy_loss_before
    assert proxy_ce(model, res.global_state, x, y) == pytest.approx(res.proxy_loss_after, rel=1e-5)


def test_lambda_starts_at_fedavg_weights() -> None:
    x, y, w_true = toy_data(256, seed=1)
    model = nn.Linear(5, 3)
    clients = [{"weight": w_true + 0.1 * k, "bias": torch.full((3,), 0.1 * k)} for k in range(3)]
    counts = [10, 30, 60]
    # a vanishing learning rate leaves theta at its initial value
    res = learn_aggregation(model, clients, counts, x, y, FedLAWConfig(server_lr=1e-12))
    torch.testing.assert_close(res.lambdas, fedavg_weights(counts), atol=1e-6, rtol=0)
    assert res.gamma == pytest.approx(1.0, abs=1e-6)
    fedavg = {
        k: sum(c[k] * n for c, n in zip(clients, counts, strict=True)) / 100 for k in clients[0]
    }
    assert res.proxy_loss_before == pytest.approx(proxy_ce(model, fedavg, x, y), rel=1e-5)
    assert lambda_entropy(torch.full((4,), 0.25)) == pytest.approx(
        float(torch.log(torch.tensor(4.0)))
    )


@pytest.mark.parametrize("variant", ["exp", "quad", "swa"])
def test_learned_weights_beat_plain_averaging_on_proxy(variant: str) -> None:
    x, y, w_true = toy_data(1024, seed=2)
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(5, 3, bias=False)
    # client 0 is good, clients 1-2 are noisy and larger (FedAvg trusts them most)
    clients = [{"weight": w_true}] + [
        {"weight": w_true + 2.0 * torch.randn(3, 5, generator=g)} for _ in range(2)
    ]
    cfg = FedLAWConfig(variant=variant, server_lr=0.05)
    res = learn_aggregation(
        model, clients, [10, 45, 45], x, y, cfg, torch.Generator().manual_seed(0)
    )
    assert res.proxy_loss_after < res.proxy_loss_before
    assert float(res.lambdas.sum()) == pytest.approx(1.0)
    assert float(res.lambdas[0]) > 0.1  # the coherent client gains weight over its 10% FedAvg share
    assert proxy_ce(model, res.global_state, x, y) == pytest.approx(res.proxy_loss_after, rel=1e-5)


def test_ablation_flags_fix_gamma_or_lambda() -> None:
    x, y, w_true = toy_data(512, seed=4)
    model = nn.Linear(5, 3, bias=False)
    clients = [{"weight": 2 * w_true}, {"weight": 2 * w_true + 1.0}]
    lam_only = learn_aggregation(
        model, clients, [1, 3], x, y, FedLAWConfig(learn_gamma=False, server_lr=0.05)
    )
    assert lam_only.gamma == 1.0
    gamma_only = learn_aggregation(
        model, clients, [1, 3], x, y, FedLAWConfig(learn_lambda=False, server_lr=0.05)
    )
    torch.testing.assert_close(gamma_only.lambdas, fedavg_weights([1, 3]))
    assert gamma_only.gamma < 1.0


def test_gamma_collapse_warns() -> None:
    x, y, w_true = toy_data(512, seed=5)
    model = nn.Linear(5, 3, bias=False)
    with pytest.warns(RuntimeWarning, match="gamma"):
        learn_aggregation(model, [{"weight": 10 * w_true}], [1], x, y, FedLAWConfig(server_lr=0.1))
