"""End-to-end: the same ServerApp/ClientApp on the in-process, Ray and deployment engines."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from fedge.engines import InProcessGrid, run_engine
from scenarios.config import Scenario
from scenarios.results import load_run

TIMING_KEYS = {"wall_time_s", "cumulative_wall_time_s"}


def tiny(engine: str, tiny_scenario, **extra) -> Scenario:
    tables = {
        "name": f"e2e-{engine}",
        "seed": 7,
        "data": {"partitioner": "dirichlet", "alpha": 1.0},
        "model": {"hidden": [32]},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "engine": {"name": engine},
    }
    return tiny_scenario(**{**tables, **extra})


def learning_metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in load_run(run_dir).rounds]


def test_inprocess_end_to_end_and_reproducible(tmp_path: Path, tiny_scenario) -> None:
    scenario = tiny("inprocess", tiny_scenario, federation={"fraction_evaluate": 1.0})
    summary = run_engine(scenario, tmp_path / "a", show_progress=False)
    run_engine(scenario, tmp_path / "b", show_progress=False)
    rounds = learning_metrics(tmp_path / "a")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds == learning_metrics(tmp_path / "b")  # same scenario + seed => identical metrics
    assert rounds[-1]["central_accuracy"] > rounds[0]["central_accuracy"]  # it learns
    assert rounds[1]["num_replies"] == 3 and rounds[1]["num_failures"] == 0
    assert rounds[1]["bytes_up"] > 0 and rounds[1]["bytes_down"] == rounds[1]["bytes_up"]
    assert 0.0 <= rounds[-1]["local_accuracy"] <= 1.0
    assert summary["final_accuracy"] == rounds[-1]["central_accuracy"]
    clients = load_run(tmp_path / "a").clients
    assert sorted(c["partition_id"] for c in clients if c["round"] == 1) == [0, 1, 2]
    for name in (
        "scenario.toml",
        "metrics.jsonl",
        "metrics.csv",
        "model.pt",
        "accuracy.png",
        "summary.json",
    ):
        assert (tmp_path / "a" / name).stat().st_size > 0


def test_other_seed_changes_results(tmp_path: Path, tiny_scenario) -> None:
    run_engine(tiny("inprocess", tiny_scenario), tmp_path / "a", show_progress=False)
    run_engine(tiny("inprocess", tiny_scenario, seed=8), tmp_path / "b", show_progress=False)
    assert learning_metrics(tmp_path / "a") != learning_metrics(tmp_path / "b")


def test_client_exception_becomes_error_reply() -> None:
    broken = ClientApp()

    @broken.train()
    def _train(msg: Message, context: Context) -> Message:
        raise RuntimeError("disk on fire")

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    grid = InProcessGrid(broken, num_nodes=2, run_config={})
    msgs = [
        Message(RecordDict({"arrays": ArrayRecord()}), nid, MessageType.TRAIN)
        for nid in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(msgs))
    assert len(replies) == 2
    assert all(r.has_error() and "disk on fire" in r.error.reason for r in replies)
    assert {r.metadata.src_node_id for r in replies} == set(grid.get_node_ids())


@pytest.mark.slow
@pytest.mark.ray
def test_ray_matches_inprocess(tmp_path: Path, tiny_scenario) -> None:
    run_engine(tiny("inprocess", tiny_scenario), tmp_path / "inprocess", show_progress=False)
    run_engine(tiny("ray", tiny_scenario), tmp_path / "ray")
    ours, ray = learning_metrics(tmp_path / "inprocess"), learning_metrics(tmp_path / "ray")
    # Identical: clients are seeded by (seed, round, partition id), use one torch thread, and the
    # server sorts replies by partition id before aggregating, so delivery order does not matter.
    assert [r["central_accuracy"] for r in ray] == [r["central_accuracy"] for r in ours]
    assert [r["central_loss"] for r in ray] == pytest.approx(
        [r["central_loss"] for r in ours], abs=1e-6
    )


@pytest.mark.slow
def test_deployment_superlink_and_supernodes(tmp_path: Path, tiny_scenario) -> None:
    summary = run_engine(tiny("deployment", tiny_scenario), tmp_path / "deploy")
    rounds = load_run(tmp_path / "deploy").rounds
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["num_replies"] == 3
    assert summary["final_accuracy"] == rounds[-1]["central_accuracy"]
