"""CFL server (Sattler, Müller, Samek 2020): one cluster at first; after ``warmup_rounds``, a
cluster whose mean update is small (‖mean Δ‖ < ε1) while some client's is large (max ‖Δ_i‖ > ε2)
is bi-partitioned by the cosine similarity of its clients' updates (complete linkage). The new
cluster starts from the parent's model; both then average their own members' updates."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import Strategy

from algorithms.clustering import (
    cfl_bipartition,
    cfl_split_criterion,
    client_signatures,
    cosine_similarity_matrix,
    max_cross_similarity,
)
from server.cluster_base import ClusterStrategy, to_numpy
from server.strategies import ServerSetup, fedavg_kwargs


class CFL(ClusterStrategy):
    def __init__(self, setup: ServerSetup, **fedavg_kw: Any) -> None:
        super().__init__(setup, **fedavg_kw)
        self.algo = setup.scenario.algorithm
        self.set_clusters({0: ArrayRecord(setup.model.state_dict())}, {})

    def before_aggregate(
        self, server_round: int, replies: list[Message], bases: dict[int, ArrayRecord]
    ) -> None:
        members: dict[int, list[int]] = {}
        for msg in replies:
            nid = msg.metadata.src_node_id
            cid = self.assignment.get(self.node_partition.get(nid, -1))
            if cid is not None:
                members.setdefault(cid, []).append(nid)
        by_node = {m.metadata.src_node_id: m for m in replies}
        norms = {}
        for cid, nodes in sorted(members.items()):
            updates = np.concatenate(
                [
                    client_signatures([to_numpy(by_node[n].content["arrays"])], to_numpy(bases[n]))
                    for n in nodes
                ]
            )
            check = cfl_split_criterion(
                updates, self.algo.eps1, self.algo.eps2, self.algo.min_cluster_size
            )
            norms[str(cid)] = {"mean_norm": check.mean_norm, "max_norm": check.max_norm}
            if (
                not check.split
                or server_round < self.algo.warmup_rounds
                or len(self.models) >= self.algo.max_clusters
            ):
                continue
            sim = cosine_similarity_matrix(updates)
            part_a, part_b = cfl_bipartition(sim)
            if min(len(part_a), len(part_b)) < self.algo.min_cluster_size:
                continue
            new = self.new_cluster_id()
            self.models[new] = self.models[cid]
            self.cluster_weight[new] = self.cluster_weight.get(cid, 1.0)
            for i in part_b:
                self.assignment[self.node_partition[nodes[i]]] = new
            self.log_event(
                {
                    "split": {
                        "cluster": cid,
                        "into": [cid, new],
                        "sizes": [len(part_a), len(part_b)],
                        "mean_norm": check.mean_norm,
                        "max_norm": check.max_norm,
                        "max_cross_similarity": max_cross_similarity(sim, part_a, part_b),
                    }
                }
            )
        self.log_event({"update_norms": norms})


def make_cfl(setup: ServerSetup) -> Strategy:
    return CFL(setup, **fedavg_kwargs(setup.scenario))
