"""The ``ray`` engine: Flower's simulation runtime (Ray) behind a loopback SuperLink, the app
submitted with ``flwr run`` as ``flwr run`` users do, client resources from the scenario."""

from __future__ import annotations

import socket
from pathlib import Path

from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

from fedge.engines.errors import EngineError
from fedge.engines.processes import find_executable, flower_processes, free_port, wait_for_port
from fedge.engines.submit import submit_app
from scenarios.config import Scenario


def resolve_ray_address(address: str) -> str:
    """The ``RAY_ADDRESS`` the simulation runtime gets for ``engine.ray_address``.

    Flower's Ray backend calls ``ray.init()`` without an address, and Ray then reads
    ``RAY_ADDRESS``; unset, it would silently join whatever cluster ``ray start`` last made on this
    machine. So an empty ``ray_address`` pins ``local`` (a private runtime, as the engine always
    meant), ``HOST:PORT`` is checked to be listening, and ``auto`` is resolved here so a missing
    cluster fails now with a message instead of inside the simulation process.
    """
    if not address:
        return "local"
    if address.startswith("ray://"):
        return address  # Ray Client: Ray itself reports an unreachable server
    if address == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:
            found = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            found = None
        if not found:
            raise EngineError(
                "engine.ray_address='auto' but no Ray cluster runs on this machine: start one "
                "with `ray start --head --port 6379` (and `ray start --address HEAD:6379` on the "
                "other machines), or give its address as engine.ray_address='HOST:PORT'"
            )
        return found
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.settimeout(5)
        if s.connect_ex((host, int(port))) != 0:
            raise EngineError(
                f"engine.ray_address={address!r}: nothing listens there. Start the head node "
                f"with `ray start --head --port {port}` on {host} (and `ray start --address "
                f"{address}` on the other machines), or fix the address"
            )
    return address


def run_ray(scenario: Scenario, run_dir: Path, resume: bool = False) -> dict:
    """Flower's simulation runtime (Ray) behind a loopback SuperLink, driven by ``flwr run``; on
    a private local Ray runtime, or joining the cluster at ``engine.ray_address``."""
    eng = scenario.engine
    ray_address = resolve_ray_address(eng.ray_address)
    with flower_processes(run_dir / "logs") as group:
        # inherited by the SuperLink's simulation process, whose Ray backend honours it
        group.env["RAY_ADDRESS"] = ray_address
        port = eng.port or free_port()
        link = group.start(
            "superlink",
            [
                find_executable("flower-superlink"),
                "--insecure",
                "--simulation",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                FLWR_IN_MEMORY_DB_NAME,
            ],
        )
        wait_for_port(port, link, "superlink", group)
        federation = (
            f"num-supernodes={scenario.data.num_clients} client-resources-num-cpus={eng.num_cpus} "
            f"client-resources-num-gpus={eng.num_gpus}"
        )
        return submit_app(scenario, run_dir, group, f"127.0.0.1:{port}", federation, resume)
