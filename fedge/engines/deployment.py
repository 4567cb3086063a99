"""The ``deployment`` engine: a SuperLink and one ``flower-supernode`` per client on loopback
(insecure: for real machines with TLS see the README), the app submitted with ``flwr run``."""

from __future__ import annotations

from pathlib import Path

from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

from fedge.deploy import superlink_args, supernode_args
from fedge.engines.processes import find_executable, flower_processes, free_port, wait_for_port
from fedge.engines.submit import submit_app
from scenarios.config import Scenario


def run_deployment(scenario: Scenario, run_dir: Path, resume: bool = False) -> dict:
    """A SuperLink plus one SuperNode per client on loopback (insecure), driven by ``flwr run``."""
    eng = scenario.engine
    n = scenario.data.num_clients
    with flower_processes(run_dir / "logs") as group:
        port = eng.port or free_port()
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
        for i in range(n):
            group.start(
                f"supernode-{i}",
                supernode_args(
                    find_executable("flower-supernode"), f"127.0.0.1:{port}", i, n, port=free_port()
                ),
            )
        return submit_app(scenario, run_dir, group, f"127.0.0.1:{port}", None, resume)
