"""Issue 13: trainers marked ``@updates_parameters_only`` (FedAvg, FedProx) and client evaluation
train the process's one model of the scenario, reloaded for each client, instead of building a new
one per update; every other trainer still gets a model of its own. Same numbers either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import clients.app as client_app_module
from fedge.engines import run_engine
from scenarios.results import load_run


def _scenario(tiny_scenario, **extra) -> object:
    return tiny_scenario(
        seed=4,
        data={"num_clients": 4, "num_samples": 800},
        federation={"fraction_evaluate": 1.0},
        **extra,
    )


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    builds: list[int] = []
    real = client_app_module.build_model

    def counting(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_app_module, "build_model", counting)
    client_app_module._REUSED.clear()
    return builds


def test_fedavg_clients_share_one_model_and_get_the_fresh_model_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_scenario
) -> None:
    builds = _count_builds(monkeypatch)
    scenario = _scenario(tiny_scenario, algorithm={"name": "fedprox", "mu": 0.1})
    run_engine(scenario, tmp_path / "reused", show_progress=False)
    # 2 rounds x 4 clients x (train + evaluate) updates, one model built
    assert len(builds) == 1

    # The same run with every update on a new model (the reuse switched off) gives the same model.
    def fresh_model(*args, **kwargs):
        client_app_module._REUSED.clear()
        return real_reused(*args, **kwargs)

    real_reused = client_app_module._reused_model
    monkeypatch.setattr(client_app_module, "_reused_model", fresh_model)
    run_engine(scenario, tmp_path / "fresh", show_progress=False)
    assert len(builds) == 1 + 16
    reused, fresh = load_run(tmp_path / "reused"), load_run(tmp_path / "fresh")
    assert [r["central_accuracy"] for r in reused.rounds] == [
        r["central_accuracy"] for r in fresh.rounds
    ]
    assert [r["central_loss"] for r in reused.rounds] == [r["central_loss"] for r in fresh.rounds]
    local = [r["local_accuracy"] for r in reused.clients if "local_accuracy" in r]
    assert len(local) == 8  # every client evaluated, each round
    assert local == [r["local_accuracy"] for r in fresh.clients if "local_accuracy" in r]


def test_trainers_not_marked_get_a_model_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_scenario
) -> None:
    builds = _count_builds(monkeypatch)
    scenario = _scenario(tiny_scenario, edge={"trainers": {"0-1": "tpsgd"}, "export_onnx": False})
    run_engine(scenario, tmp_path / "run", show_progress=False)
    # tpSGD clients 0 and 1: a new model for each of their 2 x 2 train updates; the FedAvg
    # clients' training and every evaluation share one
    assert len(builds) == 4 + 1


def test_a_model_that_does_not_fit_is_still_explained() -> None:
    """The plain-copy load falls back to load_state_dict, whose error the ClientApp explains."""
    model = torch.nn.Linear(3, 2)
    targets = model.state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        client_app_module._copy_state(
            model, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, targets
        )
    with pytest.raises(RuntimeError, match="Missing key"):
        client_app_module._copy_state(model, {"weight": torch.zeros(2, 3)}, targets)
    state = {"weight": torch.ones(2, 3), "bias": torch.full((2,), 2.0)}
    client_app_module._copy_state(model, state, targets)
    assert torch.equal(model.weight, state["weight"]) and torch.equal(model.bias, state["bias"])
