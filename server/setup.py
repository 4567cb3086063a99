"""A scenario becomes its run objects here, once: device, dataset shape, model, the algorithm's
strategy, the round plugins, and a check that every client can be served (its data partition and
its trainer). ``fedge validate``, the CLI's check before it starts Flower processes, and the
ServerApp all call :func:`build_run`; the in-process engine builds a run exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.serverapp.strategy import Strategy

from clients.data import dataset_info, load_client_data
from clients.models import build_model
from clients.node import resolve_device
from clients.seeding import seed_everything
from clients.trainers import get_trainer, trainer_name_for, trainer_names
from scenarios.config import Scenario, did_you_mean
from server.client_state import ClientStateKeeper
from server.deadline import DeviceClockPlugin
from server.identity import IdentityGuard
from server.omniscient_attack import OMNISCIENT_KINDS, OmniscientAttack
from server.plugins import RoundPlugin
from server.preaggregation import UpdateTransform, warn_small_federation
from server.ray_guard import RayNodeGuard
from server.strategies import ServerSetup, build_strategy
from server.validation import ReplyValidator


@dataclass(frozen=True)
class BuiltRun:
    """What the round loop needs, built from one scenario."""

    setup: ServerSetup
    strategy: Strategy
    plugins: list[RoundPlugin]


def build_plugins(setup: ServerSetup) -> list[RoundPlugin]:
    """The round plugins a scenario asks for, in the order they filter replies."""
    # first: a reply claiming another node's partition reaches no other plugin (server/identity.py)
    plugins: list[RoundPlugin] = [IdentityGuard(setup.scenario.data.num_clients)]
    if setup.scenario.robustness.checkpoint:
        # next: it strips the client-state record before any other plugin sees a reply
        plugins.append(ClientStateKeeper())
    if setup.scenario.engine.name == "ray":
        plugins.append(RayNodeGuard(setup.run_dir))  # a dead Ray node stops the run (resumable)
    if setup.scenario.devices is not None:
        plugins.append(DeviceClockPlugin(setup.scenario))
    if setup.scenario.attack.kind in OMNISCIENT_KINDS:
        # simulation only: attackers shown the round's honest updates, before any check
        plugins.append(OmniscientAttack.from_scenario(setup.scenario))
    if setup.scenario.robustness.validate_replies:
        plugins.append(ReplyValidator.from_setup(setup))
    if UpdateTransform.wanted(setup.scenario):
        plugins.append(UpdateTransform(setup))  # after validation: it reads valid replies only
    return plugins


def check_clients(scenario: Scenario) -> None:
    """Fail now, not in round 1, when a client cannot be served: the partitions cannot be made
    (partitioning is cached per process, so the in-process clients reuse it) or a client's
    trainer is unknown."""
    load_client_data(scenario.data, scenario.seed, 0)
    for selector, name in scenario.edge.trainers.items():
        try:
            get_trainer(name)
        except ValueError:
            known = trainer_names()
            raise ValueError(
                f"edge.trainers[{selector!r}]: unknown trainer {name!r}"
                f"{did_you_mean(name, known)}; known: {', '.join(known)}"
            ) from None
    for name in sorted(
        {trainer_name_for(scenario, pid) for pid in range(scenario.data.num_clients)}
    ):
        get_trainer(name)  # the algorithm's own trainer, for clients no selector covers


def build_run(scenario: Scenario, run_dir: Path | None = None) -> BuiltRun:
    """Seed, then build the run's objects; raises ``ValueError`` (or ``DataError``) naming the
    problem before anything is written."""
    seed_everything(scenario.seed)
    try:
        device = resolve_device(scenario.engine.device)
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    info = dataset_info(scenario.data)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    setup = ServerSetup(scenario, info, model, device, run_dir)
    strategy = build_strategy(setup)
    check_clients(scenario)
    warn_small_federation(scenario)
    return BuiltRun(setup, strategy, build_plugins(setup))
