"""The engines: each runs the *same* ServerApp (``server.app:app``) and ClientApp (``clients.app:app``).

==============  ====================================================================================
``inprocess``   :mod:`fedge.engines.inprocess`: a Grid calling the ClientApp in this process (default)
``packed``      :mod:`fedge.engines.packed`: the same grid, a round's training messages trained at once
``ray``         :mod:`fedge.engines.ray`: Flower's simulation runtime behind a loopback SuperLink
``deployment``  :mod:`fedge.engines.deployment`: a SuperLink plus one SuperNode per client on loopback
==============  ====================================================================================

:mod:`fedge.engines.processes` starts and stops the Flower processes the last two (and
``fedge deploy``) need; :mod:`fedge.engines.submit` hands them the scenario through ``flwr run``.
All pass the scenario to the apps through ``run_config`` and let the ServerApp write the results.
"""

from __future__ import annotations

from pathlib import Path

from fedge.engines.deployment import run_deployment
from fedge.engines.errors import EngineError
from fedge.engines.inprocess import SERVER_NODE_ID, InProcessGrid, run_inprocess
from fedge.engines.processes import (
    OFFLINE_ENV,
    ProcessGroup,
    find_executable,
    flower_processes,
    free_port,
    wait_for_port,
)
from fedge.engines.ray import resolve_ray_address, run_ray
from scenarios.config import Scenario

__all__ = [
    "OFFLINE_ENV",
    "SERVER_NODE_ID",
    "EngineError",
    "InProcessGrid",
    "ProcessGroup",
    "find_executable",
    "flower_processes",
    "free_port",
    "resolve_ray_address",
    "run_deployment",
    "run_engine",
    "run_inprocess",
    "run_ray",
    "wait_for_port",
]


def run_engine(
    scenario: Scenario, run_dir: Path, show_progress: bool = True, resume: bool = False
) -> dict:
    """Run ``scenario`` on the engine it names; results land in ``run_dir``; return the summary.
    ``resume=True`` continues ``run_dir`` from its last checkpoint."""
    if scenario.engine.name in ("inprocess", "packed"):
        return run_inprocess(scenario, run_dir, show_progress=show_progress, resume=resume)
    if scenario.engine.name == "ray":
        return run_ray(scenario, run_dir, resume)
    if scenario.engine.name == "deployment":
        return run_deployment(scenario, run_dir, resume)
    raise ValueError(f"unknown engine {scenario.engine.name!r}")
