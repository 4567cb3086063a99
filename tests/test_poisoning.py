"""Poisoning: attacks as a client mod, Flower's robust strategies, a relative norm bound (#17)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, MultiKrum

from clients.attacks import poison_arrays
from clients.data import dataset_info
from clients.models import build_model
from fedge.engines import run_engine
from scenarios.config import ScenarioError, validate_scenario
from scenarios.results import load_run
from server.strategies import ServerSetup, build_strategy


def scenario(tmp_path: Path, **extra):
    raw = {
        "name": "poison",
        "seed": 2,
        "num_rounds": 3,
        "output_dir": str(tmp_path),
        "data": {
            "dataset": "mnist1d",
            "num_clients": 6,
            "partitioner": "iid",
            "num_samples": 3000,
        },
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "federation": {"fraction_evaluate": 0.0},
        # the defaults before #23 (no norm bound, no weight cap): these tests measure the rules alone
        "robustness": {"checkpoint": False, "relative_norm_bound": 0.0, "max_weight_share": 1.0},
    }
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_scenario(raw)


def test_poison_arrays_rewrites_the_update_only() -> None:
    sent = {"w": np.ones(4, dtype=np.float32), "steps": np.array([3], dtype=np.int64)}
    trained = {"w": np.full(4, 1.5, dtype=np.float32), "steps": np.array([4], dtype=np.int64)}
    rng = np.random.default_rng(0)
    flip = poison_arrays("sign_flip", 1.0, trained, sent, rng)
    assert np.allclose(flip["w"], 0.5) and flip["steps"][0] == 4  # integer buffers untouched
    assert np.allclose(poison_arrays("scale", 10.0, trained, sent, rng)["w"], 6.0)
    assert np.array_equal(poison_arrays("free_rider", 0.0, trained, sent, rng)["w"], sent["w"])
    noisy = poison_arrays("gaussian", 1.0, trained, sent, rng)["w"]
    assert noisy.dtype == np.float32 and not np.allclose(noisy, trained["w"])


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"attack": {"kind": "sign_flip"}}, "needs attack.clients"),
        ({"attack": {"kind": "scale", "clients": [6]}}, "not partition ids 0..5"),
        ({"attack": {"kind": "scale", "clients": [1, 1]}}, "twice"),
        (
            {"algorithm": {"name": "fedld"}, "robustness": {"aggregation": "median"}},
            "relative_norm_bound",
        ),
        ({"robustness": {"aggregation": "bulyan", "num_malicious": 1}}, "at least 7 replies"),
        ({"attack": {"kind": "gaussian", "clients": [0], "strength": math.inf}}, "strength"),
    ],
)
def test_bad_attack_and_defence_settings_are_refused(
    tmp_path: Path, raw: dict, needle: str
) -> None:
    with pytest.raises(ScenarioError, match=needle):
        scenario(tmp_path, **raw)


@pytest.mark.parametrize(
    ("aggregation", "cls"),
    [("median", FedMedian), ("trimmed_mean", FedTrimmedAvg), ("multikrum", MultiKrum)],
)
@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_robust_aggregation_uses_flowers_strategies(
    tmp_path: Path, aggregation: str, cls: type, algorithm: str
) -> None:
    sc = scenario(
        tmp_path,
        algorithm={"name": algorithm},
        robustness={"aggregation": aggregation, "num_malicious": 1},
    )
    info = dataset_info(sc.data)
    strategy = build_strategy(
        ServerSetup(sc, info, build_model(sc.model, info.input_shape, info.num_classes), "cpu")
    )
    assert isinstance(strategy, cls)
    if algorithm == "fedprox":  # the proximal term survives the swap of the aggregation rule
        from flwr.app import ArrayRecord, ConfigRecord
        from flwr.clientapp import ClientApp
        from flwr.supercore.task_identity import TaskIdentity

        from fedge.engines import SERVER_NODE_ID, InProcessGrid

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
        grid = InProcessGrid(ClientApp(), num_nodes=sc.data.num_clients, run_config={})
        messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
        assert messages and all(
            m.content["config"]["proximal-mu"] == sc.algorithm.mu for m in messages
        )


def test_sign_flip_attackers_are_marked_and_median_holds(tmp_path: Path) -> None:
    """Two of six clients flip and boost their updates ×4: FedAvg is thrown off, FedMedian keeps
    learning; clients.jsonl names the attackers."""
    attack = {"kind": "sign_flip", "clients": [0, 1], "strength": 4.0}
    results = {}
    for aggregation in ("mean", "median"):
        sc = scenario(tmp_path, attack=attack, robustness={"aggregation": aggregation})
        run_dir = tmp_path / aggregation
        results[aggregation] = run_engine(sc, run_dir, show_progress=False)
    clean = run_engine(scenario(tmp_path), tmp_path / "clean", show_progress=False)
    rows = load_run(tmp_path / "median").clients
    assert {r["partition_id"] for r in rows if r["attacker"] == 1} == {0, 1}
    assert {r["partition_id"] for r in rows if r["attacker"] == 0} == {2, 3, 4, 5}
    assert "attacker" not in load_run(tmp_path / "clean").clients[0]
    assert results["mean"]["final_accuracy"] < clean["final_accuracy"] - 0.05
    assert results["median"]["final_accuracy"] > results["mean"]["final_accuracy"] + 0.05


def test_relative_norm_bound_excludes_boosted_updates(tmp_path: Path) -> None:
    attack = {"kind": "scale", "clients": [3], "strength": 20.0}
    sc = scenario(tmp_path, attack=attack, robustness={"relative_norm_bound": 3.0})
    run_engine(sc, tmp_path / "run", show_progress=False)
    rounds = load_run(tmp_path / "run").rounds[1:]
    assert [r["num_invalid_norm"] for r in rounds] == [1, 1, 1]
    assert all(r["num_valid"] == 5 for r in rounds)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok"


@pytest.mark.parametrize("kind", ["label_flip", "free_rider", "gaussian"])
def test_every_attack_kind_runs_and_changes_the_attackers_reply(tmp_path: Path, kind: str) -> None:
    """Same seed with and without the attack: only client 2's reply differs, so the round's
    aggregate (central loss) moves; a label-flipper also reports its own, different, loss."""
    sc = scenario(tmp_path, num_rounds=1, attack={"kind": kind, "clients": [2]})
    run_engine(sc, tmp_path / "run", show_progress=False)
    run_engine(scenario(tmp_path, num_rounds=1), tmp_path / "clean", show_progress=False)
    rows = {r["partition_id"]: r for r in load_run(tmp_path / "run").clients}
    honest = {r["partition_id"]: r for r in load_run(tmp_path / "clean").clients}
    assert rows[2]["attacker"] == 1 and rows[0]["attacker"] == 0
    assert rows[0]["train_loss"] == honest[0]["train_loss"]  # the others are untouched
    attacked_loss = load_run(tmp_path / "run").rounds[1]["central_loss"]
    assert attacked_loss != load_run(tmp_path / "clean").rounds[1]["central_loss"]
    if kind == "label_flip":
        assert rows[2]["train_loss"] != honest[2]["train_loss"]


def test_server_side_dp_clipping_wraps_flowers_strategy(tmp_path: Path) -> None:
    """robustness.dp_clipping_norm wraps fedavg/fedprox in Flower's server-side fixed clipping;
    a boosted update is then clipped, so it cannot throw the model off on its own."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    dp = {"dp_clipping_norm": 0.5, "aggregation": "median"}
    sc = scenario(tmp_path, algorithm={"name": "fedprox"}, robustness=dp)
    info = dataset_info(sc.data)
    strategy = build_strategy(
        ServerSetup(sc, info, build_model(sc.model, info.input_shape, info.num_classes), "cpu")
    )
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    assert isinstance(strategy.strategy, FedMedian)
    with pytest.raises(ScenarioError, match="dp_clipping_norm"):
        scenario(tmp_path, algorithm={"name": "fedld"}, robustness={"dp_clipping_norm": 1.0})
    boosted = {"kind": "scale", "clients": [0], "strength": 50.0}
    plain = run_engine(scenario(tmp_path, attack=boosted), tmp_path / "plain", show_progress=False)
    clipped = run_engine(
        scenario(tmp_path, attack=boosted, robustness={"dp_clipping_norm": 0.5}),
        tmp_path / "clipped",
        show_progress=False,
    )
    assert clipped["final_accuracy"] > plain["final_accuracy"] + 0.05


def test_packed_engine_applies_attacks_too(tmp_path: Path) -> None:
    """The packed engine trains attackers through the ClientApp (and its attack mod): the run
    matches the in-process engine's, attackers included."""
    attack = {"kind": "scale", "clients": [1], "strength": 5.0}
    runs = {}
    for engine in ("inprocess", "packed"):
        sc = scenario(tmp_path, num_rounds=1, attack=attack, engine={"name": engine})
        run_engine(sc, tmp_path / engine, show_progress=False)
        runs[engine] = load_run(tmp_path / engine)
    assert runs["packed"].rounds[1]["central_loss"] == runs["inprocess"].rounds[1]["central_loss"]
    assert {r["partition_id"] for r in runs["packed"].clients if r["attacker"]} == {1}
