"""algorithms/clustering.py on hand-made inputs, and the planted-groups test on real local updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import adjusted_rand_score
from torch.nn import functional as F

from algorithms.clustering import (
    agglomerative_clusters,
    assign_lowest_loss,
    cfl_bipartition,
    cfl_split_criterion,
    client_signatures,
    cosine_distance_matrix,
    cosine_similarity_matrix,
    max_cross_similarity,
    relabel_by_first_appearance,
    signature_keys,
    weighted_average,
)
from clients.models import build_model
from scenarios.config import ModelConfig


def test_cosine_similarity_by_hand() -> None:
    sig = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, 0.0]])
    sim = cosine_similarity_matrix(sig)
    assert sim[0, 1] == pytest.approx(1.0)
    assert sim[0, 2] == pytest.approx(0.0)
    assert sim[0, 3] == pytest.approx(-1.0)
    assert sim[4, 0] == 0.0 and sim[4, 4] == 1.0  # a zero update is similar to nothing
    dist = cosine_distance_matrix(sig)
    assert np.allclose(dist, dist.T) and np.all(np.diag(dist) == 0)
    assert dist[0, 3] == pytest.approx(2.0)


def test_signature_keys_and_updates() -> None:
    names = ["features.0.weight", "features.0.bias", "head.weight", "head.bias"]
    assert signature_keys(names, "all") == names
    assert signature_keys(names, "head") == ["head.weight", "head.bias"]
    assert signature_keys(["a.w", "a.b", "z.w", "z.b"], "head") == ["z.w", "z.b"]  # no "head"
    with pytest.raises(ValueError, match="signature"):
        signature_keys(names, "tail")
    base = {"head.weight": np.zeros((2, 2)), "head.bias": np.zeros(2), "x": np.ones(3)}
    new = {"head.weight": np.eye(2), "head.bias": np.array([1.0, -1.0]), "x": np.ones(3) * 2}
    sig = client_signatures([new], base, "head")
    assert sig.shape == (1, 6)
    assert np.allclose(sig[0], [1, 0, 0, 1, 1, -1])
    assert client_signatures([new], base, "all").shape == (1, 9)


def _planted(rng: np.random.Generator, groups: int, per_group: int, dim: int, noise: float):
    centers = rng.normal(size=(groups, dim))
    labels = np.repeat(np.arange(groups), per_group)
    return centers[labels] + noise * rng.normal(size=(len(labels), dim)), labels


def test_silhouette_cut_finds_planted_directions() -> None:
    sig, truth = _planted(np.random.default_rng(0), groups=4, per_group=5, dim=50, noise=0.3)
    result = agglomerative_clusters(sig, k_max=8, s_min=0.1)
    assert result.rule == "silhouette" and result.num_clusters == 4
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert max(result.silhouettes, key=result.silhouettes.get) == 4
    assert result.labels[0] == 0  # ids in order of first appearance


def test_no_structure_keeps_one_cluster_and_threshold_cut() -> None:
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(12, 200))  # isotropic: no cut has a convincing silhouette
    result = agglomerative_clusters(noise, k_max=6, s_min=0.3)
    assert result.rule == "single" and result.num_clusters == 1
    assert result.silhouettes and max(result.silhouettes.values()) < 0.3
    sig, truth = _planted(rng, groups=3, per_group=4, dim=30, noise=0.2)
    by_threshold = agglomerative_clusters(sig, distance_threshold=0.5)
    assert by_threshold.rule == "threshold"
    assert adjusted_rand_score(truth, by_threshold.labels) == 1.0
    assert agglomerative_clusters(sig, distance_threshold=1.99).num_clusters == 1
    assert agglomerative_clusters(sig[:1]).num_clusters == 1  # one client


def test_ifca_rule_and_relabel() -> None:
    losses = np.array([[0.5, 0.2, 0.9], [np.nan, 1.0, 1.0], [0.1, 0.1, 3.0]])
    assert assign_lowest_loss(losses).tolist() == [1, 1, 0]  # NaN never wins; ties -> lowest id
    assert assign_lowest_loss(np.array([2.0, 1.0])).tolist() == [1]
    assert relabel_by_first_appearance([7, 7, 3, 9, 3]).tolist() == [0, 0, 1, 2, 1]


def test_cfl_split_criterion_and_bipartition() -> None:
    # Two groups pulling in opposite directions: the mean is ~0, each client is large.
    updates = np.array([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]])
    check = cfl_split_criterion(updates, eps1=0.4, eps2=0.6)
    assert check.split and check.mean_norm == pytest.approx(0.0, abs=1e-12)
    assert check.max_norm == pytest.approx(np.hypot(1.0, 0.1))
    assert not cfl_split_criterion(updates, eps1=0.4, eps2=2.0).split  # nobody is far
    assert not cfl_split_criterion(updates, eps1=0.4, eps2=0.6, min_size=3).split  # too small
    assert not cfl_split_criterion(updates + 1.0, eps1=0.4, eps2=0.6).split  # not stationary
    sim = cosine_similarity_matrix(updates)
    a, b = cfl_bipartition(sim)
    assert a.tolist() == [0, 1] and b.tolist() == [2, 3]
    assert max_cross_similarity(sim, a, b) < 0


def test_weighted_average() -> None:
    out = weighted_average(
        [{"w": np.zeros(2, np.float32)}, {"w": np.ones(2, np.float32)}], [1.0, 3.0]
    )
    assert out["w"].dtype == np.float32 and np.allclose(out["w"], 0.75)
    with pytest.raises(ValueError):
        weighted_average([{"w": np.zeros(1)}], [1.0, 2.0])


# ------------------------------------------------------------------ planted groups, real updates
def _local_update(init: dict, x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """One client's weights after 2 epochs of SGD from ``init`` on its own data."""
    model = build_model(ModelConfig(name="mlp", hidden=[32]), (1, 8, 8), 10)
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(2):
        for idx in torch.randperm(len(x), generator=gen).split(16):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("signature", ["all", "head"])
