"""``flwr run`` of fedge's app against a running SuperLink, waiting for the run's results: how the
Ray and deployment engines hand a scenario to Flower."""

from __future__ import annotations

import json
import time
from pathlib import Path

import tomli_w

from fedge.apps import APP_DIR, stage_app
from fedge.deploy import write_connection
from fedge.engines.errors import EngineError
from fedge.engines.processes import ProcessGroup, find_executable
from scenarios.config import Scenario
from server.ray_guard import STOP_PREFIX


def submit_app(
    scenario: Scenario,
    run_dir: Path,
    group: ProcessGroup,
    address: str,
    federation_config: str | None,
    resume: bool = False,
    root_cert: Path | None = None,
) -> dict:
    """``flwr run <app> fedge --stream`` against the SuperLink at ``address`` (TLS verified with
    ``root_cert``; plain HTTP when None) with the scenario as run config; wait for the results."""
    write_connection(group.flwr_home, address, root_cert)
    overrides = group.log_dir / "run_config.toml"
    overrides.write_text(
        tomli_w.dumps({**scenario.to_run_config(), "run-dir": str(run_dir), "resume": resume})
    )
    # A staged copy: `flwr run` would rewrite the repository's pyproject.toml (fedge/apps.py).
    app = stage_app(group.flwr_home / "fedge-app", APP_DIR)
    args = [
        find_executable("flwr"),
        "run",
        str(app),
        "fedge",
        "--stream",
        "--run-config",
        str(overrides),
    ]
    if federation_config:
        args += ["--federation-config", federation_config]
    proc = group.start("flwr-run", args)
    summary_file = run_dir / "summary.json"
    deadline = time.time() + scenario.federation.round_timeout_s * (scenario.num_rounds + 1)
    # `flwr run --stream` keeps streaming after the run ends; the summary file marks completion.
    while not summary_file.exists():
        if time.time() > deadline:
            raise EngineError(
                f"run did not finish in time; flwr log:\n{group.log_tail('flwr-run')}"
            )
        if proc.poll() is not None and not summary_file.exists():
            time.sleep(2)  # the file may land just after the stream closes
            if not summary_file.exists():
                raise_stop_reason(group.log_dir / "flwr-run.log")
                raise EngineError(
                    f"flwr run ended without results (code {proc.returncode}):\n{group.log_tail('flwr-run')}"
                )
        time.sleep(0.5)
    time.sleep(0.5)
    return json.loads(summary_file.read_text())


def raise_stop_reason(log: Path) -> None:
    """A run the ServerApp stopped on purpose (a lost Ray node, server/ray_guard.py) ends with
    its own message, not a log tail to dig through."""
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        at = line.find(STOP_PREFIX)
        if at >= 0:
            raise EngineError(line[at:].strip().rstrip("'\"").strip())
