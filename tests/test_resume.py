"""Resume: SIGKILL a `fedge run` mid-run, `fedge run --resume RUN_DIR`, same numbers as no crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

from fedge.engines import run_engine
from scenarios.config import load_scenario
from scenarios.results import load_run
from server.checkpoint import load_checkpoint
from tests.checkpoints import wait_for_checkpoint

REPO = Path(__file__).resolve().parents[1]
NUM_ROUNDS = 8


def write_scenario(path: Path, output_dir: Path) -> Path:
    raw = {
        "name": "resume",
        "seed": 11,
        "num_rounds": NUM_ROUNDS,
        "output_dir": str(output_dir),
        "data": {
            "dataset": "mnist1d",
            "num_clients": 4,
            "partitioner": "dirichlet",
            "alpha": 0.5,
            "num_samples": 2000,
        },
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
        "federation": {"fraction_train": 0.75, "fraction_evaluate": 0.5},
    }
    path.write_text(tomli_w.dumps(raw))
    return path


def fedge(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedge.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def learning(run_dir: Path) -> list[tuple]:
    return [
        (
            r["round"],
            r["central_accuracy"],
            r["central_loss"],
            r.get("local_accuracy"),
            r.get("num_replies"),
        )
        for r in load_run(run_dir).rounds
    ]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    scenario_file = write_scenario(tmp_path / "resume.toml", tmp_path)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        fedge("run", str(scenario_file), "--run-dir", str(killed), "--quiet"),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill once round 2's checkpoint is on disk: the file's own round, not metrics.jsonl
        # (written just before it) or the file's existence (round 1's would do)
        wait_for_checkpoint(killed, 2, proc, timeout=120, poll_s=0.02)
        assert proc.poll() is None, "the run ended before it could be killed; raise NUM_ROUNDS"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (killed / "summary.json").exists()
    checkpointed = load_checkpoint(killed).server_round
    assert 2 <= checkpointed < NUM_ROUNDS

    resumed = subprocess.run(
        fedge("run", "--resume", str(killed), "--quiet"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {killed} after round {checkpointed}" in resumed.stdout

    reference = tmp_path / "reference"
    run_engine(load_scenario(scenario_file), reference, show_progress=False)

    got, want = learning(killed), learning(reference)
    assert [r[0] for r in got] == list(range(NUM_ROUNDS + 1))  # each round exactly once
    assert [r[1] for r in got] == [r[1] for r in want]  # accuracy per round: identical
    assert [r[3] for r in got] == [r[3] for r in want]
    assert [r[2] for r in got] == pytest.approx([r[2] for r in want], abs=1e-6)
    final, ref = torch.load(killed / "model.pt"), torch.load(reference / "model.pt")
    assert all(torch.equal(final[k], ref[k]) for k in ref)  # bit-identical final model
    clients = load_run(killed).clients
    assert sorted({c["round"] for c in clients}) == list(range(1, NUM_ROUNDS + 1))
    assert len(clients) == len(load_run(reference).clients)


def test_checkpoint_carries_strategy_and_plugin_state(tmp_path: Path) -> None:
    """Strategies with ``state_dict``/``load_state_dict`` (FedLAW weights, cluster assignments...)
    and plugins' ``state()`` are saved atomically and handed back on resume."""
    import random

    import numpy as np
    from flwr.app import Array, ArrayRecord

    from server.checkpoint import (
        capture_run_state,
        restore_run_state,
        save_checkpoint,
    )
    from server.validation import ReplyValidator

    class StatefulStrategy:
        def __init__(self) -> None:
            self.state = {"assignments": [0, 1, 1], "gamma": 0.7}

        def state_dict(self) -> dict:
            return dict(self.state)

        def load_state_dict(self, state: dict) -> None:
            self.state = state

    strategy, plugin = StatefulStrategy(), ReplyValidator(1.0, 4.0, 1)
    plugin.total_invalid.update({"norm": 2})
    arrays = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    random.seed(5)
    save_checkpoint(tmp_path, capture_run_state(3, arrays, strategy, [plugin]))
    expected_next = random.random()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left

    fresh_strategy, fresh_plugin = StatefulStrategy(), ReplyValidator(1.0, 4.0, 1)
    fresh_strategy.state = {}
    random.seed(99)
    state = load_checkpoint(tmp_path)
    restore_run_state(state, fresh_strategy, [fresh_plugin])
    assert state.server_round == 3
    assert np.array_equal(state.arrays["w"].numpy(), np.ones(3, dtype=np.float32))
    assert fresh_strategy.state == {"assignments": [0, 1, 1], "gamma": 0.7}
    assert fresh_plugin.total_invalid["norm"] == 2
    assert random.random() == expected_next  # RNG continues where the checkpoint left it
