"""The packed engine trains the same model as the sequential in-process engine for every method
that declares its local step (FedAvg, FedProx, FedLD, FedLAW, clustered, CFL, IFCA, Per-FedAvg,
tpSGD, forward-forward), gives ``[devices]`` and ``[attack]`` runs (label-flip attackers included)
the ClientApp's outcomes, and falls back to the ClientApp, saying why, for what it cannot pack."""

from __future__ import annotations

import copy
import logging
import math
import tomllib
from pathlib import Path

import pytest
import torch

from clients.data import dataset_info, load_client_data
from clients.models import build_model
from clients.packed import PackedClient, train_packed
from clients.training import LocalPlan, TrainJob, local_sgd, run_local_plan
from edge.forward_forward import forward_forward_plan
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
    pytest.param({"edge": {"trainers": {"0-3": "tpsgd"}, "export_onnx": False}}, id="tpsgd-ce-mlp"),
    pytest.param(
        {
            "model": {"name": "cnn1d", "channels": 8},
            "train": {**BASE["train"], "epochs": 1, "weight_decay": 0.01},
            "edge": {"trainers": {"*": "tpsgd"}, "tpsgd_loss": "mse", "export_onnx": False},
        },
        id="tpsgd-mse-cnn1d",
    ),
    pytest.param(  # Adam and negative-label draws; the other clients backprop the same model
        {
            "model": {"name": "ff_mlp", "hidden": [32, 32]},
            "edge": {"trainers": {"0-4": "forward_forward"}, "export_onnx": False},
        },
        id="forward-forward-and-fedavg",
    ),
    pytest.param(
        {
            "model": {"name": "ff_mlp", "hidden": [32, 32]},
            "train": {**BASE["train"], "epochs": 3},
            "edge": {
                "trainers": {"*": "forward_forward"},
                "ff_lr": 0.02,
                "ff_threshold": 1.0,
                "export_onnx": False,
            },
        },
        id="forward-forward",
    ),
]


@pytest.mark.parametrize("overrides", METHODS)
def test_packed_engine_trains_the_sequential_model(overrides: dict, tmp_path: Path, capsys) -> None:
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


