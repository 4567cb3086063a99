"""Clustered personalization server (Yeganeh et al. 2022): FedAvg warm-up, then agglomerative
clustering of the warm-up round's updates with an adaptive cut, one model per cluster, optional
re-clustering every R rounds; clients absent at clustering time join by the IFCA rule.

Meta-learning inside clusters (``meta = "reptile"``, the default), as the paper's code does it:
each member adapts the cluster model with k inner SGD steps (its task); the server then takes the
Reptile outer step per cluster, across its members, θ_c ← θ_c + ε (mean_k θ_k − θ_c)
(:func:`algorithms.meta.reptile_meta_step`). Per-FedAvg's meta step stays on the client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import Strategy

from algorithms.clustering import Clustering, agglomerative_clusters, client_signatures
from algorithms.meta import reptile_meta_step
from clients.clustered import WARMUP_KEY
from scenarios.results import new_figure, save_figure
from server.cluster_base import ClusterStrategy, from_numpy, reply_metrics, to_numpy
from server.strategies import ServerSetup, fedavg_kwargs


def plot_dendrogram(clustering: Clustering, labels: list[str], out: Path, title: str) -> Path:
    """The average-linkage dendrogram over cosine distance, leaves labelled by partition id."""
    from scipy.cluster.hierarchy import dendrogram

    fig, (ax,) = new_figure(width=max(6.4, 0.25 * len(labels)), height=4.2)
    if clustering.linkage is not None:
        dendrogram(clustering.linkage, labels=labels, ax=ax, color_threshold=None)
    ax.set_ylabel("cosine distance (average linkage)")
    ax.set_xlabel("partition id")
    # Matplotlib's automatic title placement re-measures every leaf label on each layout pass
    # (about a fifth of the figure's cost with 200 leaves) to put the title at y = 1.0, which is
    # where it lands unless the y axis shows a scale label ("1e-5", tiny distances only): placed
    # there directly, the PNG is byte-identical.
    heights = clustering.linkage[:, 2] if clustering.linkage is not None else np.zeros(0)
    if len(heights) and float(heights.max()) >= 1e-3:
        ax.set_title(title, y=1.0)
    else:
        ax.set_title(title)
    return save_figure(fig, out)


class ClusteredPersonalization(ClusterStrategy):
    def __init__(self, setup: ServerSetup, **fedavg_kw: Any) -> None:
        super().__init__(setup, **fedavg_kw)
        self.algo = setup.scenario.algorithm
        self.last_clustering_round: int | None = None

    def is_clustering_round(self, server_round: int) -> bool:
        warmup, every = self.algo.warmup_rounds, self.algo.recluster_every
        if server_round == warmup:
            return True
        return every > 0 and server_round > warmup and (server_round - warmup) % every == 0

    def extra_train_config(self, server_round: int) -> dict[str, Any]:
        return {WARMUP_KEY: server_round <= self.algo.warmup_rounds}

    def before_aggregate(
        self, server_round: int, replies: list[Message], bases: dict[int, ArrayRecord]
    ) -> None:
        if not self.is_clustering_round(server_round):
            return
        nodes = [
            m.metadata.src_node_id for m in replies if m.metadata.src_node_id in self.node_partition
        ]
        if len(nodes) < 2:
            return
        by_node = {m.metadata.src_node_id: m for m in replies}
        # Δ_i = w_i − (the model client i started from); one signature per client.
        sigs = np.concatenate(
            [
                client_signatures(
                    [to_numpy(by_node[n].content["arrays"])],
                    to_numpy(bases[n]),
                    self.algo.signature,
                )
                for n in nodes
            ]
        )
        clustering = agglomerative_clusters(
            sigs, self.algo.k_max, self.algo.s_min, self.algo.distance_threshold
        )
        pids = [self.node_partition[n] for n in nodes]
        # Each new cluster starts from the model its members started from (the warm-up global
        # model at the first clustering); this round's updates are then averaged per cluster.
        models = {
            int(c): bases[nodes[int(np.flatnonzero(clustering.labels == c)[0])]]
            for c in np.unique(clustering.labels)
        }
        # Clients absent now are dropped from the assignment: they rejoin by the IFCA rule.
        self.set_clusters(models, {p: int(c) for p, c in zip(pids, clustering.labels, strict=True)})
        self.last_clustering_round = server_round
        self.log_event(
            {
                "clustering": {
                    "rule": clustering.rule,
                    "num_clusters": clustering.num_clusters,
                    "silhouettes": {str(k): s for k, s in clustering.silhouettes.items()},
                    "signature": self.algo.signature,
                    "num_clients": len(nodes),
                }
            }
        )
        if self.run_dir is not None:
            plot_dendrogram(
                clustering,
                [str(p) for p in pids],
                self.run_dir / f"dendrogram-r{server_round}.png",
                f"round {server_round}: {clustering.num_clusters} cluster(s) ({clustering.rule})",
            )

    def cluster_update(
        self, server_round: int, cid: int, start: ArrayRecord, members: list[Message]
    ) -> ArrayRecord:
        if self.algo.meta != "reptile" or server_round <= self.algo.warmup_rounds:
            return super().cluster_update(server_round, cid, start, members)
        adapted = [to_numpy(next(iter(m.content.array_records.values()))) for m in members]
        weights = [float(reply_metrics(m)[self.weighted_by_key]) for m in members]
        return from_numpy(
            reptile_meta_step(to_numpy(start), adapted, weights, self.algo.reptile_epsilon)
        )

    def extra_state(self) -> dict[str, Any]:
        return {"last_clustering_round": self.last_clustering_round}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.last_clustering_round = state.get("last_clustering_round")


def make_clustered(setup: ServerSetup) -> Strategy:
    return ClusteredPersonalization(setup, **fedavg_kwargs(setup.scenario))
