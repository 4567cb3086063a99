"""Byzantine-robust aggregation rules and pre-aggregation steps for heterogeneous data.

Pure math: every function takes the round's updates stacked as a 2-D tensor ``updates`` of shape
(n, d) (one flattened update Δᵢ = wᵢ − w_sent per row) and returns tensors. The server side
(``server/robust.py``, ``server/preaggregation.py``) flattens Flower records into such stacks.

Rules (replace the mean):

- :func:`geometric_median` — RFA (Pillutla, Kakade & Harchaoui, 2022): the point minimising
  Σᵢ αᵢ‖z − Δᵢ‖, by the smoothed Weiszfeld iteration.
- :func:`centered_clipping` — Karimireddy, He & Jaggi (ICML 2021, "Learning from history"):
  v ← v + (1/n) Σᵢ clip_τ(Δᵢ − v), started at the previous round's aggregate (the server's
  momentum of aggregated updates), clip_τ(z) = z · min(1, τ/‖z‖).

Steps that transform the stack before any rule (Karimireddy, He & Jaggi, ICLR 2022; Allouah et
al., AISTATS 2023) and weights:

- :func:`bucketing` — shuffle, split into ⌈n/s⌉ buckets of at most s, average each bucket.
- :func:`nearest_neighbour_mixing` — NNM: each Δᵢ becomes the mean of its n − f nearest updates
  (itself included).
- :func:`trust_scores` / :func:`rescale_to` — FLTrust (Cao et al., NDSS 2021): score
  TSᵢ = ReLU(cos(Δᵢ, g₀)) against a reference update g₀ trained on the server's clean set, and
  every Δᵢ rescaled to ‖g₀‖; the weighted mean with weights TSᵢ is FLTrust's aggregate.
- :func:`capped_weights` — aggregation weights with no one share above a cap (water filling).

Checks that exclude rows:

- :func:`direction_outliers` — the direction check: rows whose cosine with a robust reference
  direction (the coordinate-wise median of the rows, or a given one such as the server's previous
  step) falls below a threshold; with a second reference, only rows below it against both.
"""

from __future__ import annotations

import torch


def _check_stack(updates: torch.Tensor) -> None:
    if updates.dim() != 2 or updates.shape[0] == 0:
        raise ValueError(
            f"updates must be a non-empty (n, d) stack, got shape {tuple(updates.shape)}"
        )


def geometric_median(
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    max_iters: int = 100,
    smoothing: float = 1e-6,
    tolerance: float = 1e-7,
) -> torch.Tensor:
    r"""Weighted geometric median :math:`\arg\min_z \sum_i \alpha_i \max(\nu, \|z - \Delta_i\|)`
    by Weiszfeld's iteration :math:`z \leftarrow \sum_i \beta_i \Delta_i / \sum_i \beta_i`,
    :math:`\beta_i = \alpha_i / \max(\nu, \|z - \Delta_i\|)` (RFA's smoothing ν), started at the
    weighted mean; stops when the objective improves by less than ``tolerance`` (relative)."""
    _check_stack(updates)
    alpha = (
        torch.ones(updates.shape[0], dtype=updates.dtype)
        if weights is None
        else weights.to(updates.dtype)
    )
    alpha = alpha / alpha.sum()
    z = alpha @ updates

    def objective(point: torch.Tensor) -> float:
        return float((alpha * (updates - point).norm(dim=1)).sum())

    best = objective(z)
    for _ in range(max_iters):
        distances = (updates - z).norm(dim=1).clamp_min(smoothing)
        beta = alpha / distances
        z = (beta @ updates) / beta.sum()
        value = objective(z)
        if best - value <= tolerance * max(best, 1e-30):
            break
        best = value
    return z


def clip(vectors: torch.Tensor, radius: float) -> torch.Tensor:
    r"""Each row scaled to norm at most ``radius``: :math:`z \cdot \min(1, \tau / \|z\|)`."""
    norms = vectors.norm(dim=1, keepdim=True)
    return vectors * torch.clamp(radius / norms.clamp_min(1e-30), max=1.0)


def centered_clipping(
    updates: torch.Tensor, center: torch.Tensor, radius: float | None = None, iterations: int = 1
) -> torch.Tensor:
    r"""Centered clipping: :math:`v \leftarrow v + \frac1n \sum_i \mathrm{clip}_\tau(\Delta_i - v)`,
    ``iterations`` times from ``center``. ``radius`` None: τ = the median of
    :math:`\|\Delta_i - v\|` at each iteration (scale-free: honest updates' norms vary by orders of
    magnitude over training, and a median is moved by a minority of attackers only within the
    honest range)."""
    _check_stack(updates)
    v = center.to(updates.dtype).clone()
    for _ in range(iterations):
        offsets = updates - v
        tau = float(offsets.norm(dim=1).median()) if radius is None else radius
        v = v + clip(offsets, tau).mean(dim=0)
    return v


def bucketing(
    updates: torch.Tensor, bucket_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[list[int]]]:
    """Random buckets of at most ``bucket_size`` rows (a permutation cut into consecutive runs)
    and each bucket's mean; returns (⌈n/s⌉, d) means and the row indices of each bucket."""
    _check_stack(updates)
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    order = torch.randperm(updates.shape[0], generator=generator).tolist()
    groups = [order[i : i + bucket_size] for i in range(0, len(order), bucket_size)]
    means = torch.stack([updates[g].mean(dim=0) for g in groups])
    return means, groups


