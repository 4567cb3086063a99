"""FedLD (Zeng et al., MICCAI 2024): margin-control local loss + principal-gradient aggregation.

Client side: ``L = CE(Z, y) + lambda * log(1 + ||softmax(Z)||^2)``. Both reference implementations
(the authors' repository and fluke) take the Frobenius norm of the *whole batch's* softmax matrix;
that is our default. ``per_sample=True`` instead averages ``log(1 + ||softmax(z_b)||^2)`` over the
samples, which does not depend on the batch size.

Server side (per state-dict tensor): project every client update onto the top principal directions
of the K client updates, align their signs by majority vote, rescale, and average. The K x K Gram
matrix is decomposed, never the d x d covariance, and the K x k projections are one matmul. What
can turn the aggregate away from the plain mean is the rescale: every projection gets length
||Delta_i|| s_j / sum(s), whatever its own size. The sign vote cannot: flipping w_j flips every
C_ij with it, so each p_ij, and the result, is the same either way.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from algorithms.base import AlgorithmConfig

# Eigenvalues below EIG_RTOL * largest eigenvalue are numerical noise: their directions are dropped.
EIG_RTOL = 1e-6


class FedLDConfig(AlgorithmConfig):
    """FedLD hyperparameters. Ablations: ``margin_lambda = 0`` (aggregation only) and
    ``aggregation = "mean"`` (margin loss only, FedLD's clients with a plain-mean server)."""

    name: Literal["fedld"] = "fedld"
    server_factory: ClassVar[str] = "server.fedld:make_fedld"
    client_trainer: ClassVar[str] = "clients.fedld:train_fedld"
    packable: ClassVar[bool] = True
    margin_lambda: float = Field(
        0.03, ge=0.0, description="weight of the margin-control term (authors: 0.03; fluke: 0.2)"
    )
    per_sample: bool = Field(
        False,
        description="margin term: per-sample softmax norms averaged (True) or the batch Frobenius "
        "norm of the reference code (False)",
    )
    aggregation: Literal["principal", "mean"] = Field(
        "principal", description="server: principal-gradient aggregation or plain unweighted mean"
    )
    k_prop: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="share of the K principal directions kept (k = floor(K*k_prop))",
    )
    server_lr: float = Field(1.0, gt=0.0, description="w_global += server_lr * aggregated update")