def test_packed_forward_forward_matches_its_trainer_client_by_client() -> None:
    """Adam with every client's own moments, the negative labels drawn from every client's own
    generator between its batches, ragged data and step caps: each client's result is the one
    the sequential forward-forward trainer gives it."""
    scenario = validate_scenario(
        {**BASE, "name": "unit", "model": {"name": "ff_mlp", "hidden": [32, 32]}}
    )
    info = dataset_info(scenario.data)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    datas = [load_client_data(scenario.data, scenario.seed, pid) for pid in range(4)]
    assert len({len(d.x_train) for d in datas}) > 1  # ragged on purpose
    caps = [None, 3, None, 1]  # partial work on two clients

    def job(i: int, model: torch.nn.Module) -> TrainJob:
        config = {} if caps[i] is None else {"max-local-steps": caps[i]}
        generator = torch.Generator().manual_seed(10 + i)
        return TrainJob(model, datas[i], scenario, config, None, generator, torch.device("cpu"))

    plans = [forward_forward_plan(job(i, model)).resolved(job(i, model)) for i in range(4)]
    assert len({p.pack_key() for p in plans}) == 1 and plans[0].rule == "adam"
    packed = train_packed(
        model,
        [
            PackedClient(d, start, torch.Generator().manual_seed(10 + i), max_steps=caps[i])
            for i, d in enumerate(datas)
        ],
        plans[0],
        torch.device("cpu"),
    )
    for i, d in enumerate(datas):
        alone = build_model(scenario.model, info.input_shape, info.num_classes)
        alone.load_state_dict(start)
        result = run_local_plan(job(i, alone), forward_forward_plan(job(i, alone)))
        steps = caps[i] or scenario.train.epochs * math.ceil(len(d.x_train) / 16)
        assert packed[i].num_steps == result.num_steps == steps
        assert packed[i].train_loss == pytest.approx(result.train_loss, rel=1e-5)
        for key, value in alone.state_dict().items():
            # Adam divides by sqrt(v): an entry with tiny gradients amplifies their float noise
            # (summation order), so the engines' tolerance, not SGD's 1e-5.
            torch.testing.assert_close(packed[i].state[key], value, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize(
    "edge",
    [
        pytest.param({}, id="tpsgd-and-backprop"),
        pytest.param(  # the same federation with forward-forward phones instead of tpSGD ones
            {
                "model": {"name": "ff_mlp", "hidden": [128, 128]},
                "trainers": {"4-7": "forward_forward"},
            },
            id="forward-forward-and-backprop",
        ),
    ],
)
def test_the_mixed_edge_federation_is_packed_whole(edge: dict, tmp_path: Path, capsys) -> None:
    """``scenarios/edge_mixed.toml`` (2 rounds): every client packed, the in-process model."""
    raw = tomllib.loads(Path(__file__).parents[1].joinpath("scenarios/edge_mixed.toml").read_text())
    raw["num_rounds"] = 2
    raw["model"] = edge.get("model", raw["model"])
    raw["edge"] = {**raw["edge"], "trainers": edge.get("trainers", raw["edge"]["trainers"])}
    raw["edge"]["export_onnx"] = False
    sequential = _run(raw, "inprocess", tmp_path)
    capsys.readouterr()
    packed = _run(raw, "packed", tmp_path)
    assert _packed_count(capsys.readouterr().out).startswith(
        "16 client updates packed (0 sequential"
    )
    _assert_same_training(sequential, packed)


def test_unpackable_clients_go_through_the_client_app(tmp_path: Path, caplog) -> None:
    """A trainer whose plan cannot train the run's model (forward-forward needs ``ff_mlp``) goes
    through the ClientApp, which replies with the trainer's error; the tpSGD and FedAvg clients
    are packed, and the model is still the in-process engine's."""
    raw = {
        **BASE,
        "edge": {"trainers": {"0": "tpsgd", "1": "forward_forward"}, "export_onnx": False},
    }
    sequential = _run(raw, "inprocess", tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedge.engines.packed"):
        packed = _run(raw, "packed", tmp_path)
    assert "trainer 'forward_forward''s plan raised ValueError" in caplog.text
    assert "model.name = 'ff_mlp'" in caplog.text
    assert "'tpsgd'" not in caplog.text
    assert sequential[0][1]["num_replies"] == packed[0][1]["num_replies"] == 6  # one failed
    _assert_same_training(sequential, packed)


ROUND_OUTCOMES = (
    "num_sampled",
    "num_replies",
    "num_failures",
    "num_kept",
    "num_late",
    "num_unavailable",
    "num_dropped_out",
    "num_out_of_memory",
    "virtual_round_time_s",
    "cumulative_virtual_time_s",
    "mean_work_fraction",
    "bytes_down",
    "bytes_up",
    "num_invalid",
)
TRAINED_VALUES = ("train_loss",)  # float summation order differs in the pack, nothing else


def _assert_same_outcomes(seq, packed) -> None:
    """Identical per-round outcomes and identical clients.jsonl rows (trained values to float
    noise): the same late/dropped/unavailable sets, virtual times, energy, steps and bytes."""
    for s, p in zip(seq.rounds, packed.rounds, strict=True):
        for key in ROUND_OUTCOMES:
            assert p.get(key) == s.get(key), (s["round"], key)
    assert len(seq.clients) == len(packed.clients)

    def by_client(rows: list[dict]) -> dict:
        return {(r["round"], r["partition_id"]): r for r in rows}

    seq_rows, packed_rows = by_client(seq.clients), by_client(packed.clients)
    assert seq_rows.keys() == packed_rows.keys()
    for key, s in seq_rows.items():
        p = packed_rows[key]
        assert p.keys() == s.keys(), key
        for field, value in s.items():
            if field in TRAINED_VALUES or field.startswith(("local_", "personalized_")):
                assert p[field] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, field)
            else:
                assert p[field] == value, (key, field)


# A compute-bound device: its local epochs take ~0.1 virtual s, so a 0.0347 s deadline makes it
# late, or (partial work) caps its steps; the catalog's devices are network-bound at this size.
SLOW = {
    "peak_flops": 2e7,
    "memory_bytes": 2**30,
    "uplink_bps": 1e8,
    "downlink_bps": 1e8,
    "power_w": 1.0,
}
HETERO_FLEET = {
    "profiles": {"slow": SLOW},
    "assign": "mix",
    "mix": {
        "a100": 1,
        "t4": 1,
        "jetson_nano": 1,
        "phone_sd8gen2": 1,
        "raspberry_pi_4": 1,
        "slow": 2,
    },
    "speed_sigma": 0.3,
    "availability": "markov",
    "p_on_to_off": 0.2,
    "p_off_to_on": 0.5,
    "dropout_prob": 0.2,
}


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param({"policy": "deadline", "deadline_s": 0.0347}, id="deadline"),
        pytest.param(
            {"policy": "deadline", "deadline_s": 0.0347, "partial_work": True}, id="partial-work"
        ),
        pytest.param({"policy": "first_k", "first_k": 3}, id="first-k"),
    ],
)
def test_devices_runs_packed_give_the_clocks_outcomes(policy: dict, tmp_path: Path, capsys) -> None:
    """[devices] (heterogeneous fleet, Markov availability, dropouts, a deadline or first-K):
    every client gets the same verdict, virtual time, energy and step cap as through the mod."""
    raw = {**BASE, "num_rounds": 3, "devices": {**HETERO_FLEET, **policy}}
    seq = _run_full(raw, "inprocess", tmp_path)
    capsys.readouterr()
    packed = _run_full(raw, "packed", tmp_path)
    report = _packed_count(capsys.readouterr().out)
    assert "(0 sequential" in report and "failed by their simulated device" in report
    outcomes = [(r["num_late"], r["num_unavailable"], r["num_dropped_out"]) for r in seq.rounds[1:]]
    assert any(sum(o) for o in outcomes)  # the fleet really fails and delays clients
    _assert_same_outcomes(seq, packed)
    for s, p in zip(seq.rounds, packed.rounds, strict=True):
        assert p.get("central_accuracy") == pytest.approx(s.get("central_accuracy"), abs=1e-3)
    if policy.get("partial_work"):
        assert any(r["work_fraction"] < 1 for r in packed.clients)  # capped clients


