"""fedge with stock Flower: fedge's ClientApp under a stock ``FedAvg`` server, and ``flwr run .``.

(The other direction, a stock Flower ClientApp under fedge's ServerApp, is
``tests/test_faults.py::test_stock_flower_client_works_with_every_strategy``.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as fedge_client_app
from clients.data import dataset_info
from clients.models import build_model
from fedge.engines import SERVER_NODE_ID, InProcessGrid, free_port
from scenarios.config import Scenario, validate_scenario
from scenarios.results import load_run
from server.app import run_server
from server.loop import NotEnoughNodesError

ROOT = Path(__file__).resolve().parents[1]


def _scenario(**data) -> Scenario:
    return validate_scenario(
        {
            "seed": 1,
            "data": {"dataset": "mnist1d", "num_clients": 3, "num_samples": 600, **data},
            "model": {"name": "mlp", "hidden": [16]},
            "devices": {"classes": ["t4", "jetson_nano"], "assign": "list"},
        }
    )


def _grid(scenario: Scenario, run_config: dict) -> InProcessGrid:
    grid = InProcessGrid(fedge_client_app, scenario.data.num_clients, run_config, seed=0)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    return grid


def test_fedge_client_under_stock_fedavg_keeps_identifiers_out_of_averaged_metrics() -> None:
    scenario = _scenario()
    info = dataset_info(scenario.data)
    torch.manual_seed(0)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    initial = ArrayRecord(model.state_dict())
    grid = _grid(scenario, scenario.to_run_config())
    strategy = FedAvg(fraction_evaluate=1.0, min_available_nodes=3)  # stock: no fedge metric fn
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1, timeout=60)

    train, evaluate = result.train_metrics_clientapp[1], result.evaluate_metrics_clientapp[1]
    assert "train_loss" in train and "local_accuracy" in evaluate  # the clients trained
    for averaged in (train, evaluate):  # a "mean partition id" would be nonsense
        assert not {"partition-id", "device-index"} & set(averaged), dict(averaged)
    moved = [
        not np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(result.arrays.values(), initial.values(), strict=True)
    ]
    assert any(moved)


def test_identity_record_names_partition_trainer_and_device() -> None:
    scenario = _scenario()
    grid = _grid(scenario, scenario.to_run_config())
    info = dataset_info(scenario.data)
    arrays = ArrayRecord(
        build_model(scenario.model, info.input_shape, info.num_classes).state_dict()
    )
    messages = [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord()}), nid, MessageType.TRAIN)
        for nid in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(messages))
    identities = sorted(
        (dict(r.content.config_records["client"]) for r in replies),
        key=lambda d: d["partition-id"],
    )
    assert [i["partition-id"] for i in identities] == [0, 1, 2]
    assert {i["trainer"] for i in identities} == {"fedavg"}
    assert [i["device-profile"] for i in identities] == ["t4", "jetson_nano", "t4"]
    for reply in replies:
        assert "partition-id" not in reply.content["metrics"]


def test_missing_scenario_key_fails_with_a_message_naming_it() -> None:
    """A stock server that sends its own model and no run_config["scenario"]."""
    scenario = _scenario()
    grid = _grid(scenario, {})  # no "scenario" key: the client falls back to the default one
    info = dataset_info(scenario.data)
    other = ArrayRecord(
        build_model(scenario.model, info.input_shape, info.num_classes).state_dict()
    )
    nid = next(iter(grid.get_node_ids()))
    msg = Message(RecordDict({"arrays": other, "config": ConfigRecord()}), nid, MessageType.TRAIN)
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error()
    reason = reply.error.reason
    assert "run_config has no 'scenario' key" in reason and "size mismatch" not in reason[:80]


def test_server_stops_with_a_clear_message_when_too_few_nodes_connect(tmp_path: Path) -> None:
    scenario = validate_scenario(
        {
            "data": {"dataset": "mnist1d", "num_clients": 4, "num_samples": 400},
            "model": {"name": "mlp", "hidden": [8]},
            "federation": {"wait_for_nodes_s": 1.0},
        }
    )
    grid = InProcessGrid(fedge_client_app, 2, scenario.to_run_config())  # 2 of the 4 nodes
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    start = time.perf_counter()
    with pytest.raises(NotEnoughNodesError, match=r"2 of the 4 .*num-supernodes"):
        run_server(grid, scenario, tmp_path / "run", show_progress=False)
    assert time.perf_counter() - start < 30


# ------------------------------------------------------------------ `flwr run .` on a fresh copy
def test_pyproject_federation_has_as_many_supernodes_as_the_default_scenario_has_clients() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    federations = config["tool"]["flwr"]["federations"]
    local = federations[federations["default"]]
    assert local["options"]["num-supernodes"] == Scenario().data.num_clients
    assert config["tool"]["flwr"]["app"]["config"]["scenario"] == ""  # "" = the default scenario


def _fresh_clone(dest: Path) -> Path:
    """The repository's tracked files (what a fresh clone has), minus the tests."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if name.startswith("tests/") or not (ROOT / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes((ROOT / name).read_bytes())
    return dest


@pytest.mark.slow
def test_flwr_run_dot_finishes_with_the_default_scenario(tmp_path: Path) -> None:
    app = _fresh_clone(tmp_path / "app")
    home = tmp_path / "flwr-home"
    http_port, control_port = free_port(), free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never install at run time
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # the managed local SuperLink's ports: free ones, so parallel runs never collide
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": "",  # only the app copy and the installed packages
    }
    flwr = str(Path(sys.executable).parent / "flwr")
    try:
        done = subprocess.run(
            [flwr, "run", ".", "--stream"],
            cwd=app,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
        assert f"({Scenario().data.num_clients} simulated SuperNodes)" in out, out[-3000:]
        run_dirs = list((app / "results").glob("run-s0-*"))
        assert len(run_dirs) == 1, out[-3000:]
        run = load_run(run_dirs[0])
        default = Scenario()
        assert [r["round"] for r in run.rounds] == list(range(default.num_rounds + 1))
        assert all(r["num_replies"] == default.data.num_clients for r in run.rounds[1:])
        summary = json.loads((run_dirs[0] / "summary.json").read_text())
        assert summary["num_rounds"] == default.num_rounds
    finally:
        _stop_local_superlink(home)


def _stop_local_superlink(home: Path) -> None:
    """Stop the managed local SuperLink ``flwr run`` started detached for this FLWR_HOME, and every
    process under it: children by parent PID, the detached ``flower-superexec`` that names its
    parent with ``--parent-pid``, and members of their process groups (Ray actors outlive their
    parents there). Each is stopped by its PID (SIGTERM, then SIGKILL)."""
    out = subprocess.run(  # -ww: full command lines, or the FLWR_HOME path may be cut off
        ["ps", "-ww", "-eo", "pid=,ppid=,pgid=,args="], capture_output=True, text=True
    ).stdout
    rows = [
        (int(a), int(b), int(c), args)
        for a, b, c, args in (ln.split(None, 3) for ln in out.splitlines())
    ]
    tree = {pid for pid, _, _, args in rows if "flower-superlink" in args and str(home) in args}
    grown = True
    while grown:
        before = len(tree)
        for pid, ppid, pgid, args in rows:
            if ppid in tree or pgid in tree or any(f"--parent-pid {p}" in args for p in tree):
                tree.add(pid)
        grown = len(tree) > before
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.3)
    assert tree, f"no local SuperLink found for {home}"
    assert not [p for p in tree if _alive(p)], "processes left running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as stopped
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