def test_planted_label_groups_are_recovered(signature: str) -> None:
    """12 clients drawn from 3 disjoint label groups of sklearn digits ({0-2}, {3-5}, {6-9}),
    updated from one shared model: the adaptive cut must find 3 clusters with ARI >= 0.9."""
    features, labels = load_digits(return_X_y=True)
    x_all = (features / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y_all = labels.astype(np.int64)
    groups = [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9)]
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    init = build_model(ModelConfig(name="mlp", hidden=[32]), (1, 8, 8), 10).state_dict()
    base = {k: v.numpy().copy() for k, v in init.items()}
    updated, truth = [], []
    for client in range(12):
        group = client % 3
        pool = np.flatnonzero(np.isin(y_all, groups[group]))
        rows = rng.choice(pool, size=80, replace=False)
        updated.append(_local_update(init, x_all[rows], y_all[rows], seed=client))
        truth.append(group)
    result = agglomerative_clusters(client_signatures(updated, base, signature), k_max=6)
    assert result.num_clusters == 3, result.silhouettes
    assert adjusted_rand_score(truth, result.labels) >= 0.9


@pytest.mark.parametrize("scale", [1.0, 1e-6])  # 1e-6: the y axis shows a "1e-6" scale label
def test_dendrogram_title_is_where_matplotlib_places_it(scale: float, tmp_path) -> None:
    """server/clustered.py places the dendrogram's title itself (cheaper with many leaves): the
    PNG is byte for byte the one matplotlib's automatic title placement draws."""
    from scipy.cluster.hierarchy import dendrogram

    from scenarios.results import new_figure, save_figure
    from server.clustered import plot_dendrogram

    rng = np.random.default_rng(0)
    clustering = agglomerative_clusters(rng.normal(size=(40, 10)), 8, 0.1)
    clustering.linkage[:, 2] *= scale
    labels = [str(i) for i in range(40)]
    title = "clustering in round 3: a long title that would overlap the scale label " * 2
    fig, (ax,) = new_figure(width=max(6.4, 0.25 * len(labels)), height=4.2)
    dendrogram(clustering.linkage, labels=labels, ax=ax, color_threshold=None)
    ax.set_ylabel("cosine distance (average linkage)")
    ax.set_xlabel("partition id")
    ax.set_title(title)
    expected = save_figure(fig, tmp_path / "automatic.png").read_bytes()
    assert plot_dendrogram(clustering, labels, tmp_path / "d.png", title).read_bytes() == expected