def margin_control_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    per_sample: bool = False,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``CE(Z, y) + lam * log(1 + ||softmax(Z)||^2)``.

    ``||.||`` is the Frobenius norm of the batch's B x C softmax matrix (reference behaviour) or, with
    ``per_sample``, the mean over samples of ``log(1 + ||softmax(z_b)||_2^2)``. ``weight`` (0/1 per
    sample) leaves the zero-weight rows out of every term, as if the batch held only the others
    (the pack pads short batches with such rows).
    """
    if weight is None:
        ce = F.cross_entropy(logits, y)
    else:
        ce = (F.cross_entropy(logits, y, reduction="none") * weight).sum() / weight.sum()
    if lam == 0.0:
        return ce
    probs = F.softmax(logits, dim=1)
    if weight is None:
        if per_sample:
            margin = torch.log1p(probs.pow(2).sum(dim=1)).mean()
        else:
            margin = torch.log1p(probs.pow(2).sum())
    else:
        squared = probs.pow(2).sum(dim=1) * weight
        if per_sample:
            margin = (torch.log1p(squared) * weight).sum() / weight.sum()
        else:
            margin = torch.log1p(squared.sum())
    return ce + lam * margin


def num_directions(num_clients: int, k_prop: float) -> int:
    """k = max(1, floor(K * k_prop)), at most K."""
    return min(num_clients, max(1, int(num_clients * k_prop)))


def principal_gradient_aggregate(updates: torch.Tensor, k_prop: float = 0.8) -> torch.Tensor:
    """Principal-gradient aggregation of K flattened client updates ``updates`` (K x d) -> (d,).

    With G = updates, H = G G^T / K = E diag(s) E^T (s descending), V = G^T E (d x K):
    keep the first k = max(1, floor(K k_prop)) columns w_j with s_j > EIG_RTOL * s_1; flip w_j when
    more clients have Delta_i . w_j < 0 than >= 0; with C = G W^T (K x k) the projection
    p_ij = (C_ij / ||w_j||^2) w_j is rescaled to length ||Delta_i|| s_j / sum(s) (sum over all K
    eigenvalues, as the reference), i.e.
    p_ij = sign(C_ij) ||Delta_i|| (s_j / sum s) w_j / ||w_j||  (C_ij = 0 contributes nothing), and

        result = mean_i sum_j p_ij = sum_j [mean_i sign(C_ij) ||Delta_i||] (s_j / sum s) w_j/||w_j||.

    All-zero updates give a zero result (no NaN).
    """
    if updates.ndim != 2:
        raise ValueError(f"updates must be a K x d matrix, got shape {tuple(updates.shape)}")
    num_clients = updates.shape[0]
    if num_clients == 1:
        return updates[0].clone()
    g = updates.to(torch.float64)
    gram = g @ g.T / num_clients
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    k = num_directions(num_clients, k_prop)
    # Rescaling divides by the sum of *all* K eigenvalues, as the reference does (not just the k kept
    # ones): the aggregate is shorter by sum(kept)/sum(all). Identical updates still give that update
    # back, since their Gram matrix has a single non-zero eigenvalue.
    total = evals.clamp_min(0.0).sum()
    evals, evecs = evals[:k], evecs[:, :k]
    keep = evals > EIG_RTOL * evals[0].clamp_min(0.0)
    if not bool(keep.any()):  # every update is zero (or numerically so)
        return torch.zeros_like(updates[0])
    s, e = evals[keep], evecs[:, keep]
    directions = e.T @ g  # k x d, rows w_j = G^T e_j
    coeffs = g @ directions.T  # K x k, C_ij = Delta_i . w_j
    # The reference's majority sign vote. It changes no p_ij (sign(C_ij) w_j is invariant under
    # w_j -> -w_j), so it cannot turn the update away from the mean; the rescale below can.
    flip = (coeffs < 0).sum(0) > (coeffs >= 0).sum(0)
    sign_fix = torch.where(flip, -1.0, 1.0).to(g)
    directions, coeffs = directions * sign_fix[:, None], coeffs * sign_fix[None, :]
    unit = directions / directions.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    client_norms = g.norm(dim=1)  # ||Delta_i||
    weight = (torch.sign(coeffs) * client_norms[:, None]).mean(0) * (s / total)  # (k,)
    return (weight @ unit).to(updates.dtype)


def fedld_aggregate_state(
    global_state: dict[str, torch.Tensor],
    client_states: Sequence[dict[str, torch.Tensor]],
    k_prop: float = 0.8,
    server_lr: float = 1.0,
    first_round: bool = False,
    buffer_names: Collection[str] = (),
    principal: bool = True,
) -> dict[str, torch.Tensor]:
    """New global state: w + server_lr * aggregate_i(w_i - w) for every tensor of the state dict.

    ``aggregate`` is :func:`principal_gradient_aggregate` on the K x d update matrix of that tensor,
    except the plain unweighted mean on the first round (the reference has no update history yet),
    and for single-element tensors. ``buffer_names`` (running statistics) and non-float tensors
    are set to the plain mean of the clients' values, not projected like weights.
    """
    if not client_states:
        raise ValueError("fedld_aggregate_state needs at least one client state")
    out: dict[str, torch.Tensor] = {}
    for key, base in global_state.items():
        stacked = torch.stack([cs[key] for cs in client_states])
        if not base.is_floating_point():
            out[key] = stacked.to(torch.float64).mean(0).round().to(base.dtype)
            continue
        if key in buffer_names:
            out[key] = stacked.mean(0)
            continue
        updates = (stacked - base).reshape(len(client_states), -1)
        if principal and not first_round and base.numel() > 1:
            update = principal_gradient_aggregate(updates, k_prop)
        else:
            update = updates.mean(0)
        out[key] = base + server_lr * update.reshape(base.shape)
    return out


def agreement_with_mean(
    global_state: dict[str, torch.Tensor],
    new_state: dict[str, torch.Tensor],
    client_states: Sequence[dict[str, torch.Tensor]],
    skip: Collection[str] = (),
) -> tuple[float, float]:
    """(cosine, norm ratio) of the applied update ``new - global`` against the plain unweighted mean
    update, over all floating-point tensors not in ``skip``.

    A diagnostic, logged every round: under strong label skew the rescale of each projection to
    ||Delta_i|| s_j / sum(s) (each client's component keeps only its side of w_j, not its size) can
    point the classifier's update away from the mean (cosine <= 0), which is where FedLD loses to
    FedAvg. The majority sign vote plays no part: it leaves every projection unchanged.
    """
    applied, mean = [], []
    for key, base in global_state.items():
        if key in skip or not base.is_floating_point():
            continue
        applied.append((new_state[key] - base).flatten().double())
        mean.append(
            (torch.stack([cs[key] for cs in client_states]).mean(0) - base).flatten().double()
        )
    a, m = torch.cat(applied), torch.cat(mean)
    denom = float(a.norm() * m.norm())
    cos = float(a @ m) / denom if denom > 0 else 0.0
    ratio = float(a.norm() / m.norm()) if float(m.norm()) > 0 else 0.0
    return cos, ratio
