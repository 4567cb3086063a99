"""The packed engine trains the same model as the sequential in-process engine (FedAvg, FedProx),
and falls back to the ClientApp, saying why, for what it cannot pack."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch

from clients.data import dataset_info, load_client_data
from clients.models import build_model
from clients.packed import PackedClient, train_packed
from clients.training import TrainJob, local_sgd
from fedge.engines import run_engine
from scenarios.config import validate_scenario
from scenarios.results import MODEL_FILE, load_run

BASE = {
    "seed": 5,
    "num_rounds": 2,
    "data": {
        "dataset": "mnist1d",
        "num_clients": 7,
        "partitioner": "dirichlet",  # ragged client sizes
        "alpha": 0.5,
        "num_samples": 1400,
    },
    "model": {"name": "mlp", "hidden": [32]},
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
}


def _run(raw: dict, engine: str, tmp_path: Path, **engine_extra) -> tuple[list, dict]:
    raw = copy.deepcopy(raw)
    raw.update(name=engine, output_dir=str(tmp_path))
    raw["engine"] = {"name": engine, **engine_extra}
    run_dir = tmp_path / engine
    run_engine(validate_scenario(raw), run_dir, show_progress=False)
    return load_run(run_dir).rounds, torch.load(run_dir / MODEL_FILE)


def _assert_same_training(seq: tuple[list, dict], packed: tuple[list, dict]) -> None:
    (seq_rounds, seq_model), (packed_rounds, packed_model) = seq, packed
    assert seq_model.keys() == packed_model.keys()
    for key in seq_model:  # float summation order differs (batched matmuls), nothing else
        torch.testing.assert_close(packed_model[key], seq_model[key], rtol=1e-4, atol=2e-5)
    for s, p in zip(seq_rounds, packed_rounds, strict=True):
        assert p.get("num_replies") == s.get("num_replies")
        assert p.get("central_loss") == pytest.approx(s.get("central_loss"), rel=1e-4)
        if s.get("train_loss") is not None:
            assert p["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="fedavg-mlp"),
        pytest.param(
            {"model": {"name": "cnn1d", "channels": 8}, "train": {**BASE["train"], "epochs": 1}},
            id="fedavg-cnn1d",
        ),
        pytest.param(
            {
                "algorithm": {"name": "fedprox", "mu": 0.3},
                "train": {**BASE["train"], "weight_decay": 0.01},
            },
            id="fedprox-mlp",
        ),
    ],
)
def test_packed_engine_trains_the_sequential_model(overrides: dict, tmp_path: Path) -> None:
    raw = {**BASE, **overrides}
    sequential = _run(raw, "inprocess", tmp_path)
    packed = _run(raw, "packed", tmp_path, pack_size=3)  # 7 clients: chunks of 3, 3, 1
    _assert_same_training(sequential, packed)


def test_packed_trainer_matches_local_sgd_client_by_client() -> None:
    scenario = validate_scenario({**BASE, "name": "unit"})
    info = dataset_info(scenario.data)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    datas = [load_client_data(scenario.data, scenario.seed, pid) for pid in range(4)]
    assert len({len(d.x_train) for d in datas}) > 1  # ragged on purpose
    caps = [None, 3, None, 1]  # partial work on two clients
    packed = train_packed(
        model,
        [
            PackedClient(d, start, torch.Generator().manual_seed(10 + i), 0.0, caps[i])
            for i, d in enumerate(datas)
        ],
        scenario.train,
        torch.device("cpu"),
    )
    for i, d in enumerate(datas):
        alone = build_model(scenario.model, info.input_shape, info.num_classes)
        alone.load_state_dict(start)
        job = TrainJob(
            alone, d, scenario, {}, None, torch.Generator().manual_seed(10 + i), torch.device("cpu")
        )
        result = local_sgd(job, max_steps=caps[i])
        steps = caps[i] or scenario.train.epochs * math.ceil(len(d.x_train) / 16)
        assert packed[i].num_steps == result.num_steps == steps
        assert packed[i].num_examples == result.num_examples
        assert packed[i].train_loss == pytest.approx(result.train_loss, rel=1e-5)
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(packed[i].state[key], value, rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():  # the received state is read, never written
        assert torch.equal(start[key], value)


def test_unpackable_clients_go_through_the_client_app(tmp_path: Path, caplog) -> None:
    """Edge trainers are not packed: they run sequentially, the FedAvg clients packed, and the
    model is still the in-process engine's."""
    raw = {
        **BASE,
        "edge": {"trainers": {"0": "tpsgd", "1": "forward_forward"}, "export_onnx": False},
    }
    sequential = _run(raw, "inprocess", tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedge.engines.packed"):
        packed = _run(raw, "packed", tmp_path)
    assert "trainer 'tpsgd' is not FedAvg/FedProx local SGD" in caplog.text
    _assert_same_training(sequential, packed)


def test_devices_clock_falls_back_to_sequential_bit_identically(tmp_path: Path, caplog) -> None:
    raw = {
        **BASE,
        "devices": {"assign": "mix", "mix": {"t4": 1, "jetson_nano": 1}, "dropout_prob": 0.2},
    }
    seq_rounds, seq_model = _run(raw, "inprocess", tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedge.engines.packed"):
        packed_rounds, packed_model = _run(raw, "packed", tmp_path)
    assert "[devices] is set" in caplog.text
    for key in seq_model:
        assert torch.equal(packed_model[key], seq_model[key])
    assert [r.get("central_loss") for r in packed_rounds] == [
        r.get("central_loss") for r in seq_rounds
    ]


def test_a_failing_pack_falls_back_to_the_client_app(tmp_path: Path, caplog, monkeypatch) -> None:
    import fedge.engines.packed

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(fedge.engines.packed, "train_packed", broken)
    seq_rounds, seq_model = _run(BASE, "inprocess", tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedge.engines.packed"):
        packed_rounds, packed_model = _run(BASE, "packed", tmp_path, pack_size=4)
    assert "the pack raised RuntimeError: out of memory (simulated)" in caplog.text
    for key in seq_model:  # every client went through the ClientApp: the very same model
        assert torch.equal(packed_model[key], seq_model[key])


def test_packed_replies_are_built_like_the_clientapps(tmp_path: Path) -> None:
    """Both engines build replies with clients/replies.py::train_reply: every clients.jsonl row
    has the same fields, identity, byte count and step count (the loss within float tolerance)."""
    _run(BASE, "inprocess", tmp_path)
    _run(BASE, "packed", tmp_path)

    def rows(engine: str) -> list[dict]:
        found = load_run(tmp_path / engine).clients
        return sorted(found, key=lambda r: (r["round"], r["partition_id"]))

    sequential, packed = rows("inprocess"), rows("packed")
    assert len(packed) == len(sequential) == BASE["num_rounds"] * BASE["data"]["num_clients"]
    for s, p in zip(sequential, packed, strict=True):
        assert p.keys() == s.keys()
        for key in ("round", "partition_id", "trainer", "bytes_up", "num_examples", "num_steps"):
            assert p[key] == s[key], key
        assert p["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
