"""Registry of local trainers, one per algorithm name (the client side of each algorithm)."""

from __future__ import annotations

from collections.abc import Callable

from clients.training import TrainJob, TrainResult
from scenarios.config import Scenario

Trainer = Callable[[TrainJob], TrainResult]
TRAINERS: dict[str, Trainer] = {}


def register_trainer(name: str) -> Callable[[Trainer], Trainer]:
    """Decorator: the local trainer used when the scenario's ``algorithm.name`` is ``name``."""

    def deco(fn: Trainer) -> Trainer:
        TRAINERS[name] = fn
        return fn

    return deco


def get_trainer(name: str) -> Trainer:
    _load_builtin_trainers()
    if name not in TRAINERS:
        raise ValueError(
            f"no local trainer for algorithm {name!r}; known: {', '.join(sorted(TRAINERS))}"
        )
    return TRAINERS[name]


def trainer_for(scenario: Scenario, partition_id: int) -> Trainer:
    """The local trainer of client ``partition_id`` (the algorithm's own, unless the scenario says otherwise).

    ``[edge] trainers`` picks per client: an exact id beats a range, a range beats ``"*"``.
    """
    name = trainer_name_for(scenario, partition_id)
    return get_trainer(name)


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


def _load_builtin_trainers() -> None:
    # Imported lazily: each module registers itself on import.
    from clients import (  # noqa: F401
        cfl,
        clustered,
        fedavg,
        fedlaw,
        fedld,
        fedprox,
        ifca,
        perfedavg,
    )
    from edge import forward_forward, lora, tpsgd  # noqa: F401
