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
    """The local trainer of client ``partition_id`` (the algorithm's own, unless the scenario says otherwise)."""
    return get_trainer(scenario.algorithm.name)


def _load_builtin_trainers() -> None:
    # Imported lazily: each module registers itself on import.
    from clients import fedavg, fedlaw, fedld, fedprox  # noqa: F401
