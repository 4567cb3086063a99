"""Server of ``lora_sparse``: FedAvg over LoRA adapters with sparse packets both ways.

See ``edge/lora.py`` for the protocol and ``algorithms/lora_sparse.py`` for the wire format.
The server holds the frozen base W, the global adapters G and the broadcast copy H that every
synced node holds. Each round:

* **downlink** (:meth:`LoraSparseFedAvg.downlink`): for a node in sync the instruction's ``arrays``
  is one packet — empty when it already holds H, the last broadcast packet when one round behind,
  H whole otherwise — plus ``lora-base`` when its copy of the base is stale. A node the server
  does not know in sync (first contact, a failure, a resumed server) gets the merged model as
  ``arrays`` (any trainer can answer it) with the base and H beside it (at version 0 the merged
  model is the base and H the seeded start: nothing more). Nodes that replied with a dense model (backprop / tpSGD clients in the same federation)
  get the merged model W + (α/r)·B·A as plain FedAvg would send it.
* **aggregate**: G ← G + Σ_lora n_k Δ_k / Σ n_k (Δ_k a client's decoded adapter update; A and B
  averaged separately, as FedIT/CELLM do) and W ← W + Σ_dense n_k (W_k − W_sent) / Σ n_k.
* **broadcast**: the packet is the top-k (``downlink_density``) of G − H in ``value_type`` with
  server-side error feedback (H ← H + what was sent); at density 1 in float32 it is exact.

The model the server evaluates, checkpoints and exports is W + (α/r)·B_G·A_G.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from torch.nn import functional as F

from algorithms.lora_sparse import (
    BASE_KEY,
    PACKET_KEY,
    REPLACE_KEY,
    SYNC_KEY,
    LoraSparseConfig,
    decode_packet,
    encode_packet,
    flatten,
    is_sparse_encoded,
    layout_topk,
    unflatten,
)
from clients.data import load_proxy
from clients.identity import reply_partition_id
from clients.seeding import derive_seed
from clients.training import batches
from edge.lora import BASE_MISSING, initial_factors, linear_names, merged_state
from server.strategies import ServerSetup, fedavg_kwargs


def is_sparse_reply(arrays: ArrayRecord) -> bool:
    return is_sparse_encoded(arrays.keys())


def broadcast_indices(diff: torch.Tensor, shapes: dict, density: float) -> torch.Tensor | None:
    """Entries of G − H to broadcast: the changed ones, at most the top-k per tensor."""
    changed = diff != 0
    if density >= 1.0:
        return None if bool(changed.all()) else changed.nonzero().reshape(-1)
    chosen = layout_topk(diff, shapes, density)
    return chosen[changed[chosen]]


class LoraSparseFedAvg(FedAvg):
    """FedAvg over LoRA adapters (sparse packets up and down) and dense deltas of dense clients."""

    def __init__(self, setup: ServerSetup, cfg: LoraSparseConfig) -> None:
        super().__init__(**fedavg_kwargs(setup.scenario))
        self.cfg = cfg
        self.names = linear_names(setup.model)
        start = initial_factors(setup.model, cfg, setup.scenario.seed)
        self.shapes = {k: v.shape for k, v in start.items()}
        self.n = sum(v.numel() for v in start.values())
        self.base = {k: v.detach().cpu().clone() for k, v in setup.model.state_dict().items()}
        self.base_version = 0
        self.global_flat = flatten(start)  # G
        self.broadcast_flat = self.global_flat.clone()  # H: what synced nodes hold
        self.version = 0
        self.last_packet: np.ndarray | None = None  # H(version − 1) → H(version)
        # node id -> (adapter version or None when unknown, base version) it holds
        self.node_sync: dict[int, tuple[int | None, int]] = {}
        self.dense_nodes: set[int] = set()
        self.dense_partitions: set[int] = set()  # kept in checkpoints: node ids change on resume
        self.sent_model: dict[str, torch.Tensor] = {}
        self.empty_packet = encode_packet(
            torch.zeros(self.n), torch.zeros(0, dtype=torch.long), "float32"
        )[0]

    # ------------------------------------------------------------------ model views
    def model_state(self, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The merged model W + (α/r)·B·A of ``flat`` (default: the global adapters G)."""
        flat = self.global_flat if flat is None else flat
        return merged_state(self.base, unflatten(flat, self.shapes), self.names, self.cfg.scaling)

    # ------------------------------------------------------------------ downlink
    def downlink(self, node_id: int, config: ConfigRecord) -> RecordDict:
        """The content sent to ``node_id`` this round (see the module docstring)."""
        if node_id in self.dense_nodes:
            return RecordDict(
                {"arrays": ArrayRecord(torch_state_dict=self.sent_model), "config": config}
            )
        adapters, base = self.node_sync.get(node_id, (None, -1))
        content: dict[str, Any] = {"config": config}
        sync: dict[str, Any] = {"to": self.version, "base-version": self.base_version}
        if adapters is None:
            # A node the server does not know in sync (first contact, failed, resumed) gets the
            # merged model as "arrays" — what any trainer can answer, dense clients included, and
            # what reply validation compares a dense reply with — plus what a LoRA node needs.
            content["arrays"] = ArrayRecord(torch_state_dict=self.sent_model)
            sync["arrays"] = "model"
            if self.version == 0:  # H = (A₀, B₀ = 0): the merged model *is* the base
                sync["from"], sync["base-in-arrays"] = 0, True
            else:
                sync["from"] = -1
                packet = encode_packet(self.broadcast_flat, None, "float32")[0]
                content[REPLACE_KEY] = ArrayRecord({PACKET_KEY: Array(packet)})
                if base != self.base_version:
                    content[BASE_KEY] = ArrayRecord(torch_state_dict=self.base)
        else:
            if base != self.base_version:
                content[BASE_KEY] = ArrayRecord(torch_state_dict=self.base)
            if adapters == self.version:
                sync["from"], packet = self.version, self.empty_packet
            elif adapters == self.version - 1 and self.last_packet is not None:
                sync["from"], packet = adapters, self.last_packet
            else:
                sync["from"] = -1
                packet = encode_packet(self.broadcast_flat, None, "float32")[0]
            # The packet travels as the instruction's "arrays" (empty when the node is in sync),
            # so the reply's "arrays" answers it as in any strategy (reply validation pairs them).
            content["arrays"] = ArrayRecord({PACKET_KEY: Array(packet)})
            sync["arrays"] = "packet"
        content[SYNC_KEY] = ConfigRecord(sync)
        self.node_sync[node_id] = (self.version, self.base_version)  # confirmed unless it fails
        return RecordDict(content)

    def _messages(self, messages: Iterable[Message], message_type: str) -> list[Message]:
        self.sent_model = self.model_state(self.broadcast_flat)
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            config = msg.content.config_records.get(self.configrecord_key, ConfigRecord())
            out.append(
                Message(
                    content=self.downlink(node, config),
                    message_type=message_type,
                    dst_node_id=node,
                )
            )
        return out

    def _forget_failed(self, replies: list[Message]) -> None:
        """A failed node may not hold what we sent: resend its adapters (and base if it says so)."""
        for msg in replies:
            if not msg.has_error():
                continue
            node = msg.metadata.src_node_id
            if node in self.node_sync:
                _, base = self.node_sync[node]
                lost_base = BASE_MISSING in (msg.error.reason or "")
                self.node_sync[node] = (None, -1 if lost_base else base)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(
            super().configure_train(server_round, arrays, config, grid), MessageType.TRAIN
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(
            super().configure_evaluate(server_round, arrays, config, grid), MessageType.EVALUATE
        )

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._forget_failed(replies)
        # Flower's reply check demands identical keys; sparse and dense replies differ by design.
        valid = [msg for msg in replies if not msg.has_error()]
        if not valid:
            return None, None
        lora_total = torch.zeros(self.n, dtype=torch.float64)
        dense_total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in self.base.items()}
        weight_sum, any_dense = 0.0, False
        for msg in valid:
            content = msg.content
            weight = float(
                content.metric_records[next(iter(content.metric_records))][self.weighted_by_key]
            )
            arrays = content.array_records[next(iter(content.array_records))]
            if is_sparse_reply(arrays):
                lora_total += weight * decode_packet(arrays[PACKET_KEY].numpy(), self.n).double()
            else:
                self.dense_nodes.add(msg.metadata.src_node_id)
                if (pid := reply_partition_id(msg)) is not None:
                    self.dense_partitions.add(pid)
                sent = arrays.to_torch_state_dict()
                for key, ref in self.sent_model.items():
                    dense_total[key] += weight * (sent[key] - ref).double()
                any_dense = True
            weight_sum += weight
        self.global_flat = self.global_flat + (lora_total / weight_sum).float()
        if any_dense:
            self.base = {
                k: v + (dense_total[k] / weight_sum).to(v.dtype) for k, v in self.base.items()
            }
            self.base_version += 1
        self._broadcast_step()
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(torch_state_dict=self.model_state()), metrics

    def _broadcast_step(self) -> None:
        diff = self.global_flat - self.broadcast_flat
        indices = broadcast_indices(diff, self.shapes, self.cfg.broadcast_density)
        packet, sent = encode_packet(diff, indices, self.cfg.value_type)
        self.broadcast_flat = self.broadcast_flat + sent
        self.last_packet = packet
        self.version += 1

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._forget_failed(replies)
        return super().aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Base, G, H, versions and the last packet; which node holds what is not kept (after a
        resume every node gets its adapters — and the base — again)."""
        return {
            "base": ArrayRecord(torch_state_dict=self.base),
            "global": self.global_flat.clone(),
            "broadcast": self.broadcast_flat.clone(),
            "version": self.version,
            "base_version": self.base_version,
            "last_packet": self.last_packet,
            "dense_partitions": sorted(self.dense_partitions),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base = state["base"].to_torch_state_dict()
        self.global_flat = state["global"]
        self.broadcast_flat = state["broadcast"]
        self.version = int(state["version"])
        self.base_version = int(state["base_version"])
        self.last_packet = state["last_packet"]
        self.node_sync, self.dense_nodes = {}, set()
        self.dense_partitions = {int(p) for p in state.get("dense_partitions", [])}

    def adopt_nodes(self, node_pid: dict[int, int]) -> None:
        """After a resume: the nodes (this run's ids) serving partitions that replied densely, so
        they get the merged model, not a LoRA packet a dense trainer cannot answer in kind."""
        self.dense_nodes = {nid for nid, pid in node_pid.items() if pid in self.dense_partitions}


def pretrain_base(setup: ServerSetup, cfg: LoraSparseConfig) -> None:
    """Train ``setup.model`` in place on the server's proxy set: the frozen base of every client."""
    scenario = setup.scenario
    x, y = load_proxy(scenario.data, scenario.seed)  # clear error when proxy_fraction = 0
    model = setup.model.to(setup.device).train()
    opt = torch.optim.SGD(
        model.parameters(), lr=scenario.train.lr, momentum=scenario.train.momentum
    )
    gen = torch.Generator().manual_seed(derive_seed(scenario.seed, 0x10A5))
    for _ in range(cfg.pretrain_epochs):
        for xb, yb in batches(
            np.asarray(x), np.asarray(y), scenario.train.batch_size, gen, setup.device
        ):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.to("cpu")


def make_lora_sparse(setup: ServerSetup) -> Strategy:
    cfg = setup.scenario.algorithm
    assert isinstance(cfg, LoraSparseConfig)
    if cfg.pretrain_epochs > 0:
        pretrain_base(setup, cfg)
    return LoraSparseFedAvg(setup, cfg)