def test_devices_out_of_memory_verdicts_are_the_clocks(tmp_path: Path) -> None:
    """A device too small for the model fails with the clock's out-of-memory reason, packed too."""
    raw = {
        **BASE,
        "model": {"name": "mlp", "hidden": [256, 256]},
        "devices": {"assign": "list", "classes": ["t4", "mcu_stm32h7"]},
    }
    seq = _run_full(raw, "inprocess", tmp_path)
    packed = _run_full(raw, "packed", tmp_path)
    assert seq.rounds[1]["num_out_of_memory"] > 0
    _assert_same_outcomes(seq, packed)


@pytest.mark.parametrize("kind", ["sign_flip", "scale", "gaussian", "free_rider"])
def test_attack_runs_packed_rewrite_the_attackers_updates(
    kind: str, tmp_path: Path, capsys
) -> None:
    raw = {**BASE, "attack": {"kind": kind, "clients": [1, 4]}}
    sequential = _run(raw, "inprocess", tmp_path)
    capsys.readouterr()
    packed = _run(raw, "packed", tmp_path)
    assert "(0 sequential" in _packed_count(capsys.readouterr().out)
    _assert_same_training(sequential, packed)


def test_label_flip_attackers_are_packed(tmp_path: Path, capsys) -> None:
    """Label-flip attackers train the attack mod's own plan (plain SGD on flipped labels) in the
    pack: the same replies, outcomes and model as through the ClientApp, with a device clock."""
    raw = {
        **BASE,
        "algorithm": {"name": "fedprox", "mu": 0.3},  # the attackers train plain SGD regardless
        "attack": {"kind": "label_flip", "clients": [1, 4]},
        "devices": {**HETERO_FLEET, "policy": "deadline", "deadline_s": 0.0347},
    }
    seq = _run_full(raw, "inprocess", tmp_path)
    capsys.readouterr()
    packed = _run_full(raw, "packed", tmp_path)
    assert "(0 sequential" in _packed_count(capsys.readouterr().out)
    attackers = [r for r in packed.clients if r["partition_id"] in (1, 4) and "trainer" in r]
    assert attackers and {r["trainer"] for r in attackers} == {"local_sgd (label_flip attacker)"}
    _assert_same_outcomes(seq, packed)
    _assert_same_training(
        (seq.rounds, torch.load(seq.run_dir / MODEL_FILE)),
        (packed.rounds, torch.load(packed.run_dir / MODEL_FILE)),
    )


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