def nearest_neighbour_mixing(updates: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """NNM: row i becomes the mean of the n − f rows nearest to it in Euclidean distance (row i
    itself, at distance 0, among them); f = ``num_malicious`` (0 makes every row the mean)."""
    _check_stack(updates)
    n = updates.shape[0]
    if not 0 <= num_malicious < n:
        raise ValueError(f"num_malicious must lie in [0, {n}) for {n} updates, got {num_malicious}")
    distances = torch.cdist(updates, updates)
    distances.fill_diagonal_(-1.0)  # a row is always its own nearest (cdist may give 1e-8)
    # stable: ties go to the lower index, whatever the sort's internals
    nearest = torch.argsort(distances, dim=1, stable=True)[:, : n - num_malicious]
    return updates[nearest].mean(dim=1)


def trust_scores(updates: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    r"""FLTrust's trust score :math:`\mathrm{ReLU}(\cos(\Delta_i, g_0))` per row (0 for a zero
    update or a zero reference)."""
    _check_stack(updates)
    ref_norm = float(reference.norm())
    if ref_norm == 0.0:
        return torch.zeros(updates.shape[0], dtype=updates.dtype)
    norms = updates.norm(dim=1)
    cos = (updates @ reference) / (norms * ref_norm).clamp_min(1e-30)
    return torch.where(norms > 0, cos.clamp_min(0.0), torch.zeros_like(cos))


def rescale_to(updates: torch.Tensor, norm: float) -> torch.Tensor:
    """Every (non-zero) row scaled to ``norm`` (FLTrust's magnitude normalisation)."""
    norms = updates.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, updates * (norm / norms.clamp_min(1e-30)), updates)


def capped_weights(weights: torch.Tensor, max_share: float) -> torch.Tensor:
    r"""Weights with no share above ``max_share``: :math:`w_i' = \min(w_i, T)`, the largest T with
    :math:`\max_i w_i' \le c \sum_j w_j'` (water filling: capping the largest only ever moves
    the others' shares up). When c < 1/n no weighting can satisfy it: all weights equal."""
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError("weights must be a non-empty 1-D tensor")
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must lie in (0, 1], got {max_share}")
    w = weights.to(torch.float64)
    n = w.numel()
    if max_share * n <= 1:
        return torch.full_like(w, float(w.max()))
    if float(w.max()) <= max_share * float(w.sum()):
        return w
    order = torch.sort(w, descending=True).values.tolist()
    # the k largest capped at T: T = c (k T + rest_k)  =>  T = c rest_k / (1 - c k)
    for k in range(1, n):
        if max_share * k >= 1:
            break
        threshold = max_share * sum(order[k:]) / (1 - max_share * k)
        if order[k - 1] >= threshold >= order[k]:
            return torch.clamp(w, max=threshold)
    return torch.full_like(w, float(w.max()))


def direction_cosines(updates: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    r""":math:`\cos(\Delta_i, r)` per row, against ``reference`` r or, when None, the
    coordinate-wise median of the rows (robust to a minority of rows, whatever they hold). A zero
    row or a zero reference scores 0 (no direction to judge)."""
    _check_stack(updates)
    ref = updates.median(dim=0).values if reference is None else reference.to(updates.dtype)
    ref_norm = float(ref.norm())
    if ref_norm == 0.0:
        return torch.zeros(updates.shape[0], dtype=updates.dtype)
    norms = updates.norm(dim=1)
    cos = (updates @ ref) / (norms * ref_norm).clamp_min(1e-30)
    return torch.where(norms > 0, cos, torch.zeros_like(cos))


def direction_outliers(
    updates: torch.Tensor,
    threshold: float,
    reference: torch.Tensor | None = None,
    also: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Direction check: which rows to exclude (a bool mask), those whose
    :math:`\cos(\Delta_i, r) < ` ``threshold`` (r: :func:`direction_cosines`'s reference, the
    coordinate-wise median by default). Aimed at updates of honest norm that point the wrong
    way (sign flip, IPM). With ``also`` = a second reference r' (the server's previous step:
    ``robustness.direction_reference = "both"``) a row is excluded only if it is below the
    threshold against both, i.e. :math:`\max(\cos(\Delta_i, r), \cos(\Delta_i, r')) <` the
    threshold; a zero ``also`` is ignored (no direction). The median reference assumes an honest
    majority: with fewer than 3 rows nothing is excluded, and never more than ⌊(n − 1)/2⌋ rows
    (the lowest scores first, ties to the lower index)."""
    return lowest_below(direction_scores(updates, reference, also), threshold)


def lowest_below(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The direction check's selection over per-row ``scores``: rows scoring below
    ``threshold``, the lowest first (ties to the lower index), at most ⌊(n − 1)/2⌋ of them, none
    with fewer than 3 rows (a bool mask)."""
    n = scores.shape[0]
    out = torch.zeros(n, dtype=torch.bool)
    if n < 3:
        return out
    order = torch.argsort(scores, stable=True)
    out[order[scores[order] < threshold][: (n - 1) // 2]] = True
    return out


def direction_scores(
    updates: torch.Tensor, reference: torch.Tensor | None = None, also: torch.Tensor | None = None
) -> torch.Tensor:
    """The score :func:`direction_outliers` compares with its threshold: the cosine with
    ``reference`` (None: the rows' coordinate-wise median), or its maximum with the cosine with
    ``also`` when that is given and non-zero."""
    cos = direction_cosines(updates, reference)
    if also is not None and float(also.norm()) > 0.0:
        cos = torch.maximum(cos, direction_cosines(updates, also))
    return cos
