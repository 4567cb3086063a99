"""The virtual clock mod: hand-computed clock math, memory check, device failures as error replies."""

from __future__ import annotations

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

import clients.clock as clock
from clients.app import app as client_app
from clients.clock import (
    WorkEstimate,
    client_time,
    format_bytes,
    measure_work,
    samples_processed,
    steps_within,
    training_memory_bytes,
    virtual_clock_mod,
)
from clients.identity import reply_partition_id
from fedge.engines import InProcessGrid
from scenarios.config import validate_scenario
from scenarios.devices import DeviceProfile, load_catalog

BOARD = DeviceProfile(
    peak_flops=2e9,
    sustained_fraction=0.5,
    memory_bytes=2**20,
    uplink_bps=1e6,
    downlink_bps=4e6,
    latency_s=0.1,
    power_w=2.0,
)  # sustained 1 GFLOP/s


def test_client_time_by_hand() -> None:
    t = client_time(flops=3e9, bytes_down=500_000, bytes_up=250_000, profile=BOARD)
    # 3e9 / 1e9 = 3 s compute; 8*5e5/4e6 = 1 s down; 8*2.5e5/1e6 = 2 s up; + 0.1 s RTT
    assert (t.compute_s, t.download_s, t.upload_s, t.latency_s) == pytest.approx((3, 1, 2, 0.1))
    assert t.total_s == pytest.approx(6.1)
    assert BOARD.joules_per_flop * 3e9 == pytest.approx(6.0)  # 2 W for 3 s


def test_step_accounting_by_hand() -> None:
    assert samples_processed(100, 32, 4) == 100  # one epoch: 32+32+32+4
    assert samples_processed(100, 32, 6) == 100 + 64
    assert samples_processed(100, 32, 0) == 0
    # deadline 5 s, comm 1 + 2 + 0.1 s, a step of 0.5e9 FLOPs = 0.5 s => floor(1.9 / 0.5) = 3
    assert steps_within(5.0, 0.5e9, 500_000, 250_000, BOARD) == 3
    assert steps_within(1.0, 0.5e9, 500_000, 250_000, BOARD) == 1  # never 0: late, then dropped


def test_measured_flops_and_memory_match_the_layer_math() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    work = measure_work(model, (10,), batch_size=8)
    # matmul FLOPs per sample: forward 2*(10*20 + 20*3); backward 2x forward (grad of input and
    # weight), except the first layer needs no input gradient: 2*(10*20) + 2*2*(20*3)
    forward = 2 * (10 * 20 + 20 * 3)
    backward = 2 * 10 * 20 + 2 * 2 * 20 * 3
    assert work.flops_per_sample == forward + backward
    assert work.param_bytes == 4 * (10 * 20 + 20 + 20 * 3 + 3)
    assert work.activation_bytes > 0
    assert (
        training_memory_bytes(work, optimizer_copies=1)
        == 3 * work.param_bytes + work.activation_bytes
    )
    assert format_bytes(6.2 * 2**30) == "6.2 GiB" and format_bytes(512) == "512 B"


# -------------------- the mod inside the real ClientApp


def scenario_json(hidden: tuple[int, ...] = (16,), **devices) -> str:
    raw = {
        "seed": 1,
        "data": {"dataset": "mnist1d", "num_clients": 2, "num_samples": 400},
        "model": {"name": "mlp", "hidden": list(hidden)},
        "train": {"epochs": 1, "batch_size": 16},
        "devices": {"assign": "list", "classes": ["t4"], **devices},
    }
    return validate_scenario(raw).to_run_config()["scenario"]


def train_on_grid(run_config_scenario: str, config: dict | None = None) -> list[Message]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    from clients.data import dataset_info
    from clients.models import build_model
    from scenarios.config import Scenario

    scenario = Scenario.from_run_config({"scenario": run_config_scenario})
    info = dataset_info(scenario.data)
    arrays = ArrayRecord(
        build_model(scenario.model, info.input_shape, info.num_classes).state_dict()
    )
    grid = InProcessGrid(client_app, 2, {"scenario": run_config_scenario})
    cfg = ConfigRecord({"server-round": 1, **(config or {})})
    msgs = [
        Message(RecordDict({"arrays": arrays, "config": cfg}), nid, MessageType.TRAIN)
        for nid in grid.get_node_ids()
    ]
    return list(grid.send_and_receive(msgs))


def test_replies_carry_the_virtual_clock() -> None:
    replies = train_on_grid(scenario_json())
    for reply in replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        m = reply.content["metrics"]
        sent = reply.content["arrays"].count_bytes()
        assert m["sent-bytes"] == sent and m["recv-bytes"] == sent  # same model both ways
        t4 = load_catalog()["t4"]
        expected = client_time(m["train-flops"], m["recv-bytes"], m["sent-bytes"], t4).total_s
        assert m["virtual-time-s"] == pytest.approx(expected)
        assert m["train-flops"] > 0 and m["energy-j"] == pytest.approx(
            m["train-flops"] * t4.joules_per_flop
        )
        assert m["work-fraction"] == 1.0 and m["num-steps"] == m["planned-steps"]


