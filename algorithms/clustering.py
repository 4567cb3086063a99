"""Client clustering for clustered personalization (framework-free: numpy / scipy / sklearn).

Pieces used by the ``clustered`` (adaptive hierarchical clustering, Yeganeh et al. 2022), ``cfl``
(Sattler et al. 2020) and ``ifca`` (Ghosh et al. 2020) strategies:

* client signatures: the flattened update ``Δ_i = w_i − w_global`` (all layers, or only the head,
  which carries most of the label skew);
* cosine similarity / distance matrices, ``O(K² d)`` for K clients with d-dimensional signatures;
* agglomerative clustering (average linkage on cosine distance) with an adaptive cut: the
  silhouette-best k in 2..k_max, one cluster when no cut reaches ``s_min``, or a distance threshold;
* the IFCA rule (each client joins the cluster whose model has the lowest loss on its data);
* CFL's split criterion and bi-partition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import silhouette_score

Signature = Literal["all", "head"]
StateArrays = Mapping[str, np.ndarray]


# -------------------- signatures


def signature_keys(names: Sequence[str], signature: Signature) -> list[str]:
    """Which state-dict entries form a client's signature.

    ``"all"``: every entry. ``"head"``: entries whose first dotted component is ``head`` (fedge's
    models name their classifier ``head``); a model without one falls back to its last two entries
    (the last layer's weight and bias).
    """
    if signature == "all":
        return list(names)
    if signature != "head":
        raise ValueError(f"signature must be 'all' or 'head', got {signature!r}")
    head = [n for n in names if n.split(".")[0] == "head"]
    return head or list(names)[-2:]


def client_signatures(
    updated: Sequence[StateArrays], base: StateArrays, signature: Signature = "all"
) -> np.ndarray:
    """Stack the flattened updates ``Δ_i = w_i − w_base`` over the signature's entries: (K, d)."""
    if not updated:
        raise ValueError("client_signatures needs at least one client's weights")
    keys = signature_keys(list(base), signature)
    rows = []
    for weights in updated:
        missing = [k for k in keys if k not in weights]
        if missing:
            raise KeyError(f"client weights lack entries {missing[:3]} of the base model")
        rows.append(
            np.concatenate(
                [
                    (np.asarray(weights[k], np.float64) - np.asarray(base[k], np.float64)).ravel()
                    for k in keys
                ]
            )
        )
    return np.stack(rows)


# -------------------- similarities


def cosine_similarity_matrix(signatures: np.ndarray) -> np.ndarray:
    """``S_ij = <s_i, s_j> / (‖s_i‖ ‖s_j‖)`` for rows of ``signatures`` (K, d) -> (K, K).

    A zero signature (a client that did not move) is similar to nothing: 0 off the diagonal, 1 on it.
    Cost: one K×d by d×K product, O(K² d).
    """
    sig = np.asarray(signatures, dtype=np.float64)
    if sig.ndim != 2:
        raise ValueError(f"signatures must be a (K, d) matrix, got shape {sig.shape}")
    norms = np.linalg.norm(sig, axis=1)
    unit = np.divide(sig, norms[:, None], out=np.zeros_like(sig), where=norms[:, None] > 0)
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return sim


def cosine_distance_matrix(signatures: np.ndarray) -> np.ndarray:
    """``D_ij = 1 − S_ij`` in [0, 2], symmetric with a zero diagonal."""
    dist = 1.0 - cosine_similarity_matrix(signatures)
    dist = 0.5 * (dist + dist.T)
    np.fill_diagonal(dist, 0.0)
    return np.clip(dist, 0.0, 2.0)


# -------------------- agglomerative clustering with an adaptive cut


@dataclass
class Clustering:
    """Result of :func:`agglomerative_clusters`."""

    labels: np.ndarray  # (K,) cluster id per client, 0..k-1 in order of first appearance
    linkage: np.ndarray | None  # scipy linkage matrix (None for fewer than two clients)
    distances: np.ndarray  # (K, K) cosine distances
    silhouettes: dict[int, float] = field(default_factory=dict)  # candidate k -> silhouette
    rule: str = "single"  # "silhouette" | "threshold" | "single" (fallback)

    @property
    def num_clusters(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def relabel_by_first_appearance(labels: Sequence[int]) -> np.ndarray:
    """Map arbitrary labels to 0..k-1 in the order they first appear (deterministic ids)."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(x), len(mapping)) for x in labels], dtype=np.int64)


def average_linkage(distances: np.ndarray) -> np.ndarray:
    """scipy's average-linkage (UPGMA) dendrogram over a square distance matrix."""
    return linkage(squareform(distances, checks=False), method="average")


def agglomerative_clusters(
    signatures: np.ndarray,
    k_max: int = 8,
    s_min: float = 0.1,
    distance_threshold: float | None = None,
) -> Clustering:
    """Average-linkage clustering on cosine distance with an adaptive number of clusters.

    With ``distance_threshold`` t: cut the dendrogram at height t (``fcluster(criterion="distance")``).
    Otherwise for every k in 2..min(k_max, K−1) cut into k clusters and score the cut with the
    silhouette ``s = mean_i (b_i − a_i) / max(a_i, b_i)`` on the precomputed distances; keep the
    best k, or one cluster when the best silhouette is below ``s_min``.
    """
    distances = cosine_distance_matrix(signatures)
    num = len(distances)
    single = np.zeros(num, dtype=np.int64)
    if num < 2:
        return Clustering(single, None, distances)
    tree = average_linkage(distances)
    if distance_threshold is not None:
        labels = fcluster(tree, t=distance_threshold, criterion="distance")
        return Clustering(relabel_by_first_appearance(labels), tree, distances, rule="threshold")
    scores: dict[int, float] = {}
    best_k, best_labels, best_score = 1, single, -np.inf
    for k in range(2, min(k_max, num - 1) + 1):
        labels = fcluster(tree, t=k, criterion="maxclust")
        if len(np.unique(labels)) < 2:
            continue
        score = float(silhouette_score(distances, labels, metric="precomputed"))
        scores[k] = score
        if score > best_score:  # strict: ties keep the smaller k
            best_k, best_labels, best_score = k, labels, score
    if best_k == 1 or best_score < s_min:
        return Clustering(single, tree, distances, scores, rule="single")
    return Clustering(
        relabel_by_first_appearance(best_labels), tree, distances, scores, "silhouette"
    )


# -------------------- IFCA


def assign_lowest_loss(losses: np.ndarray) -> np.ndarray:
    """IFCA rule: client i joins ``argmin_c L_i(θ_c)``; ``losses`` is (clients, clusters).

    NaN losses never win; ties go to the lowest cluster id.
    """
    arr = np.asarray(losses, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.shape[1] == 0:
        raise ValueError("assign_lowest_loss needs at least one cluster")
    return np.argmin(np.where(np.isnan(arr), np.inf, arr), axis=1)


# -------------------- CFL (Sattler et al. 2020)


@dataclass(frozen=True)
class SplitCheck:
    """CFL's stationarity test for one cluster."""

    mean_norm: float  # ‖(1/n) Σ_i Δ_i‖
    max_norm: float  # max_i ‖Δ_i‖
    split: bool


def cfl_split_criterion(
    updates: np.ndarray, eps1: float, eps2: float, min_size: int = 2
) -> SplitCheck:
    """Split a cluster when it is near a stationary point of the joint objective but its clients
    are not: ``‖mean Δ‖ < ε1`` and ``max ‖Δ_i‖ > ε2``, and it has at least ``2·min_size`` clients."""
    upd = np.asarray(updates, dtype=np.float64)
    mean_norm = float(np.linalg.norm(upd.mean(axis=0))) if len(upd) else 0.0
    max_norm = float(np.linalg.norm(upd, axis=1).max()) if len(upd) else 0.0
    big_enough = len(upd) >= 2 * min_size
    return SplitCheck(mean_norm, max_norm, big_enough and mean_norm < eps1 and max_norm > eps2)


def cfl_bipartition(similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split clients in two so that the maximum cross-cluster cosine similarity is small.

    As in Sattler's reference code: complete-linkage agglomerative clustering on ``1 − S`` cut
    into two clusters. Returns the two index arrays (the one holding client 0 first).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if len(sim) < 2:
        raise ValueError("cannot bi-partition fewer than two clients")
    dist = np.clip(1.0 - 0.5 * (sim + sim.T), 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="complete")
    labels = relabel_by_first_appearance(fcluster(tree, t=2, criterion="maxclust"))
    return np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)


def max_cross_similarity(similarity: np.ndarray, part_a: np.ndarray, part_b: np.ndarray) -> float:
    """``max_{i∈A, j∈B} S_ij`` (CFL accepts a split when this is low)."""
    return float(np.asarray(similarity)[np.ix_(part_a, part_b)].max())


# -------------------- model averaging


def weighted_average(
    states: Sequence[StateArrays], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """``Σ_c (n_c / Σ n) w_c`` entry by entry (e.g. the sample-weighted mean of cluster models)."""
    if not states or len(states) != len(weights):
        raise ValueError("weighted_average needs as many weights as states (at least one)")
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    w = w / w.sum()
    out = {}
    for key, first in states[0].items():
        acc = sum(wi * np.asarray(s[key], np.float64) for wi, s in zip(w, states, strict=True))
        out[key] = np.asarray(acc).astype(np.asarray(first).dtype)
    return out
