"""Shared server pieces of the clustered strategies (``clustered``, ``cfl``, ``ifca``).

:class:`ClusterStrategy` is Flower's FedAvg (its node sampling, reply checks and weighted
averaging) with one model per cluster:

* **Instructions**: one Message per node. A node whose partition is assigned gets its cluster's
  model (config ``cluster-id``); a node the server cannot place yet, when there are several
  clusters, gets *every* cluster model in one RecordDict (``arrays`` = cluster ``cluster-ids[0]``,
  ``cluster-model-<id>`` the others) and keeps the lowest-loss one on its train split (IFCA rule,
  ``clients/cluster_pick.py``), reporting ``cluster-id``. Before any clustering everybody gets the
  global arrays (plain FedAvg).
* **Identity**: node ids are random per run, so assignments are keyed by the ``partition-id`` the
  client reports in its train metrics (``node_partition`` maps this run's node ids to it).
* **Aggregation**: per cluster, with Flower's ``aggregate_arrayrecords`` (sample-weighted mean).
* **The loop's "global" arrays**: the sample-weighted mean of the cluster models, weights = the
  examples their clients trained on when each cluster last trained. It is what central
  evaluation measures and what an evaluating client the server cannot place receives; it is
  *not* a model anyone trains.
* **State**: :meth:`state_dict` / :meth:`load_state_dict` carry the cluster models, assignments
  and weights (JSON-able metadata + ArrayRecords), so checkpoints can resume a clustered run.
* **Results** (when the server attaches a run dir): ``clusters.jsonl`` (one line per round:
  number of clusters, sizes, partition -> cluster, each cluster model's central-test accuracy,
  events such as a clustering or a split) and ``dendrogram-r<round>.png`` when clustering happens.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from algorithms.clustering import weighted_average
from clients.cluster_pick import CANDIDATE_PREFIX, CLUSTER_ID_KEY, CLUSTER_IDS_KEY
from clients.data import load_central_test
from clients.identity import reply_partition_id
from clients.training import evaluate
from server.concept_shift import PLANTED_ARI, planted_ari
from server.strategies import ServerSetup, aggregate_client_metrics

CLUSTERS_FILE = "clusters.jsonl"


def to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def from_numpy(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def copy_arrays(arrays: ArrayRecord) -> ArrayRecord:
    return from_numpy({k: v.copy() for k, v in to_numpy(arrays).items()})


def reply_metrics(msg: Message) -> MetricRecord:
    return next(iter(msg.content.metric_records.values()))


class ClusterStrategy(FedAvg):
    """FedAvg with one model per cluster; subclasses decide how clusters form (see module doc)."""

    #: IFCA offers every cluster model to every node each round, not only to unplaced ones.
    offer_all_clusters: bool = False

    def __init__(self, setup: ServerSetup, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.setup = setup
        self.models: dict[int, ArrayRecord] = {}  # cluster id -> model; empty = global phase
        self.assignment: dict[int, int] = {}  # partition id -> cluster id
        self.cluster_weight: dict[int, float] = {}  # examples behind each cluster model
        self.next_cluster_id = 0
        self.node_partition: dict[int, int] = {}  # this run's node id -> partition id
        self._known_partitions: set[int] = set()  # partitions that replied before a checkpoint
        self.run_dir: Path | None = setup.run_dir  # where clusters.jsonl and dendrograms go
        self._sent_cluster: dict[int, int | None] = {}  # node -> cluster it got (None: global)
        self._sent_global: ArrayRecord | None = None
        self._events: list[dict] = []  # what happened this round (clustering, splits)
        self._central: tuple[np.ndarray, np.ndarray] | None = None

    # ---------------------------------------------------------------- hooks for subclasses
    def extra_train_config(self, server_round: int) -> dict[str, Any]:
        """Entries added to this round's train config."""
        return {}

    def before_aggregate(
        self, server_round: int, replies: list[Message], bases: dict[int, ArrayRecord]
    ) -> None:
        """Form / change clusters from this round's replies (``bases``: node id -> the model it
        started from). May rewrite ``self.models`` and ``self.assignment``."""

    def cluster_update(
        self, server_round: int, cid: int, start: ArrayRecord, members: list[Message]
    ) -> ArrayRecord:
        """The cluster's new model from its members' replies (``start``: the model they trained
        from). Default: their sample-weighted mean (FedAvg inside the cluster)."""
        return aggregate_arrayrecords([m.content for m in members], self.weighted_by_key)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- bookkeeping
    def new_cluster_id(self) -> int:
        cid = self.next_cluster_id
        self.next_cluster_id += 1
        return cid

    def set_clusters(self, models: dict[int, ArrayRecord], assignment: dict[int, int]) -> None:
        self.models, self.assignment = dict(models), dict(assignment)
        self.next_cluster_id = max(self.models, default=-1) + 1
        self.cluster_weight = {c: self.cluster_weight.get(c, 1.0) for c in self.models}

    def cluster_of_node(self, node_id: int) -> int | None:
        pid = self.node_partition.get(node_id)
        cid = self.assignment.get(pid) if pid is not None else None
        return cid if cid in self.models else None

    def cluster_sizes(self) -> dict[int, int]:
        sizes = dict.fromkeys(sorted(self.models), 0)
        for cid in self.assignment.values():
            if cid in sizes:
                sizes[cid] += 1
        return sizes

    def global_arrays(self, fallback: ArrayRecord) -> ArrayRecord:
        """Sample-weighted mean of the cluster models (``fallback`` before any clustering)."""
        if not self.models:
            return fallback
        ids = sorted(self.models)
        if len(ids) == 1:
            return self.models[ids[0]]
        mean = weighted_average(
            [to_numpy(self.models[c]) for c in ids], [self.cluster_weight.get(c, 1.0) for c in ids]
        )
        return from_numpy(mean)

    def log_event(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    # ---------------------------------------------------------------- instructions
    def _instruction(
        self, node_id: int, arrays: ArrayRecord, config: ConfigRecord, message_type: str
    ) -> Message:
        cfg = dict(config)
        cid = self.cluster_of_node(node_id)
        offer = message_type == MessageType.TRAIN and len(self.models) > 1
        offer = offer and (self.offer_all_clusters or cid is None)
        self._sent_cluster[node_id] = cid
        if offer:
            ids = sorted(self.models)
            content = RecordDict(
                {
                    "arrays": self.models[ids[0]],
                    "config": ConfigRecord({**cfg, CLUSTER_IDS_KEY: ids}),
                    **{f"{CANDIDATE_PREFIX}{c}": self.models[c] for c in ids[1:]},
                }
            )
        elif cid is not None:
            content = RecordDict(
                {"arrays": self.models[cid], "config": ConfigRecord({**cfg, CLUSTER_ID_KEY: cid})}
            )
        elif len(self.models) == 1:
            only = next(iter(self.models))
            self._sent_cluster[node_id] = only
            content = RecordDict(
                {"arrays": self.models[only], "config": ConfigRecord({**cfg, CLUSTER_ID_KEY: only})}
            )
        else:  # global phase, or an evaluating node nobody has placed: the global arrays
            content = RecordDict({"arrays": arrays, "config": ConfigRecord(cfg)})
        return Message(content=content, dst_node_id=node_id, message_type=message_type)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        config.update(self.extra_train_config(server_round))
        self._sent_global = arrays
        self._sent_cluster = {}
        self._events = []
        return [
            self._instruction(m.metadata.dst_node_id, arrays, config, MessageType.TRAIN)
            for m in sampled
        ]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sampled = list(super().configure_evaluate(server_round, arrays, config, grid))
        return [
            self._instruction(m.metadata.dst_node_id, arrays, config, MessageType.EVALUATE)
            for m in sampled
        ]

    # ---------------------------------------------------------------- aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            self._write_round(server_round)
            return None, None
        bases: dict[int, ArrayRecord] = {}
        for msg in valid:
            nid, metrics = msg.metadata.src_node_id, reply_metrics(msg)
            pid = reply_partition_id(msg)
            if pid is not None:
                self.node_partition[nid] = pid
            chosen = int(metrics.get(CLUSTER_ID_KEY, -1))
            cid = chosen if chosen >= 0 else self._sent_cluster.get(nid)
            if cid is not None and cid in self.models:
                bases[nid] = self.models[cid]
                if nid in self.node_partition:
                    self.assignment[self.node_partition[nid]] = cid
            else:
                bases[nid] = self._sent_global
        self.before_aggregate(server_round, valid, bases)

        if not self.models:  # global phase: plain FedAvg
            new_global = aggregate_arrayrecords([m.content for m in valid], self.weighted_by_key)
        else:
            by_cluster: dict[int, list[Message]] = defaultdict(list)
            for msg in valid:
                cid = self.assignment.get(self.node_partition.get(msg.metadata.src_node_id, -1))
                if cid is not None and cid in self.models:
                    by_cluster[cid].append(msg)
            for cid, msgs in by_cluster.items():
                self.models[cid] = self.cluster_update(server_round, cid, self.models[cid], msgs)
                self.cluster_weight[cid] = float(
                    sum(reply_metrics(m)[self.weighted_by_key] for m in msgs)
                )
            new_global = self.global_arrays(self._sent_global)

        metrics = aggregate_client_metrics([m.content for m in valid], self.weighted_by_key)
        metrics.pop(CLUSTER_ID_KEY, None)
        sizes = list(self.cluster_sizes().values()) or [len(self.node_partition)]
        metrics["num-clusters"] = max(len(self.models), 1)
        metrics["cluster-size-min"] = min(sizes)
        metrics["cluster-size-max"] = max(sizes)
        metrics.update(self._planted_ari())  # concept shift: do the clusters match its groups?
        self._write_round(server_round)
        return new_global, metrics

    # ---------------------------------------------------------------- results
    def _central_accuracy(self) -> dict[str, float]:
        if self._central is None:
            self._central = load_central_test(self.setup.scenario.data, self.setup.scenario.seed)
        x, y = self._central
        model = self.setup.model
        out = {}
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        for cid in sorted(self.models):
            model.load_state_dict(self.models[cid].to_torch_state_dict())
            out[str(cid)] = evaluate(model, x, y, torch.device("cpu"))[1]
        model.load_state_dict(saved)
        return out

    def _planted_ari(self) -> dict[str, float]:
        ari = planted_ari(self.setup.scenario, self.assignment) if self.models else None
        return {} if ari is None else {PLANTED_ARI: ari}

    def _write_round(self, server_round: int) -> None:
        if self.run_dir is None:
            return
        record = {
            "round": server_round,
            "num_clusters": max(len(self.models), 1),
            "cluster_sizes": {str(c): n for c, n in self.cluster_sizes().items()},
            "assignment": {str(p): c for p, c in sorted(self.assignment.items())},
            "cluster_central_accuracy": self._central_accuracy() if self.models else {},
            **self._planted_ari(),
            "events": self._events,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / CLUSTERS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"meta": JSON-able dict, "models": {cluster id (str): ArrayRecord}}``."""
        return {
            "meta": {
                "assignment": {str(p): c for p, c in self.assignment.items()},
                "cluster_weight": {str(c): w for c, w in self.cluster_weight.items()},
                "next_cluster_id": self.next_cluster_id,
                "known_partitions": sorted(set(self.node_partition.values())),
                "extra": self.extra_state(),
            },
            "models": {str(c): m for c, m in self.models.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state["meta"]
        self.models = {int(c): m for c, m in state["models"].items()}
        self.assignment = {int(p): int(c) for p, c in meta["assignment"].items()}
        self.cluster_weight = {int(c): float(w) for c, w in meta["cluster_weight"].items()}
        self.next_cluster_id = int(meta["next_cluster_id"])
        self._known_partitions = {int(p) for p in meta.get("known_partitions", [])}
        self.load_extra_state(meta.get("extra", {}))

    def adopt_nodes(self, node_pid: dict[int, int]) -> None:
        """After a resume: this run's node ids of the partitions that had replied before the
        checkpoint (``node_pid`` from the server's partition query), so they get their cluster's
        model at once, as in the uninterrupted run, instead of the global model or every cluster."""
        self.node_partition = {
            nid: pid for nid, pid in node_pid.items() if pid in self._known_partitions
        }
