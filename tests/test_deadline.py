"""Deadline policies on hand-made replies, the plugin's round metrics, and hetero_gpus end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedge.engines import run_engine
from scenarios.config import load_scenario, validate_scenario
from scenarios.results import load_run
from server.deadline import DeviceClockPlugin, apply_deadline_policy, failure_kind

HETERO = Path(__file__).parents[1] / "scenarios" / "hetero_gpus.toml"


def test_policies_by_hand() -> None:
    times = [3.0, 1.0, 7.0, 2.0]
    d = apply_deadline_policy(times, "wait_for_all")
    assert (d.kept, d.late, d.round_time_s) == ([0, 1, 2, 3], [], 7.0)
    d = apply_deadline_policy(times, "deadline", deadline_s=2.5)
    assert (d.kept, d.late, d.round_time_s) == ([1, 3], [0, 2], 2.5)  # waited until the deadline
    d = apply_deadline_policy(times, "deadline", deadline_s=10.0)
    assert (d.kept, d.late, d.round_time_s) == (
        [0, 1, 2, 3],
        [],
        7.0,
    )  # all in: done at the slowest
    d = apply_deadline_policy(times, "deadline", deadline_s=10.0, num_failed=1)
    assert d.round_time_s == 10.0  # someone never answered: the server waits out the deadline
    d = apply_deadline_policy(times, "first_k", first_k=2)
    assert (d.kept, d.late, d.round_time_s) == ([1, 3], [0, 2], 2.0)  # K-th fastest ends the round
    d = apply_deadline_policy([1.0, 1.0, 1.0], "first_k", first_k=2)
    assert d.kept == [0, 1]  # ties: lower partition id first
    d = apply_deadline_policy([4.0], "first_k", first_k=2)
    assert (d.kept, d.round_time_s) == ([0], 4.0)
    assert apply_deadline_policy([], "wait_for_all").round_time_s == 0.0


def _replies(times: list[float], errors: list[str]) -> list[Message]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    out = []
    for pid, t in enumerate(times):
        ins = Message(RecordDict({"arrays": ArrayRecord()}), 100 + pid, MessageType.TRAIN)
        metrics = MetricRecord(
            {
                "num-examples": 10,
                "partition-id": pid,
                "virtual-time-s": t,
                "energy-j": 2.0,
                "train-flops": 1e6,
                "sent-bytes": 100,
                "work-fraction": 1.0,
            }
        )
        out.append(Message(RecordDict({"arrays": ArrayRecord(), "metrics": metrics}), reply_to=ins))
    for i, reason in enumerate(errors):
        ins = Message(RecordDict(), 200 + i, MessageType.TRAIN)
        out.append(Message(Error(2, reason), reply_to=ins))
    return out


def test_plugin_filters_and_reports() -> None:
    scenario = validate_scenario(
        {
            "devices": {
                "mix": {"t4": 1},
                "policy": "deadline",
                "deadline_s": 2.5,
                "partial_work": True,
            }
        }
    )
    plugin = DeviceClockPlugin(scenario)
    assert plugin.train_config(1) == {"deadline-s": 2.5, "partial-work": True}
    # the Ray runtime wraps the exception text like this; the prefix survives
    ray_style = "<class 'ClientAppException'>:<'\nException ClientAppException occurred. Message: device dropout: client 5'>"
    replies = _replies([3.0, 1.0, 2.0], ["DeviceError: device unavailable: client 4", ray_style])
    assert [failure_kind(r) for r in replies] == [None, None, None, "unavailable", "dropout"]
    kept, m = plugin.filter_train_replies(1, replies)
    assert [r.content["metrics"]["partition-id"] for r in kept if not r.has_error()] == [1, 2]
    assert sum(r.has_error() for r in kept) == 2  # errors stay for the strategy to see
    assert m["virtual_round_time_s"] == 2.5 and m["cumulative_virtual_time_s"] == 2.5
    assert (m["num_kept"], m["num_late"], m["num_unavailable"], m["num_dropped_out"]) == (
        2,
        1,
        1,
        1,
    )
    assert m["round_energy_j"] == 6.0  # the late client burnt energy too
    assert m["kept_bytes_up"] == 200
    _, m2 = plugin.filter_train_replies(2, _replies([1.0], []))
    assert m2["virtual_round_time_s"] == 1.0 and m2["cumulative_virtual_time_s"] == 3.5
    fresh = DeviceClockPlugin(scenario)
    fresh.load_state(plugin.state())
    assert fresh.cumulative_s == 3.5
    over = DeviceClockPlugin(
        validate_scenario({"devices": {"mix": {"t4": 1}, "policy": "first_k", "first_k": 1}})
    )
    assert over.train_config(1) == {}
    kept, m = over.filter_train_replies(1, _replies([3.0, 1.0, 2.0], []))
    assert [r.content["metrics"]["partition-id"] for r in kept] == [1] and m["num_late"] == 2


SHRINK = [
    "num_rounds=2",
    "data.num_clients=5",
    "data.num_samples=800",
    "model.hidden=[32]",
    "train.epochs=1",
]


def test_hetero_gpus_inprocess_end_to_end_and_seeded(tmp_path: Path) -> None:
    scenario = load_scenario(
        HETERO, SHRINK + [f"output_dir={tmp_path}", "devices.dropout_prob=0.3"]
    )
    summary = run_engine(scenario, tmp_path / "a", show_progress=False)
    run_engine(scenario, tmp_path / "b", show_progress=False)
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    keys = [
        "virtual_round_time_s",
        "cumulative_virtual_time_s",
        "num_kept",
        "num_late",
        "num_unavailable",
        "num_dropped_out",
        "central_accuracy",
    ]
    sched = [[r.get(k) for k in keys] for r in a.rounds[1:]]
    assert sched == [[r.get(k) for k in keys] for r in b.rounds[1:]]  # fixed seed => same schedule
    for r in a.rounds[1:]:
        assert r["num_kept"] + r["num_late"] + r["num_unavailable"] + r["num_dropped_out"] == 5
        assert r["num_failures"] == r["num_unavailable"] + r["num_dropped_out"]
        assert 0 < r["virtual_round_time_s"] <= 0.25 and r["round_energy_j"] > 0
    assert summary["total_virtual_time_s"] == a.rounds[-1]["cumulative_virtual_time_s"]
    assert (tmp_path / "a" / "time_to_accuracy.png").stat().st_size > 0
    rows = [c for c in a.clients if c["round"] == 1]
    assert rows and all(c["virtual_time_s"] <= 0.25 and "device_index" in c for c in rows)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["total_virtual_time_s"] > 0


@pytest.mark.slow
@pytest.mark.ray
def test_hetero_gpus_on_ray_matches_inprocess(tmp_path: Path) -> None:
    # seed 0, 4 clients, 2 rounds: one offline client, two dropouts and a late phone
    over = SHRINK[1:] + [
        "num_rounds=2",
        "data.num_clients=4",
        "devices.dropout_prob=0.3",
        f"output_dir={tmp_path}",
    ]
    run_engine(load_scenario(HETERO, over), tmp_path / "inprocess", show_progress=False)
    run_engine(load_scenario(HETERO, over + ["engine.name=ray"]), tmp_path / "ray")
    keys = [
        "virtual_round_time_s",
        "num_kept",
        "num_late",
        "num_unavailable",
        "num_dropped_out",
        "num_failures",
        "round_train_flops",
        "central_accuracy",
    ]
    ours = [[r.get(k) for k in keys] for r in load_run(tmp_path / "inprocess").rounds]
    ray = [[r.get(k) for k in keys] for r in load_run(tmp_path / "ray").rounds]
    assert ray == ours  # same availability/dropout draws and the same virtual clock on Ray
    rounds = load_run(tmp_path / "ray").rounds[1:]
    # the device errors raised in Ray actors come back as Flower error replies, classified by prefix
    assert sum(r["num_unavailable"] for r in rounds) == 1
    assert sum(r["num_dropped_out"] for r in rounds) == 2
