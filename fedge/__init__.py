"""fedge: federated and edge learning simulation on Flower, as a library and a command line.

    import fedge
    run = fedge.run("scenarios/quickstart.toml", overrides={"num_rounds": 2})
    print(run.summary["final_accuracy"])

:mod:`fedge.api` holds the library (``run``, ``resume``, ``load_run``, ``sweep``, ``validate``);
the ``fedge`` command is a thin layer over it. Names are imported on first use, so ``import fedge``
stays cheap (no torch, no Flower).

Nothing below imports this package: ``scenarios/`` (schema, results format) and ``algorithms/`` (math)
are the ground floor, ``clients/``, ``edge/`` and ``server/`` (the Flower apps) stand on them, and
this package drives the apps.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "run": "fedge.api",
    "resume": "fedge.api",
    "load_run": "fedge.api",
    "sweep": "fedge.api",
    "validate": "fedge.api",
    "resolve_scenario": "fedge.api",
    "Run": "fedge.api",
    "Sweep": "fedge.api",
    "RunFailed": "fedge.api",
    "Scenario": "scenarios.config",
    "ScenarioError": "scenarios.config",
    "DataError": "clients.datasets",
    "EngineError": "fedge.engines.errors",
}

__all__ = [
    "DataError",
    "EngineError",
    "Run",
    "RunFailed",
    "Scenario",
    "ScenarioError",
    "Sweep",
    "load_run",
    "resolve_scenario",
    "resume",
    "run",
    "sweep",
    "validate",
]

if TYPE_CHECKING:
    from clients.datasets import DataError
    from fedge.api import (
        Run,
        RunFailed,
        Sweep,
        load_run,
        resolve_scenario,
        resume,
        run,
        sweep,
        validate,
    )
    from fedge.engines.errors import EngineError
    from scenarios.config import Scenario, ScenarioError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
