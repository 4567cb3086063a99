"""FedLD math on hand-made inputs: margin loss and principal-gradient aggregation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from algorithms.fedld import (
    agreement_with_mean,
    fedld_aggregate_state,
    margin_control_loss,
    num_directions,
    principal_gradient_aggregate,
)


def test_margin_loss_batch_frobenius_and_per_sample() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 1])
    p = F.softmax(logits, dim=1)
    ce = F.cross_entropy(logits, y)
    batch = margin_control_loss(logits, y, lam=0.03)
    assert float(batch) == pytest.approx(float(ce + 0.03 * math.log1p(float((p**2).sum()))))
    per_sample = margin_control_loss(logits, y, lam=0.03, per_sample=True)
    expected = ce + 0.03 * torch.log1p((p**2).sum(1)).mean()
    assert float(per_sample) == pytest.approx(float(expected))
    assert float(margin_control_loss(logits, y, lam=0.0)) == pytest.approx(float(ce))


@pytest.mark.parametrize(("num_clients", "k_prop", "k"), [(10, 0.8, 8), (2, 0.1, 1), (5, 1.0, 5)])
def test_number_of_directions(num_clients: int, k_prop: float, k: int) -> None:
    assert num_directions(num_clients, k_prop) == k


def test_k_directions_kept() -> None:
    # 5 clients along 5 orthogonal axes with distinct norms: the Gram matrix is diagonal, so the
    # principal directions are the axes. k = floor(5 * 0.6) = 3 keeps the 3 largest, nothing else.
    norms = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    updates = torch.diag(norms)
    out = principal_gradient_aggregate(updates, k_prop=0.6)
    assert torch.count_nonzero(out.abs() > 1e-9) == 3
    assert torch.all(out[3:].abs() < 1e-9)
    # Each kept axis j: only client j projects on it, with weight ||D_j|| s_j / sum s, averaged /K;
    # the sum runs over all 5 eigenvalues (reference), not only the 3 kept.
    s = norms**2 / 5
    expected = norms[:3] * s[:3] / s.sum() / 5
    torch.testing.assert_close(out[:3], expected)


def test_sign_flip_by_majority() -> None:
    # Three clients point along +e1, one along -e1: whatever sign eigh returns, the kept direction
    # must be +e1 (majority), so the aggregate points along +e1.
    updates = torch.tensor([[1.0, 0.0], [1.2, 0.0], [0.8, 0.0], [-1.0, 0.0]])
    for flip in (1.0, -1.0):
        out = principal_gradient_aggregate(updates * flip, k_prop=0.5)
        assert float(out[0]) * flip > 0
        # mean of sign * ||D_i|| = (1 + 1.2 + 0.8 - 1) / 4
        assert float(out[0]) * flip == pytest.approx(0.5)
        assert float(out[1]) == pytest.approx(0.0, abs=1e-9)


def test_identical_updates_give_that_update() -> None:
    delta = torch.tensor([0.3, -1.0, 2.0, 0.5])
    out = principal_gradient_aggregate(delta.repeat(6, 1), k_prop=0.8)
    torch.testing.assert_close(out, delta)


def test_orthogonal_and_zero_updates_no_nan() -> None:
    updates = torch.zeros(4, 6)
    updates[0, 0] = 1.0
    updates[1, 1] = 1.0  # clients 2, 3 send zero updates: orthogonal to every direction
    out = principal_gradient_aggregate(updates, k_prop=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], torch.tensor([0.125, 0.125]))
    zero = principal_gradient_aggregate(torch.zeros(3, 5))
    assert torch.equal(zero, torch.zeros(5))


def test_state_dict_first_round_mean_and_buffers() -> None:
    torch.manual_seed(0)
    base = {"w": torch.zeros(3, 4), "b": torch.zeros(1), "bn.running_mean": torch.zeros(4)}
    clients = [{k: torch.randn_like(v) for k, v in base.items()} for _ in range(5)]

    def mean(key: str) -> torch.Tensor:
        return torch.stack([c[key] for c in clients]).mean(0)

    first = fedld_aggregate_state(base, clients, first_round=True, buffer_names={"bn.running_mean"})
    for key in base:
        torch.testing.assert_close(first[key], mean(key))
    later = fedld_aggregate_state(
        base, clients, first_round=False, buffer_names={"bn.running_mean"}
    )
    torch.testing.assert_close(later["b"], mean("b"))  # single element: plain mean
    torch.testing.assert_close(later["bn.running_mean"], mean("bn.running_mean"))
    assert not torch.allclose(later["w"], mean("w"))  # weights: principal aggregation
    expected_w = principal_gradient_aggregate(
        torch.stack([c["w"].reshape(-1) for c in clients]), 0.8
    ).reshape(3, 4)
    torch.testing.assert_close(later["w"], expected_w)
    plain = fedld_aggregate_state(base, clients, principal=False)
    torch.testing.assert_close(plain["w"], mean("w"))


def test_agreement_with_mean_diagnostic() -> None:
    base = {"w": torch.zeros(3), "running_mean": torch.zeros(3)}
    clients = [{"w": torch.tensor([1.0, 0.0, 0.0]), "running_mean": torch.ones(3)}] * 2
    same = {"w": torch.tensor([2.0, 0.0, 0.0]), "running_mean": torch.ones(3)}
    cos, ratio = agreement_with_mean(base, same, clients, skip={"running_mean"})
    assert cos == pytest.approx(1.0) and ratio == pytest.approx(2.0)
    # Label skew on a 3-class bias, one client per class, each raising its own class: the mean is
    # nearly zero, (0, 0, 0.07). Each principal direction's coefficient is a norm-weighted count of
    # signs, mean_i sign(C_ij)·||Δ_i||, not the mean's projection (the majority sign flip itself
    # cannot matter: sign(C_ij)·w_j does not change when w_j flips; see test_methods_notice.py).
    updates = torch.tensor([[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.2]])
    out = principal_gradient_aggregate(updates, k_prop=1.0)
    mean = updates.mean(0)
    assert float(out @ mean) < 0  # anti-aligned with the mean: what the diagnostic reports


def test_sign_vote_changes_nothing_the_rescale_does() -> None:
    """sign(C_ij) w_j is the same for w_j and -w_j, so the result equals the formula computed with
    eigh's directions as they come (no vote); what moves it away from the mean is the rescale of
    every projection to ||Delta_i|| s_j / sum(s)."""
    torch.manual_seed(0)
    updates = torch.randn(5, 7, dtype=torch.float64)
    updates[0] *= 6.0  # one long update: the mean follows it, the rescale does not
    out = principal_gradient_aggregate(updates, k_prop=0.6)
    evals, evecs = torch.linalg.eigh(updates @ updates.T / 5)
    evals, evecs = evals.flip(0), evecs.flip(1)
    k = num_directions(5, 0.6)
    w = evecs[:, :k].T @ updates  # unflipped directions
    c = updates @ w.T
    unit = w / w.norm(dim=1, keepdim=True)
    no_vote = (
        (torch.sign(c) * updates.norm(dim=1)[:, None]).mean(0) * evals[:k] / evals.sum()
    ) @ unit
    torch.testing.assert_close(out, no_vote)
    mean = updates.mean(0)
    assert float(torch.nn.functional.cosine_similarity(out, mean, dim=0)) < 0.99
