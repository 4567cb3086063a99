"""End-to-end: clustered, CFL, IFCA and personalized evaluation through the real ServerApp/ClientApp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from clients.data import dataset_info
from clients.models import build_model
from fedge.engines import run_engine
from scenarios.config import ScenarioError, validate_scenario
from scenarios.results import load_run
from server.cluster_base import CLUSTERS_FILE
from server.clustered import ClusteredPersonalization
from server.strategies import ServerSetup, fedavg_kwargs


def small(tmp_path: Path, algorithm: dict, engine: str = "inprocess", **extra):
    raw = {
        "name": f"e2e-{algorithm['name']}",
        "seed": 3,
        "num_rounds": 3,
        "output_dir": str(tmp_path),
        "data": {
            "dataset": "mnist1d",
            "num_clients": 6,
            "partitioner": "pathological",
            "classes_per_client": 2,
            "num_samples": 800,  # not 600: test_data expects to generate that one itself
        },
        "model": {"name": "mlp", "hidden": [16]},
        "algorithm": algorithm,
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "federation": {"fraction_evaluate": 1.0},
        "personalization": {"finetune_epochs": 1},
        "engine": {"name": engine},
        **extra,
    }
    return validate_scenario(raw)


def clusters_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / CLUSTERS_FILE).read_text().splitlines()]


def test_clustered_inprocess(tmp_path: Path) -> None:
    algorithm = {
        "name": "clustered",
        "warmup_rounds": 1,
        "k_max": 4,
        "s_min": -1.0,
        "recluster_every": 2,
    }
    summary = run_engine(small(tmp_path, algorithm), tmp_path / "run", show_progress=False)
    run = load_run(tmp_path / "run")
    log = clusters_log(tmp_path / "run")
    assert [r["round"] for r in log] == [1, 2, 3]
    clustering = log[0]["events"][0]["clustering"]
    assert clustering["num_clients"] == 6 and clustering["rule"] == "silhouette"
    assert log[0]["num_clusters"] >= 2  # s_min = -1: the best cut always beats one cluster
    assert sorted(map(int, log[-1]["assignment"])) == list(range(6))
    assert sum(log[-1]["cluster_sizes"].values()) == 6
    clustered_at = [r["round"] for r in log if any("clustering" in e for e in r["events"])]
    assert clustered_at == [1, 3]  # after warm-up, then every 2 rounds
    for r in clustered_at:
        assert (tmp_path / "run" / f"dendrogram-r{r}.png").stat().st_size > 0
    assert run.rounds[1]["num_clusters"] == log[0]["num_clusters"]
    # personalized evaluation: every client, before and after fine-tuning
    last = [c for c in run.clients if c["round"] == 3]
    assert len(last) == 6 and all(0 <= c["personalized_accuracy"] <= 1 for c in last)
    assert summary["num_clients_evaluated"] == 6
    assert summary["personalized_accuracy_worst10"] <= summary["personalized_accuracy_mean"]
    for name in ("personalized_hist.png", "personalized_vs_global.png", "personalization.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0


def test_clustered_assigns_late_clients_by_lowest_loss(tmp_path: Path) -> None:
    """Half the clients train per round: those absent at clustering time join by the IFCA rule."""
    scenario = small(
        tmp_path,
        {"name": "clustered", "warmup_rounds": 1, "k_max": 3, "s_min": -1.0, "meta": "perfedavg"},
        num_rounds=4,
        federation={"fraction_train": 0.5, "fraction_evaluate": 1.0},
    )
    run_engine(scenario, tmp_path / "run", show_progress=False)
    log = clusters_log(tmp_path / "run")
    at_clustering = set(log[0]["assignment"])
    assert len(at_clustering) == 3
    trained = {
        str(c["partition_id"]) for c in load_run(tmp_path / "run").clients if "train_loss" in c
    }
    assert set(log[-1]["assignment"]) == trained  # every client that trained got a cluster
    picks = [c for c in load_run(tmp_path / "run").clients if "cluster_id" in c and c["round"] > 1]
    late = {str(c["partition_id"]) for c in picks} - at_clustering
    assert late  # (seeded: some clients first train after the clustering round)
    for pid in late:  # a late client's cluster is the one it picked
        assert log[-1]["assignment"][pid] in {
            c["cluster_id"] for c in picks if str(c["partition_id"]) == pid
        }


def test_cfl_splits_when_stationary_but_divergent(tmp_path: Path) -> None:
    scenario = small(
        tmp_path,
        {"name": "cfl", "eps1": 0.3, "eps2": 0.35, "warmup_rounds": 2, "min_cluster_size": 1},
    )
    run_engine(scenario, tmp_path / "run", show_progress=False)
    log = clusters_log(tmp_path / "run")
    assert log[0]["num_clusters"] == 1  # no split before warmup_rounds
    norms = log[0]["events"][-1]["update_norms"]["0"]
    assert norms["mean_norm"] < norms["max_norm"]
    splits = [e["split"] for r in log for e in r["events"] if "split" in e]
    assert splits and log[-1]["num_clusters"] == 1 + len(splits)
    assert all(s["mean_norm"] < 0.3 and s["max_norm"] > 0.35 for s in splits)


def test_ifca_clients_pick_a_cluster(tmp_path: Path) -> None:
    scenario = small(tmp_path, {"name": "ifca", "num_clusters": 2}, num_rounds=2)
    run_engine(scenario, tmp_path / "run", show_progress=False)
    run = load_run(tmp_path / "run")
    picked = [c["cluster_id"] for c in run.clients if "train_loss" in c]
    assert len(picked) == 12 and set(picked) <= {0, 1}
    assert run.rounds[1]["bytes_down"] == 2 * run.rounds[1]["bytes_up"]  # both models go down
    assert clusters_log(tmp_path / "run")[-1]["num_clusters"] == 2


def test_personalization_for_fedavg_and_schedule(tmp_path: Path) -> None:
    scenario = small(
        tmp_path,
        {"name": "fedavg"},
        num_rounds=3,
        personalization={"finetune_steps": 3, "evaluate_every": 2},
    )
    summary = run_engine(scenario, tmp_path / "run", show_progress=False)
    rounds = load_run(tmp_path / "run").rounds
    evaluated = [r["round"] for r in rounds if "personalized_accuracy" in r]
    assert evaluated == [2, 3]  # every 2 rounds, and always the last
    assert "personalized_accuracy_mean" in summary
    with pytest.raises(ScenarioError, match="fraction_evaluate"):
        small(tmp_path, {"name": "fedavg"}, federation={"fraction_evaluate": 0.0})


def test_cluster_state_round_trips() -> None:
    scenario = small(Path("."), {"name": "clustered"})
    info = dataset_info(scenario.data)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    setup = ServerSetup(scenario, info, model, torch.device("cpu"))
    strategy = ClusteredPersonalization(setup, **fedavg_kwargs(scenario))
    arrays = ArrayRecord(model.state_dict())
    strategy.set_clusters({0: arrays, 1: arrays}, {0: 0, 1: 1, 2: 1})
    strategy.last_clustering_round = 5
    state = strategy.state_dict()
    json.dumps(state["meta"])  # JSON-able metadata; models as ArrayRecords
    restored = ClusteredPersonalization(setup, **fedavg_kwargs(scenario))
    restored.load_state_dict(state)
    assert restored.assignment == {0: 0, 1: 1, 2: 1}
    assert restored.cluster_sizes() == {0: 1, 1: 2} and restored.last_clustering_round == 5
    for key, value in restored.models[1].items():
        assert np.array_equal(value.numpy(), arrays[key].numpy())


@pytest.mark.slow
@pytest.mark.ray
def test_clustered_ray_matches_inprocess(tmp_path: Path) -> None:
    algorithm = {"name": "clustered", "warmup_rounds": 1, "k_max": 4, "s_min": -1.0}
    run_engine(small(tmp_path, algorithm), tmp_path / "inprocess", show_progress=False)
    run_engine(small(tmp_path, algorithm, engine="ray"), tmp_path / "ray")
    ours, ray = clusters_log(tmp_path / "inprocess"), clusters_log(tmp_path / "ray")
    assert [r["assignment"] for r in ray] == [r["assignment"] for r in ours]
    key = "personalized_accuracy"
    assert [r.get(key) for r in load_run(tmp_path / "ray").rounds] == pytest.approx(
        [r.get(key) for r in load_run(tmp_path / "inprocess").rounds], abs=1e-6
    )
