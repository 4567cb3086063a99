"""Resume restores the clients' ``Context.state`` (LoRA error-feedback residuals) on every engine:
clients send it back with their replies, the server checkpoints it and, after a resume, hands each
node its partition's state again (clients/state.py, server/client_state.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import server.app as server_app
from fedge.engines import run_engine
from scenarios.config import Scenario, validate_scenario
from scenarios.results import load_run
from server.checkpoint import load_checkpoint
from server.client_state import ClientStateKeeper

NUM_ROUNDS = 4
KILL_AFTER = 2


def lora_scenario(tmp_path: Path, **engine) -> Scenario:
    return validate_scenario(
        {
            "name": "lora-resume",
            "seed": 5,
            "num_rounds": NUM_ROUNDS,
            "output_dir": str(tmp_path),
            "data": {
                "dataset": "mnist1d",
                "num_clients": 4,
                "partitioner": "iid",
                "num_samples": 800,
                "proxy_fraction": 0.05,
            },
            "model": {"name": "mlp", "hidden": [32]},
            "algorithm": {
                "name": "lora_sparse",
                "rank": 2,
                "density": 0.1,
                "error_feedback": True,
                "pretrain_epochs": 1,
            },
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.1},
            "federation": {"fraction_evaluate": 0.0},
            "edge": {"export_onnx": False},
            "engine": {"name": "inprocess", **engine},
        }
    )


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the checkpoint of round KILL_AFTER runs."""


def kill_after_checkpoint(monkeypatch: pytest.MonkeyPatch, last_round: int) -> None:
    real = server_app.save_checkpoint

    def save_then_die(run_dir, state):
        path = real(run_dir, state)
        if state.server_round == last_round:
            raise Killed
        return path

    monkeypatch.setattr(server_app, "save_checkpoint", save_then_die)


def learning(run_dir: Path) -> list[tuple]:
    return [
        (r["round"], r["central_accuracy"], r["central_loss"], r.get("train_loss"))
        for r in load_run(run_dir).rounds
    ]


def test_inprocess_lora_error_feedback_resume_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = lora_scenario(tmp_path)
    reference = tmp_path / "reference"
    run_engine(scenario, reference, show_progress=False)

    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:
        kill_after_checkpoint(patch, KILL_AFTER)
        with pytest.raises(Killed):
            run_engine(scenario, killed, show_progress=False)
    assert not (killed / "summary.json").exists()
    state = load_checkpoint(killed)
    assert state.server_round == KILL_AFTER
    keeper = next(s for s in state.plugin_states if "states" in s)
    assert sorted(keeper["states"]) == [0, 1, 2, 3]  # every client's residuals are checkpointed

    sent = []
    real_send_back = ClientStateKeeper.send_back
    monkeypatch.setattr(
        ClientStateKeeper,
        "send_back",
        lambda self, grid, timeout, node_pid=None: (
            sent.append(real_send_back(self, grid, timeout, node_pid)) or sent[-1]
        ),
    )
    run_engine(scenario, killed, show_progress=False, resume=True)  # a fresh grid: empty states
    assert sent == [4]  # all four nodes got their residuals back

    got, want = learning(killed), learning(reference)
    assert [r[0] for r in got] == list(range(NUM_ROUNDS + 1))
    assert got == want  # bit-identical accuracy, loss and train loss in every round
    final, ref = torch.load(killed / "model.pt"), torch.load(reference / "model.pt")
    assert all(torch.equal(final[k], ref[k]) for k in ref)


def test_state_record_never_reaches_the_strategy(tmp_path: Path) -> None:
    """The state rides in train replies only to be stripped: clients.jsonl and the traffic
    counters look as if it were never sent."""
    scenario = lora_scenario(tmp_path)
    run_engine(scenario, tmp_path / "run", show_progress=False)
    with_state = load_run(tmp_path / "run")
    off = scenario.model_copy(
        update={"robustness": scenario.robustness.model_copy(update={"checkpoint": False})}
    )
    run_engine(off, tmp_path / "off", show_progress=False)
    without = load_run(tmp_path / "off")
    keys = ("round", "central_accuracy", "central_loss", "bytes_up", "bytes_down")
    assert [{k: r.get(k) for k in keys} for r in with_state.rounds] == [
        {k: r.get(k) for k in keys} for r in without.rounds
    ]
    assert all("fedge_node_state" not in c and "state" not in c for c in with_state.clients)


@pytest.mark.slow
def test_deployment_resume_restores_client_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed in-process after round 2, resumed on the deployment engine (a SuperLink and one
    SuperNode process per client, all new): the SuperNodes get their residuals back through the
    SuperLink and the run ends where the uninterrupted one does."""
    scenario = lora_scenario(tmp_path)
    reference = tmp_path / "reference"
    run_engine(scenario, reference, show_progress=False)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        kill_after_checkpoint(patch, KILL_AFTER)
        with pytest.raises(Killed):
            run_engine(scenario, run_dir, show_progress=False)
    on_supernodes = scenario.model_copy(
        update={"engine": scenario.engine.model_copy(update={"name": "deployment"})}
    )
    run_engine(on_supernodes, run_dir, resume=True)
    log = (run_dir / "logs" / "flwr-run.log").read_text()
    assert "restored the client state of 4 partitions" in log
    got, want = learning(run_dir), learning(reference)
    assert [r[:2] for r in got] == [r[:2] for r in want]
    assert [r[2] for r in got] == pytest.approx([r[2] for r in want], abs=1e-6)
    assert [r[3] for r in got[1:]] == pytest.approx([r[3] for r in want[1:]], abs=1e-6)
