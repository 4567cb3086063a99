"""Every local loss variant against its formula on hand-made numbers (issue #23): tpSGD's ``mse``
(its target t = ReLU(sqrt(C) B onehot(y))) and ``ce`` hidden-block losses, forward-forward's layer
loss and goodness, FedProx's proximal term. (FedLD's margin loss, both variants, is pinned in
tests/test_fedld.py.) Before, the tpSGD and forward-forward losses were only checked end to end,
where a wrong target or sign still trains to some accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.fedprox import proximal_term
from edge.forward_forward import ff_layer_loss, goodness
from edge.tpsgd import local_loss, mse_target

# B: 2 hidden units x 3 classes
PROJ = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 0.0]])
H = torch.tensor([[0.5, 1.0], [2.0, -1.0]])  # 2 samples x 2 units
Y = torch.tensor([0, 1])


def test_mse_target_is_relu_of_the_scaled_projection() -> None:
    root_c = math.sqrt(3.0)
    expected = torch.tensor([[1.0 * root_c, 0.0], [0.0, 3.0 * root_c]])  # B[:, y].T, ReLU'd
    torch.testing.assert_close(mse_target(PROJ, Y), expected)


def test_mse_loss_is_half_squared_error_summed_over_units_averaged_over_samples() -> None:
    root_c = math.sqrt(3.0)
    per_sample = [
        0.5 * ((0.5 - root_c) ** 2 + (1.0 - 0.0) ** 2),
        0.5 * ((2.0 - 0.0) ** 2 + (-1.0 - 3.0 * root_c) ** 2),
    ]
    got = float(local_loss(H, Y, PROJ, "mse"))
    assert got == pytest.approx(sum(per_sample) / 2, rel=1e-6)


def test_mse_loss_pools_conv_activations_by_spatial_mean() -> None:
    conv = H[:, :, None, None].expand(2, 2, 3, 3).clone()  # constant over space: mean = H
    conv[:, :, 0, 0] += 0.9
    conv[:, :, 0, 1] -= 0.9  # spatial mean unchanged
    assert float(local_loss(conv, Y, PROJ, "mse")) == pytest.approx(
        float(local_loss(H, Y, PROJ, "mse")), rel=1e-6
    )


def test_ce_loss_is_cross_entropy_of_the_fixed_random_readout() -> None:
    logits = H @ PROJ  # [[-0.5, 2.0, 0.25], [3.0, -7.0, 1.0]]
    expected = 0.0
    for row, label in zip(logits.tolist(), Y.tolist(), strict=True):
        expected += -row[label] + math.log(sum(math.exp(v) for v in row))
    assert float(local_loss(H, Y, PROJ, "ce")) == pytest.approx(expected / 2, rel=1e-6)


def test_forward_forward_goodness_and_layer_loss() -> None:
    assert goodness(H).tolist() == pytest.approx([(0.25 + 1.0) / 2, (4.0 + 1.0) / 2])
    g_pos, g_neg, theta = torch.tensor([3.0, 0.5]), torch.tensor([0.0, 4.0]), 2.0

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    # positives are pushed above theta, negatives below it
    expected = (
        softplus(-(3.0 - 2.0)) + softplus(0.0 - 2.0) + softplus(-(0.5 - 2.0)) + softplus(4.0 - 2.0)
    ) / 2
    assert float(ff_layer_loss(g_pos, g_neg, theta)) == pytest.approx(expected, rel=1e-6)


def test_proximal_term_value_and_gradient() -> None:
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[0.5]], requires_grad=True)]
    g = [torch.tensor([0.0, 4.0], requires_grad=True), torch.tensor([[1.5]])]
    term = proximal_term(w, g, mu=0.2)
    assert float(term) == pytest.approx(0.1 * (1.0 + 4.0 + 1.0))
    term.backward()
    torch.testing.assert_close(w[0].grad, 0.2 * torch.tensor([1.0, -2.0]))  # mu (w - w_global)
    torch.testing.assert_close(w[1].grad, 0.2 * torch.tensor([[-1.0]]))
    assert g[0].grad is None  # the global model is a constant
