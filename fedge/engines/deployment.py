"""The ``deployment`` engine: a SuperLink and one ``flower-supernode`` per client on loopback
(insecure: for real machines with TLS see the README), the app submitted with ``flwr run``."""

from __future__ import annotations

from pathlib import Path

from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

from fedge.deploy import superlink_args, supernode_args
from fedge.engines.processes import (
    ProcessGroup,
    find_executable,
    flower_processes,
    free_port,
    wait_for_port,
)
from fedge.engines.submit import submit_app
from scenarios.config import Scenario


def start_loopback_deployment(
    group: ProcessGroup, partition_ids: list[int], num_partitions: int, port: int = 0
) -> str:
    """An insecure SuperLink on loopback (``port``, or a free one) and one SuperNode per entry of
    ``partition_ids``, each claiming that partition of ``num_partitions``; return the address."""
    port = port or free_port()
    link = group.start(
        "superlink",
        superlink_args(
            find_executable("flower-superlink"),
            certs=None,
            host="127.0.0.1",
            port=port,
            database=FLWR_IN_MEMORY_DB_NAME,
        ),
    )
    wait_for_port(port, link, "superlink", group)
    address = f"127.0.0.1:{port}"
    for i, pid in enumerate(partition_ids):
        group.start(
            f"supernode-{i}",
            supernode_args(
                find_executable("flower-supernode"), address, pid, num_partitions, port=free_port()
            ),
        )
    return address


def run_deployment(scenario: Scenario, run_dir: Path, resume: bool = False) -> dict:
    """A SuperLink plus one SuperNode per client on loopback (insecure), driven by ``flwr run``."""
    n = scenario.data.num_clients
    with flower_processes(run_dir / "logs") as group:
        address = start_loopback_deployment(group, list(range(n)), n, scenario.engine.port)
        return submit_app(scenario, run_dir, group, address, None, resume)
