"""Experiment tracking: what TensorBoard and MLflow were sent is read back with their own readers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import fedge
from scenarios.config import ScenarioError, validate_scenario
from server import tracking

ROOT = Path(__file__).resolve().parents[1]


def test_tensorboard_and_mlflow_receive_every_round_and_the_scenario(
    tmp_path: Path, tiny_scenario
) -> None:
    pytest.importorskip("tensorboard")
    mlflow_tracking = pytest.importorskip("mlflow.tracking")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    tracked = tiny_scenario(seed=5, tracking={"tensorboard": True, "mlflow": True})
    run = fedge.run(tracked, run_dir=tmp_path / "run", progress=False)
    accuracy = [(r["round"], r["central_accuracy"]) for r in run.rounds]
    bytes_up = [(r["round"], r["bytes_up"]) for r in run.rounds if "bytes_up" in r]
    assert len(accuracy) == 3 and bytes_up

    events = EventAccumulator(str(run.run_dir / tracking.TENSORBOARD_DIR))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("central_accuracy")]
    assert logged == [(step, pytest.approx(value)) for step, value in accuracy]
    assert [(e.step, e.value) for e in events.Scalars("bytes_up")] == bytes_up
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["data.num_clients"].number_value == 3
    assert start.hparams["model.name"].string_value == "mlp"

    client = mlflow_tracking.MlflowClient(tracking_uri=(tmp_path / tracking.MLRUNS_DIR).as_uri())
    (found,) = client.search_runs(
        [client.get_experiment_by_name("fedge").experiment_id],
        filter_string=f"tags.`{tracking.RUN_DIR_TAG}` = '{run.run_dir.resolve()}'",
    )
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    history = client.get_metric_history(found.info.run_id, "central_accuracy")
    assert sorted((m.step, m.value) for m in history) == accuracy
    assert found.data.params["data.num_clients"] == "3"
    assert found.data.metrics["final/final_accuracy"] == run.summary["final_accuracy"]
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"metrics.jsonl", "summary.json", "scenario.toml", tracking.TENSORBOARD_DIR} <= artifacts


def test_a_missing_tracker_package_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    scenario = validate_scenario({"tracking": {"mlflow": True}})
    with pytest.raises(ScenarioError, match=r"tracking.mlflow = true needs the mlflow package.*"):
        tracking.tracking_observers(scenario, tmp_path)


def test_trackers_are_not_imported_unless_switched_on() -> None:
    probe = (
        "import sys\n"
        "from scenarios.config import validate_scenario\n"
        "from server.app import run_server\n"
        "from server.tracking import tracking_observers\n"
        "assert tracking_observers(validate_scenario({}), '.') == []\n"
        "print(sorted(m for m in ('tensorboard', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr
