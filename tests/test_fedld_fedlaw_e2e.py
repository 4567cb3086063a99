"""FedLD and FedLAW end to end through fedge's ServerApp/ClientApp (in-process; one Ray run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from clients.data import dataset_info
from clients.models import build_model
from fedge.engines import run_engine
from scenarios.config import Scenario, ScenarioError
from scenarios.results import load_run
from server.fedlaw import WEIGHTS_FILE, FedLAW, FedLAWProxyError
from server.fedld import FedLD
from server.strategies import ServerSetup, build_strategy


def tiny(algorithm: dict, tiny_scenario, engine: str = "inprocess", **data) -> Scenario:
    return tiny_scenario(
        name=f"e2e-{algorithm['name']}-{engine}",
        seed=3,
        data={"partitioner": "dirichlet", "alpha": 1.0, **data},
        model={"hidden": [32]},
        algorithm=algorithm,
        train={"epochs": 1, "batch_size": 16, "lr": 0.1},
        engine={"name": engine},
    )


def setup_for(scenario: Scenario) -> ServerSetup:
    import torch

    info = dataset_info(scenario.data)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    return ServerSetup(scenario, info, model, torch.device("cpu"))


def test_fedld_inprocess_end_to_end(tmp_path: Path, tiny_scenario) -> None:
    scenario = tiny({"name": "fedld", "margin_lambda": 0.2}, tiny_scenario)
    assert isinstance(build_strategy(setup_for(scenario)), FedLD)
    summary = run_engine(scenario, tmp_path / "run", show_progress=False)
    rounds = load_run(tmp_path / "run").rounds
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["num_replies"] == 3
    assert rounds[-1]["central_accuracy"] > rounds[0]["central_accuracy"]
    assert math.isfinite(summary["final_accuracy"])
    assert rounds[1]["fedld_cos_to_mean"] == pytest.approx(1.0)  # first round: plain mean
    assert -1.0 <= rounds[2]["fedld_cos_to_mean"] < 1.0 - 1e-6  # principal aggregation differs


def test_fedlaw_inprocess_end_to_end(tmp_path: Path, tiny_scenario) -> None:
    scenario = tiny({"name": "fedlaw", "server_epochs": 3}, tiny_scenario, proxy_fraction=0.05)
    run_engine(scenario, tmp_path / "run", show_progress=False)
    rounds = load_run(tmp_path / "run").rounds
    assert rounds[-1]["central_accuracy"] > rounds[0]["central_accuracy"]
    for r in rounds[1:]:
        assert r["fedlaw_proxy_size"] == 24  # 5% of 480 train rows, carved before partitioning
        assert r["fedlaw_gamma"] > 0
        assert 0 <= r["fedlaw_lambda_entropy"] <= math.log(3) + 1e-9
        assert r["fedlaw_proxy_loss_after"] <= r["fedlaw_proxy_loss_before"] + 1e-6
    lines = [json.loads(s) for s in (tmp_path / "run" / WEIGHTS_FILE).read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    assert sorted(lines[0]["lambda"]) == ["0", "1", "2"]
    assert sum(lines[0]["lambda"].values()) == pytest.approx(1.0)


def test_fedlaw_without_proxy_fails_before_round_one(tmp_path: Path, tiny_scenario) -> None:
    # Caught when the scenario is validated, i.e. before any engine or run folder exists.
    with pytest.raises(ScenarioError, match=r"fedlaw.*data\.proxy_fraction.*proxy_file"):
        tiny({"name": "fedlaw"}, tiny_scenario)  # data.proxy_fraction defaults to 0
    # The strategy factory keeps its own check for scenarios built without validation.
    valid = tiny({"name": "fedlaw"}, tiny_scenario, proxy_fraction=0.1)
    unchecked = valid.model_copy(
        update={"data": valid.data.model_copy(update={"proxy_fraction": 0.0})}
    )
    with pytest.raises(FedLAWProxyError, match=r"data\.proxy_fraction \(e\.g\. 0\.02"):
        build_strategy(setup_for(unchecked))


def test_fedlaw_operator_proxy_file(tmp_path: Path, tiny_scenario) -> None:
    info = dataset_info(tiny({"name": "fedavg"}, tiny_scenario).data)
    good = tmp_path / "proxy.npz"
    rng = np.random.default_rng(0)
    np.savez(good, x=rng.normal(size=(20, *info.input_shape)), y=np.arange(20) % 10)
    strategy = build_strategy(
        setup_for(tiny({"name": "fedlaw", "proxy_file": str(good)}, tiny_scenario))
    )
    assert isinstance(strategy, FedLAW) and len(strategy.proxy_y) == 20
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3)), y=np.zeros(4))
    with pytest.raises(FedLAWProxyError, match="expected"):
        build_strategy(setup_for(tiny({"name": "fedlaw", "proxy_file": str(bad)}, tiny_scenario)))


@pytest.mark.slow
@pytest.mark.ray
def test_fedlaw_ray_matches_inprocess(tmp_path: Path, tiny_scenario) -> None:
    algorithm = {"name": "fedlaw", "server_epochs": 3}
    for engine in ("inprocess", "ray"):
        scenario = tiny(algorithm, tiny_scenario, engine=engine, proxy_fraction=0.05)
        run_engine(scenario, tmp_path / engine, show_progress=False)
    ours, ray = (load_run(tmp_path / e).rounds for e in ("inprocess", "ray"))
    assert [r["central_accuracy"] for r in ray] == [r["central_accuracy"] for r in ours]
    assert [r.get("fedlaw_gamma") for r in ray] == pytest.approx(
        [r.get("fedlaw_gamma") for r in ours], abs=1e-6
    )
