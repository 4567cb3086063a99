"""The packed engine answers a round's evaluate messages together (``clients/packed_eval.py``) with
the ClientApp's replies: every reply it builds is checked, inside real runs, against the reply
the ClientApp gives the same message (same records, identity and ``num-examples``; losses and
accuracies to float tolerance), and whole runs give the in-process engine's per-round and
per-client evaluation metrics, for FedAvg (with and without personalization's fine-tuning),
FedLD, FedLAW, clustered personalization, a ``[devices]`` fleet and an ``[attack]`` run."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType

from clients.app import app as client_app
from clients.packed_eval import PackedEvaluator
from fedge.engines import run_engine
from scenarios.config import validate_scenario
from scenarios.results import load_run

BASE = {
    "seed": 3,
    "num_rounds": 3,
    "data": {
        "dataset": "mnist1d",
        "num_clients": 8,
        "partitioner": "dirichlet",  # ragged client sizes
        "alpha": 0.5,
        "num_samples": 1600,
    },
    "model": {"name": "mlp", "hidden": [32]},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
    "federation": {"fraction_evaluate": 1.0},
}
PERSONALIZED = {"personalization": {"finetune_epochs": 1, "evaluate_every": 1}}
FLEET = {  # a heterogeneous fleet: offline and dropped-out clients, late ones at the deadline
    "assign": "mix",
    "mix": {"a100": 1, "t4": 1, "jetson_nano": 1, "phone_sd8gen2": 1, "raspberry_pi_4": 1},
    "speed_sigma": 0.3,
    "availability": "markov",
    "p_on_to_off": 0.3,
    "p_off_to_on": 0.5,
    "dropout_prob": 0.2,
    "policy": "deadline",
    "deadline_s": 0.05,
}
CASES = [
    pytest.param({}, id="fedavg"),
    pytest.param(PERSONALIZED, id="fedavg-finetune-epochs"),
    pytest.param(
        {"personalization": {"finetune_steps": 3, "evaluate_every": 2}}, id="fedavg-finetune-steps"
    ),
    pytest.param({"algorithm": {"name": "fedld", "margin_lambda": 0.5}}, id="fedld"),
    pytest.param(
        {"algorithm": {"name": "fedlaw"}, "data": {**BASE["data"], "proxy_fraction": 0.05}},
        id="fedlaw",
    ),
    pytest.param(
        {"algorithm": {"name": "clustered", "warmup_rounds": 1, "k_max": 3}, **PERSONALIZED},
        id="clustered",
    ),
    pytest.param({"devices": FLEET}, id="devices"),
    # attackers poison their training replies only: their evaluate replies are plain ones
    pytest.param({"attack": {"kind": "sign_flip", "clients": [1, 4]}}, id="attack"),
]
WALL_CLOCK = ("wall_time_s", "cumulative_wall_time_s", "fedlaw_server_time_s")  # measured


def _run(raw: dict, engine: str, tmp_path: Path):
    raw = copy.deepcopy(raw)
    raw.update(name=engine, output_dir=str(tmp_path), engine={"name": engine})
    run_engine(validate_scenario(raw), tmp_path / engine, show_progress=False)
    return load_run(tmp_path / engine)


def assert_same_reply(packed: Message, expected: Message) -> None:
    """``packed`` is the ClientApp's ``expected`` reply: same records in the same order, the same
    identity and ``num-examples``, the losses and accuracies to float tolerance (a batched forward
    sums in another order; fine-tuning is packed training)."""
    assert not expected.has_error() and not packed.has_error()
    assert packed.metadata.reply_to_message_id == expected.metadata.reply_to_message_id
    assert packed.metadata.src_node_id == expected.metadata.src_node_id
    assert list(packed.content.keys()) == list(expected.content.keys())
    for name, record in expected.content.config_records.items():
        assert dict(packed.content[name]) == dict(record), name
    got, want = dict(packed.content["metrics"]), dict(expected.content["metrics"])
    assert list(got) == list(want)
    n = want["num-examples"]
    assert got["num-examples"] == n
    for key, value in want.items():
        if key == "num-examples":
            continue
        if math.isnan(value):
            assert math.isnan(got[key]), key
        elif key.endswith("accuracy"):  # a near-tie's argmax may flip with the last bit
            assert abs(got[key] - value) <= 1 / n + 1e-12, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.fixture
def checked_evaluations(monkeypatch) -> list[int]:
    """Every call of the packed evaluator in the test's runs: it must answer every evaluate
    message it is given, each with the reply the ClientApp gives that message. Returns the number
    of replies checked per call."""
    packed_call = PackedEvaluator.__call__
    checked: list[int] = []

    def call(self, messages: list[Message], contexts: dict[int, Context]):
        out = packed_call(self, messages, contexts)
        evaluate = {
            pos for pos, m in enumerate(messages) if m.metadata.message_type == MessageType.EVALUATE
        }
        assert set(out) == evaluate  # none skipped, none left to the ClientApp
        for pos, (reply, _) in out.items():
            msg = messages[pos]
            assert_same_reply(reply, client_app(msg, contexts[msg.metadata.dst_node_id]))
        if out:
            checked.append(len(out))
        return out

    monkeypatch.setattr(PackedEvaluator, "__call__", call)
    return checked


def _assert_same_evaluation(seq, packed) -> None:
    """The same per-round metrics (client evaluation's aggregates included) and the same
    clients.jsonl rows, trained and evaluated values to float tolerance."""
    assert len(seq.rounds) == len(packed.rounds)
    for s, p in zip(seq.rounds, packed.rounds, strict=True):
        assert p.keys() == s.keys(), s["round"]
        for key, value in s.items():
            if key in WALL_CLOCK or not isinstance(value, int | float):
                continue
            assert p[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (
                s["round"],
                key,
            )

    def by_client(rows: list[dict]) -> dict:
        return {(r["round"], r["partition_id"]): r for r in rows}

    seq_rows, packed_rows = by_client(seq.clients), by_client(packed.clients)
    assert seq_rows.keys() == packed_rows.keys()
    for key, s in seq_rows.items():
        p = packed_rows[key]
        assert p.keys() == s.keys(), key
        for field, value in s.items():
            if isinstance(value, float):
                assert p[field] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (
                    key,
                    field,
                )
            else:
                assert p[field] == value, (key, field)


@pytest.mark.parametrize("overrides", CASES)
def test_packed_evaluation_gives_the_client_apps_metrics(
    overrides: dict, tmp_path: Path, capsys, checked_evaluations: list[int]
) -> None:
    raw = {**copy.deepcopy(BASE), **copy.deepcopy(overrides)}
    seq = _run(raw, "inprocess", tmp_path)
    capsys.readouterr()
    packed = _run(raw, "packed", tmp_path)
    report = next(
        x for x in capsys.readouterr().out.splitlines() if x.startswith("fedge: packed engine:")
    )
    evaluated = [r for r in seq.rounds if r.get("local_accuracy") is not None]
    assert evaluated  # the runs really evaluate on the clients
    n = sum(checked_evaluations)
    assert n == sum(1 for r in seq.clients if "local_accuracy" in r)
    assert f"{n} client evaluations packed (0 through the ClientApp)" in report
    if "personalization" in raw:
        assert any("personalized_accuracy" in r for r in packed.clients)
    _assert_same_evaluation(seq, packed)


def test_messages_the_pack_cannot_evaluate_go_through_the_client_app(tiny_scenario, caplog) -> None:
    """A LoRA downlink message (its mod merges the model), one without an ``arrays`` record and
    one whose model does not fit the scenario's are left to the ClientApp, the reason logged."""
    from clients.arrays import record_from_state_dict
    from clients.data import dataset_info
    from clients.models import build_model
    from edge.lora_downlink import SYNC_KEY
    from fedge.engines.inprocess import InProcessGrid

    scenario = tiny_scenario()
    info = dataset_info(scenario.data)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    good = record_from_state_dict(model.state_dict())
    wrong = ArrayRecord({"w": torch.zeros(3)})
    grid = InProcessGrid(client_app, 3, scenario.to_run_config())
    nodes = list(grid.get_node_ids())

    def msg(content: dict, node: int) -> Message:
        return Message(RecordDict(content), nodes[node], MessageType.EVALUATE)

    messages = [
        msg({"arrays": good, SYNC_KEY: ConfigRecord({"x": 1})}, 0),
        msg({"config": ConfigRecord({"server-round": 1})}, 1),
        msg({"arrays": wrong}, 2),
        msg({"arrays": good}, 0),
    ]
    evaluator = PackedEvaluator(scenario, torch.device("cpu"))
    out = evaluator(messages, grid.contexts)
    assert set(out) == {3} and evaluator.sequential == 3
    assert_same_reply(out[3][0], client_app(messages[3], grid.contexts[nodes[0]]))
    for reason in ("LoRA downlink", "no 'arrays' ArrayRecord", "does not fit the scenario"):
        assert reason in caplog.text
