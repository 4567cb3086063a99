"""fedge as a library: ``fedge.run`` gives what ``fedge run`` gives, two runs in one process do not
leak into each other, and a run leaves the caller's process as it found it."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from flwr.supercore.task_identity import TaskIdentity

import fedge
from fedge.api import preserved_process_state

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"wall_time_s", "cumulative_wall_time_s"}


TRAIN = {"epochs": 1, "batch_size": 32, "lr": 0.1}


def learning(rounds: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rounds]


def test_two_runs_in_one_process_equal_their_cli_runs(tmp_path: Path, tiny_scenario) -> None:
    scenarios = {
        "fedavg": {},
        "fedprox": {
            "algorithm": {"name": "fedprox", "mu": 0.1},
            "data": {"num_clients": 4, "alpha": 0.3, "partitioner": "dirichlet"},
        },
    }
    paths = {
        name: tiny_scenario.toml(tmp_path / f"{name}.toml", name=name, seed=3, train=TRAIN, **extra)
        for name, extra in scenarios.items()
    }
    # the CLI runs, each in its own process, side by side
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cli = {
        name: subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", "run", str(path), "-q"]
            + ["--run-dir", str(tmp_path / f"cli-{name}")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, path in paths.items()
    }
    # the same two scenarios, one after the other in this process
    api_runs = {
        name: fedge.run(path, run_dir=tmp_path / f"api-{name}", progress=False)
        for name, path in paths.items()
    }
    for name, proc in cli.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        cli_run = fedge.load_run(tmp_path / f"cli-{name}")
        api_run = api_runs[name]
        assert api_run.summary["final_accuracy"] == cli_run.summary["final_accuracy"], name
        assert learning(api_run.rounds) == learning(cli_run.rounds), name
        assert len(api_run.rounds) == 3 and api_run.clients, name
        assert api_run.scenario == cli_run.scenario


def test_run_restores_the_callers_process_state(tmp_path: Path, tiny_scenario) -> None:
    caller_threads = 2 if torch.get_num_threads() != 2 else 3  # a run trains with 1 thread
    flwr_logger = logging.getLogger("flwr")
    before = {
        "threads": torch.get_num_threads(),
        "flwr_level": flwr_logger.level,
        "identity": (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id),
    }
    torch.set_num_threads(caller_threads)
    flwr_logger.setLevel(logging.DEBUG)  # the in-process engine quiets Flower to WARNING
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    try:
        result = fedge.run(
            tiny_scenario(name="state", num_rounds=1), run_dir=tmp_path / "run", progress=False
        )
        assert result.summary["status"] == "ok"
        assert torch.get_num_threads() == caller_threads
        assert flwr_logger.level == logging.DEBUG
        assert (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id) == (
            None,
            None,
            None,
        )
        # the run seeded the global generators; the caller's draws go on as if it had not
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws
    finally:
        torch.set_num_threads(before["threads"])
        flwr_logger.setLevel(before["flwr_level"])
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before["identity"]


def test_preserved_process_state_puts_back_environment_and_logging() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    os.environ["FEDGE_TEST_CHANGED"] = "caller"
    os.environ.pop("FEDGE_TEST_ADDED", None)
    added = logging.StreamHandler()
    try:
        with preserved_process_state():
            os.environ["FEDGE_TEST_CHANGED"] = "run"
            os.environ["FEDGE_TEST_ADDED"] = "run"
            root.addHandler(added)
            root.setLevel(logging.CRITICAL)
            logging.getLogger("fedge.test.new").setLevel(logging.ERROR)
        assert os.environ["FEDGE_TEST_CHANGED"] == "caller"
        assert "FEDGE_TEST_ADDED" not in os.environ
        assert root.handlers == handlers and root.level == level
    finally:
        os.environ.pop("FEDGE_TEST_CHANGED", None)
        root.handlers[:] = handlers
        root.setLevel(level)


def test_overrides_as_dict_or_strings_and_typed_errors(tmp_path: Path, tiny_scenario) -> None:
    text = tomli_w.dumps(tiny_scenario.raw(name="over"))
    as_dict = fedge.resolve_scenario(text, {"data.alpha": 0.2, "num_rounds": 5, "name": "x"})
    as_strings = fedge.resolve_scenario(text, ["data.alpha=0.2", "num_rounds=5", "name=x"])
    assert as_dict == as_strings and as_dict.num_rounds == 5
    assert fedge.resolve_scenario(as_dict, {"seed": 9}).seed == 9
    with pytest.raises(fedge.ScenarioError, match="num_rounds"):
        fedge.run(text, {"num_rounds": 0}, run_dir=tmp_path / "bad")
    with pytest.raises(fedge.ScenarioError, match="scenario file not found"):
        fedge.run(tmp_path / "missing.toml")
    assert not (tmp_path / "bad").exists()


def test_a_failed_run_raises_run_failed_with_its_results(tmp_path: Path, tiny_scenario) -> None:
    # every honest update is longer than 1e-9: the validator excludes all, every round skips
    text = tomli_w.dumps(tiny_scenario.raw(name="fails", robustness={"max_update_norm": 1e-9}))
    with pytest.raises(fedge.RunFailed, match="aggregated nothing") as caught:
        fedge.run(text, run_dir=tmp_path / "run", progress=False)
    failed = caught.value.run
    assert failed.failed and failed.run_dir == tmp_path / "run"
    assert [r["aggregated"] for r in failed.rounds[1:]] == [0, 0]
    pandas = pytest.importorskip("pandas")
    frame = failed.to_pandas()
    assert isinstance(frame, pandas.DataFrame) and list(frame["round"]) == [0, 1, 2]
    assert len(failed.to_pandas("clients")) == len(failed.clients)


def test_sweep_grid_as_dict_or_cli_strings_gives_the_same_axes() -> None:
    from fedge.api import _axes, _label

    as_strings = _axes(["algorithm.name=fedavg,fedprox", "data.alpha=0.1,0.5", "seed=[1, 2]"])
    as_dict = _axes(
        {"algorithm.name": ["fedavg", "fedprox"], "data.alpha": [0.1, 0.5], "seed": [1, 2]}
    )
    assert as_strings == as_dict
    # values are typed as `--set` reads them; the text names the run
    assert as_dict[1] == ("data.alpha", [(0.1, "0.1"), (0.5, "0.5")])
    labels = [_label(key, text) for key, values in as_dict for _, text in values]
    assert labels == ["fedavg", "fedprox", "alpha-0.1", "alpha-0.5", "seed-1", "seed-2"]
    assert _label("data.hub_path", "a/b") == "hub_path-a_b"  # a value never makes a subfolder
