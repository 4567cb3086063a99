"""Who this node is and what it runs: the scenario from ``run_config``, the partition id from
``node_config``, the torch device. Shared by the ClientApp and its mods."""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import Context

from scenarios.config import RUN_CONFIG_KEY, Scenario


@lru_cache(maxsize=8)
def _scenario(raw: str) -> Scenario:
    return Scenario.from_run_config({RUN_CONFIG_KEY: raw})


def node_scenario(context: Context) -> Scenario:
    return _scenario(str(context.run_config.get(RUN_CONFIG_KEY, "")))


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "engine.device='cuda' but CUDA is not available here; use 'auto' or 'cpu'"
            )
        return torch.device("cuda")
    return torch.device("cpu")


def partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise KeyError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from None
