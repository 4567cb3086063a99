"""Which local trainer a client runs, found by name and imported only when used.

An algorithm's own trainer is named by its declaration (``client_trainer``, see
``algorithms/base.py``); the edge trainers below can be picked per client in ``[edge] trainers``.
"""

from __future__ import annotations

from collections.abc import Callable

from clients.training import TrainJob, TrainResult
from scenarios.config import Scenario
from scenarios.registry import UnknownAlgorithm, algorithm_config, algorithm_names, load_object

Trainer = Callable[[TrainJob], TrainResult]

# Trainers that are not an algorithm's own: backprop-free and LoRA clients (edge/).
EDGE_TRAINERS: dict[str, str] = {
    "tpsgd": "edge.tpsgd:train_tpsgd",
    "forward_forward": "edge.forward_forward:train_forward_forward",
    "lora": "edge.lora:train_lora",
}


def trainer_names() -> list[str]:
    """Every name ``[edge] trainers`` accepts: the edge trainers and every algorithm's own."""
    return sorted(set(EDGE_TRAINERS) | set(algorithm_names()))


def get_trainer(name: str) -> Trainer:
    """The local trainer called ``name``: an edge trainer, or algorithm ``name``'s own."""
    if name in EDGE_TRAINERS:
        return load_object(EDGE_TRAINERS[name])
    try:
        dotted = getattr(algorithm_config(name), "client_trainer", "")
    except UnknownAlgorithm:
        dotted = ""
    if not dotted:
        raise ValueError(f"no local trainer {name!r}; known: {', '.join(trainer_names())}")
    return load_object(dotted)


def trainer_for(scenario: Scenario, partition_id: int) -> Trainer:
    """The local trainer of client ``partition_id`` (the algorithm's own, unless the scenario says otherwise).

    ``[edge] trainers`` picks per client: an exact id beats a range, a range beats ``"*"``.
    """
    return get_trainer(trainer_name_for(scenario, partition_id))


def trainer_name_for(scenario: Scenario, partition_id: int) -> str:
    """Name of the trainer client ``partition_id`` runs (see :func:`trainer_for`)."""
    chosen = scenario.edge.trainers
    if str(partition_id) in chosen:
        return chosen[str(partition_id)]
    for key, name in chosen.items():
        if "-" in key:
            lo, hi = (int(p) for p in key.split("-"))
            if lo <= partition_id <= hi:
                return name
    return chosen.get("*", scenario.algorithm.name)
