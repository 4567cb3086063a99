"""What a strategy factory gets (:class:`ServerSetup`), how the scenario's algorithm becomes its
Flower strategy, and the constructor arguments every FedAvg-family strategy shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from clients.data import DatasetInfo
from clients.identity import DEVICE_INDEX, PARTITION_ID
from scenarios.config import Scenario
from scenarios.registry import load_object

# Identifiers that must not be averaged into the round's metrics. fedge's own clients send theirs
# in a separate ConfigRecord (clients/identity.py); some stock Flower clients put a partition id
# into their metrics, so the aggregate drops these keys too.
CLIENT_ID_KEYS = (PARTITION_ID, DEVICE_INDEX)


@dataclass(frozen=True)
class ServerSetup:
    """What a strategy factory may need: the scenario, the data's shape and a model template."""

    scenario: Scenario
    info: DatasetInfo
    model: torch.nn.Module  # holds the initial weights; strategies that need a forward pass use it
    device: torch.device
    run_dir: Path | None = (
        None  # where the run's files go; strategies may write their own logs there
    )


StrategyFactory = Callable[[ServerSetup], Strategy]


def build_strategy(setup: ServerSetup) -> Strategy:
    """The strategy of the scenario's algorithm, from the factory its declaration names
    (``server_factory``, see ``algorithms/base.py``); imports that algorithm's server module only."""
    algorithm = setup.scenario.algorithm
    dotted = getattr(type(algorithm), "server_factory", "")
    if not dotted:
        raise ValueError(
            f"algorithm {algorithm.name!r} declares no server side; give its config class "
            "`server_factory: ClassVar[str] = 'package.module:make_strategy'`"
        )
    factory: StrategyFactory = load_object(dotted)
    return factory(setup)


def aggregate_client_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Flower's weighted metric average (``aggregate_metricrecords``: the same sums in the same
    order, so the same values), minus per-client identifiers; it reads the records directly
    rather than through ``RecordDict.metric_records``, a synced copy per call (~6 µs a reply)."""
    metric_records = [[r for r in rd.values() if isinstance(r, MetricRecord)] for rd in records]
    weights = [found[0][weighting_metric_name] for found in metric_records]
    total_weight = sum(weights)
    factors = [w / total_weight for w in weights]
    merged: dict = {}
    for found, weight in zip(metric_records, factors, strict=True):
        for record in found:
            for key, value in record.items():
                if key == weighting_metric_name:
                    continue
                if key not in merged:
                    merged[key] = (
                        [v * weight for v in value] if isinstance(value, list) else value * weight
                    )
                elif isinstance(value, list):
                    merged[key] = [c + v * weight for c, v in zip(merged[key], value, strict=True)]
                else:
                    merged[key] = merged[key] + value * weight
    for key in CLIENT_ID_KEYS:
        merged.pop(key, None)
    return MetricRecord(merged)


def fedavg_kwargs(scenario: Scenario) -> dict[str, Any]:
    """Constructor arguments shared by every FedAvg-family strategy, from the scenario."""
    fed = scenario.federation
    return {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": fed.min_train_clients,
        "min_evaluate_nodes": 1,
        "min_available_nodes": scenario.data.num_clients,
        "train_metrics_aggr_fn": aggregate_client_metrics,
        "evaluate_metrics_aggr_fn": aggregate_client_metrics,
    }
