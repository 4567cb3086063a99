"""Server of ``lora_sparse``: FedAvg whose aggregation understands sparse LoRA adapter updates.

See ``edge/lora.py`` for the protocol. ``aggregate_train`` decodes every sparse reply (values at
int32 indices, scattered into dense zeros — the union of all clients' indices is what ends up
non-zero; one values and one indices array per reply, offset into the adapters concatenated in
a fixed order), forms each client's weight update ΔW_k = (α/r)·B_k·A_k and averages the deltas of all
replies (dense replies of backprop/tpSGD clients contribute W_k − W) weighted by ``num-examples``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from torch.nn import functional as F

from algorithms.lora_sparse import (
    PACKED_INDICES,
    PACKED_VALUES,
    LoraSparseConfig,
    is_sparse_encoded,
    unpack_sparse,
)
from clients.data import load_proxy
from clients.seeding import derive_seed
from clients.training import batches
from edge.lora import initial_factors, linear_names
from server.strategies import ServerSetup, fedavg_kwargs


def is_sparse_reply(arrays: ArrayRecord) -> bool:
    return is_sparse_encoded(arrays.keys())


def lora_weight_deltas(
    arrays: ArrayRecord, start: dict[str, torch.Tensor], names: list[str], scaling: float
) -> dict[str, torch.Tensor]:
    """Decode one sparse reply into ``{"<layer>.weight": (α/r)·B·A}`` with A = A₀ + ΔA, B = ΔB."""
    tensors = arrays.to_torch_state_dict()
    deltas = unpack_sparse(
        tensors[PACKED_VALUES], tensors[PACKED_INDICES], {k: v.shape for k, v in start.items()}
    )
    out = {}
    for name in names:
        a = start[f"{name}.lora_A"] + deltas[f"{name}.lora_A"]
        b = start[f"{name}.lora_B"] + deltas[f"{name}.lora_B"]
        out[f"{name}.weight"] = scaling * b @ a
    return out


class LoraSparseFedAvg(FedAvg):
    """FedAvg over weight deltas, where LoRA clients' deltas arrive as sparse adapter updates."""

    def __init__(self, setup: ServerSetup, cfg: LoraSparseConfig) -> None:
        super().__init__(**fedavg_kwargs(setup.scenario))
        self.names = linear_names(setup.model)
        self.start = initial_factors(setup.model, cfg, setup.scenario.seed)
        self.scaling = cfg.alpha / cfg.rank
        self.current: dict[str, torch.Tensor] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Flower's reply check demands identical keys; sparse and dense replies differ by design.
        valid = [msg for msg in replies if not msg.has_error()]
        if not valid or self.current is None:
            return None, None
        contents = [msg.content for msg in valid]
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in self.current.items()}
        weight_sum = 0.0
        for content in contents:
            weight = float(
                content.metric_records[next(iter(content.metric_records))][self.weighted_by_key]
            )
            arrays = content.array_records[next(iter(content.array_records))]
            if is_sparse_reply(arrays):
                deltas = lora_weight_deltas(arrays, self.start, self.names, self.scaling)
            else:
                sent = arrays.to_torch_state_dict()
                deltas = {k: sent[k] - self.current[k] for k in self.current}
            for key, delta in deltas.items():
                total[key] += weight * delta.double()
            weight_sum += weight
        new_state = {k: (v + (total[k] / weight_sum).to(v.dtype)) for k, v in self.current.items()}
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord(torch_state_dict=new_state), metrics


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
