"""FedAvg with its mean replaced by an update-space robust rule (``robustness.aggregation =
"geometric_median" | "centered_clipping"``, fedavg/fedprox): the rules of
``algorithms/robust_rules.py`` applied to the round's updates Δᵢ = wᵢ − w_sent.

Sampling, messages and metric averaging are FedAvg's; integer buffers get FedAvg's weighted mean.
The geometric median is weighted by ``num-examples`` (RFA's αᵢ); centered clipping is unweighted,
as in its paper, and starts each round at the previous round's aggregate update (the server's
history; zero in the first round), kept in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from algorithms.robust_rules import centered_clipping, geometric_median
from clients.arrays import as_numpy
from server.update_stack import flatten, float_keys, single_record, unflatten

UPDATE_RULES = ("geometric_median", "centered_clipping")


class UpdateRuleFedAvg(FedAvg):
    """FedAvg aggregating the updates with ``rule`` (one of :data:`UPDATE_RULES`)."""

    def __init__(
        self, rule: str, clip_radius: float = 0.0, clip_iterations: int = 1, **fedavg_args
    ) -> None:
        super().__init__(**fedavg_args)
        if rule not in UPDATE_RULES:
            raise ValueError(f"unknown update rule {rule!r}; known: {', '.join(UPDATE_RULES)}")
        self.rule = rule
        self.clip_radius = clip_radius
        self.clip_iterations = clip_iterations
        self.history: torch.Tensor | None = None  # centered clipping's previous aggregate
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or self._global is None:
            return averaged, metrics
        valid = [r for r in replies if not r.has_error()]
        sent = as_numpy(self._global)
        keys = float_keys(sent)
        base = flatten(sent, keys)
        updates = torch.stack(
            [flatten(as_numpy(single_record(r.content)[1]), keys) - base for r in valid]
        )
        if self.rule == "geometric_median":
            weights = torch.tensor(
                [float(r.content["metrics"][self.weighted_by_key]) for r in valid],
                dtype=torch.float64,
            )
            aggregate = geometric_median(updates, weights)
        else:
            center = torch.zeros_like(base) if self.history is None else self.history
            radius = self.clip_radius if self.clip_radius > 0 else None
            aggregate = centered_clipping(updates, center, radius, self.clip_iterations)
            self.history = aggregate
        out = dict(as_numpy(averaged))
        out.update(unflatten(base + aggregate, sent, keys))
        record = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()})
        return record, metrics

    # checkpointed with the run (server/checkpoint.py asks strategies for these)
    def state_dict(self) -> dict:
        return {} if self.history is None else {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state.get("history")