def test_offline_and_dropped_clients_become_flower_error_replies() -> None:
    off = train_on_grid(scenario_json(availability="bernoulli", p_available=0.0))
    assert all(r.has_error() and "device unavailable: client" in r.error.reason for r in off)
    gone = train_on_grid(scenario_json(dropout_prob=0.999))
    assert all(r.has_error() and "device dropout: client" in r.error.reason for r in gone)


TINY = {"peak_flops": 1e9, "memory_bytes": 4 * 1024, "uplink_bps": 1e6, "downlink_bps": 1e6}


def test_memory_check_names_device_and_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = scenario_json(classes=["tiny"], profiles={"tiny": TINY})
    replies = train_on_grid(scenario)
    assert all(r.has_error() for r in replies)
    reason = replies[0].error.reason
    assert "device out of memory: device tiny has 4.0 KiB, training needs" in reason
    assert "params+grads+optimizer" in reason and "16-sample batch" in reason
    # edge trainers are held to their own measured memory, not skipped
    monkeypatch.setattr(clock, "trainer_name_for", lambda scenario, pid: "tpsgd")
    reason = train_on_grid(scenario)[0].error.reason
    assert "training needs" in reason and "tpsgd: params" in reason


def test_edge_trainer_memory_is_measured_and_can_fit_where_backprop_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scenarios.config import Scenario

    def needs(memory_bytes: int = 2**30) -> tuple[str, dict[str, int]]:
        raw = scenario_json(
            (256,), classes=["box"], profiles={"box": {**TINY, "memory_bytes": memory_bytes}}
        )
        scenario = Scenario.from_run_config({"scenario": raw})
        work = clock._work_cached(
            scenario.model.model_dump_json(), scenario.data.model_dump_json(), 16
        )
        return raw, {
            t: clock.training_memory_need(scenario, t, work)[0] for t in ("fedavg", "lora", "tpsgd")
        }

    raw, need = needs()
    # LoRA freezes the 256-wide base: no base gradients or momentum buffers
    assert need["lora"] < need["fedavg"]
    scenario = Scenario.from_run_config({"scenario": raw})
    model_json, data_json = scenario.model.model_dump_json(), scenario.data.model_dump_json()
    report = clock._edge_memory_cached("tpsgd", model_json, data_json, 16, 4, 1)
    assert need["tpsgd"] == report.with_optimizer(0)  # train.momentum = 0: no SGD buffers
    between = (need["lora"] + need["fedavg"]) // 2
    raw, _ = needs(between)
    assert all("device out of memory" in r.error.reason for r in train_on_grid(raw))
    monkeypatch.setattr(clock, "trainer_name_for", lambda scenario, pid: "lora")
    assert not any(r.has_error() for r in train_on_grid(raw))


def test_partial_work_caps_steps_to_fit_the_deadline() -> None:
    slow = {**TINY, "memory_bytes": 2**30, "peak_flops": 2e5, "latency_s": 0.0}
    scenario = scenario_json(
        classes=["slow"],
        profiles={"slow": slow},
        policy="deadline",
        deadline_s=1.0,
        partial_work=True,
    )
    replies = train_on_grid(scenario, {"deadline-s": 1.0, "partial-work": True})
    for reply in replies:
        m = reply.content["metrics"]
        assert m["num-steps"] < m["planned-steps"] and m["work-fraction"] < 1.0
        assert m["virtual-time-s"] <= 1.0 + 1e-9  # fits, by construction of the step budget


def test_partial_work_caps_only_the_slow_client() -> None:
    slow = {**TINY, "memory_bytes": 2**30, "peak_flops": 2e5, "latency_s": 0.0}
    scenario = scenario_json(
        classes=["slow", "t4"],
        profiles={"slow": slow},
        policy="deadline",
        deadline_s=1.0,
        partial_work=True,
    )
    # one ConfigRecord shared by both messages, as Flower's strategies send it
    replies = train_on_grid(scenario, {"deadline-s": 1.0, "partial-work": True})
    slow_reply, fast_reply = sorted(replies, key=reply_partition_id)
    assert slow_reply.content["metrics"]["work-fraction"] < 1.0
    fast = fast_reply.content["metrics"]
    assert fast["num-steps"] == fast["planned-steps"] and fast["work-fraction"] == 1.0


def test_mod_passes_through_non_training_and_device_free_scenarios() -> None:
    calls = []

    def nxt(msg: Message, ctx: Context) -> Message:
        calls.append(msg.metadata.message_type)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    ctx = Context(
        1, 5, {"partition-id": 0}, RecordDict(), {"scenario": scenario_json(dropout_prob=0.999)}
    )
    ev = Message(RecordDict(), 5, MessageType.EVALUATE)
    out = virtual_clock_mod(ev, ctx, nxt)
    assert calls == ["evaluate"] and "virtual-time-s" not in out.content["metrics"]
    plain = Context(
        1,
        5,
        {"partition-id": 0},
        RecordDict(),
        {"scenario": validate_scenario({}).to_run_config()["scenario"]},
    )
    tr = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), 5, MessageType.TRAIN)
    virtual_clock_mod(tr, plain, nxt)
    assert calls == ["evaluate", "train"]


def test_workestimate_is_a_plain_record() -> None:
    w = WorkEstimate(10.0, 100, 40, 4)
    assert training_memory_bytes(w, 2) == 40 * 4 + 100
