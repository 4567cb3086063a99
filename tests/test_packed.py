"""The packed engine trains the same model as the sequential in-process engine for every method
that declares its local step (FedAvg, FedProx, FedLD, FedLAW, clustered, CFL, IFCA, Per-FedAvg),
gives ``[devices]`` and ``[attack]`` runs the ClientApp's outcomes, and falls back to the
ClientApp, saying why, for what it cannot pack."""

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
from clients.training import LocalPlan, TrainJob, local_sgd
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
    run = _run_full(raw, engine, tmp_path, **engine_extra)
    return run.rounds, torch.load(run.run_dir / MODEL_FILE)


def _run_full(raw: dict, engine: str, tmp_path: Path, **engine_extra):
    raw = copy.deepcopy(raw)
    raw.update(name=engine, output_dir=str(tmp_path))
    raw["engine"] = {"name": engine, **engine_extra}
    run_dir = tmp_path / engine
    run_engine(validate_scenario(raw), run_dir, show_progress=False)
    return load_run(run_dir)


def _assert_same_training(seq: tuple[list, dict], packed: tuple[list, dict]) -> None:
    (seq_rounds, seq_model), (packed_rounds, packed_model) = seq, packed
    assert seq_model.keys() == packed_model.keys()
    for key in seq_model:  # float summation order differs (batched matmuls), nothing else
        torch.testing.assert_close(packed_model[key], seq_model[key], rtol=1e-4, atol=2e-5)
    for s, p in zip(seq_rounds, packed_rounds, strict=True):
        assert p.get("num_replies") == s.get("num_replies")
        assert p.get("central_loss") == pytest.approx(s.get("central_loss"), rel=1e-4)
        assert p.get("central_accuracy") == pytest.approx(s.get("central_accuracy"), abs=1e-3)
        if s.get("train_loss") is not None:
            assert p["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)


def _packed_count(stdout: str) -> str:
    """The packed engine's report: '<n> client updates packed (<m> sequential...'."""
    line = next(x for x in stdout.splitlines() if x.startswith("fedge: packed engine:"))
    return line.split("fedge: packed engine: ")[1]


CLUSTERED = {"num_rounds": 3, "federation": {"fraction_evaluate": 1.0}}
METHODS = [
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
    pytest.param({"algorithm": {"name": "fedld", "margin_lambda": 0.5}}, id="fedld"),
    pytest.param(
        {"algorithm": {"name": "fedld", "margin_lambda": 0.5, "per_sample": True}},
        id="fedld-per-sample",
    ),
    pytest.param(
        {"algorithm": {"name": "fedlaw"}, "data": {**BASE["data"], "proxy_fraction": 0.05}},
        id="fedlaw",
    ),
    pytest.param(
        {"algorithm": {"name": "clustered", "warmup_rounds": 1, "k_max": 3}, **CLUSTERED},
        id="clustered-reptile",
    ),
    pytest.param(
        {
            "algorithm": {
                "name": "clustered",
                "warmup_rounds": 1,
                "k_max": 3,
                "meta": "perfedavg",
                "perfedavg_alpha": 0.05,
                "perfedavg_beta": 0.05,
            },
            **CLUSTERED,
        },
        id="clustered-perfedavg",
    ),
    pytest.param({"algorithm": {"name": "ifca", "num_clusters": 3}, **CLUSTERED}, id="ifca"),
    pytest.param(
        {"algorithm": {"name": "cfl", "warmup_rounds": 1, "eps1": 50.0, "eps2": 50.1}, **CLUSTERED},
        id="cfl",
    ),
    pytest.param(
        {"algorithm": {"name": "perfedavg", "perfedavg_alpha": 0.05, "perfedavg_beta": 0.05}},
        id="perfedavg",
    ),
]


@pytest.mark.parametrize("overrides", METHODS)
def test_packed_engine_trains_the_sequential_model(
    overrides: dict, tmp_path: Path, capsys
) -> None:
    raw = {**BASE, **overrides}
    sequential = _run(raw, "inprocess", tmp_path)
    capsys.readouterr()
    packed = _run(raw, "packed", tmp_path, pack_size=3)  # 7 clients: chunks of 3, 3, 1
    assert "(0 sequential" in _packed_count(capsys.readouterr().out)
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
            PackedClient(d, start, torch.Generator().manual_seed(10 + i), max_steps=caps[i])
            for i, d in enumerate(datas)
        ],
        LocalPlan(cfg=scenario.train),
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
    assert "trainer 'tpsgd' declares no LocalPlan" in caplog.text
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
