"""Checkpoints hold tensors + plain data only: a crafted file cannot run code, and a damaged one
(empty, truncated, random bytes) gives a message naming the problem and the fix (issues #17, #18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedge.engines import run_engine
from scenarios.config import load_scenario
from scenarios.results import load_run
from server.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    RunState,
    capture_rng,
    load_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


class RunsACommand:
    """Unpickling this calls os.system: what an attacker would hide in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(run_dir: Path, marker: Path) -> Path:
    path = run_dir / CHECKPOINT_FILE
    torch.save({"format": 2, "meta": "{}", "tensors": {}, "x": RunsACommand(marker)}, path)
    return path


def good_state() -> RunState:
    arrays = ArrayRecord({"w": Array(np.arange(4, dtype=np.float32))})
    return RunState(
        server_round=2,
        arrays=arrays,
        strategy_state={"models": {"0": arrays}, "meta": {"gamma": [0.5, float("nan")]}},
        # the second plugin state is ClientStateKeeper's: each client's Context.state as bytes
        plugin_states=[
            {"total_invalid": {"norm": 1}},
            {"states": {123456789012: b"\x00\x01state", 7: b""}},
        ],
        rng_states=capture_rng(),
    )


def test_crafted_pickle_stays_inert(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = crafted_checkpoint(tmp_path, marker)
    # The file really is dangerous: a plain pickle load runs the command ...
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    # ... fedge refuses it unread.
    with pytest.raises(CheckpointError, match="other than tensors and plain data") as err:
        load_checkpoint(tmp_path)
    assert not marker.exists()
    assert "fedge run" in str(err.value)  # names the fix


def test_round_trip_keeps_every_kind_of_state(tmp_path: Path) -> None:
    state = good_state()
    save_checkpoint(tmp_path, state)
    # the file itself loads with the safe unpickler (what the fix is about)
    raw = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert set(raw) == {"format", "meta", "tensors"}
    got = load_checkpoint(tmp_path)
    assert got.server_round == 2
    assert np.array_equal(got.arrays["w"].numpy(), np.arange(4, dtype=np.float32))
    assert np.array_equal(
        got.strategy_state["models"]["0"]["w"].numpy(), np.arange(4, dtype=np.float32)
    )
    assert got.strategy_state["meta"]["gamma"][0] == 0.5
    assert np.isnan(got.strategy_state["meta"]["gamma"][1])
    assert got.plugin_states == [
        {"total_invalid": {"norm": 1}},
        {"states": {123456789012: b"\x00\x01state", 7: b""}},
    ]
    py, npy, tch = state.rng_states["python"], state.rng_states["numpy"], state.rng_states["torch"]
    assert got.rng_states["python"] == py
    assert got.rng_states["numpy"][0] == npy[0]
    assert np.array_equal(got.rng_states["numpy"][1], npy[1])
    assert tuple(got.rng_states["numpy"][2:]) == tuple(npy[2:])
    assert torch.equal(got.rng_states["torch"], tch)


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_checkpoint_gives_a_clear_error(tmp_path: Path, damage: str) -> None:
    path = save_checkpoint(tmp_path, good_state())
    data = path.read_bytes()
    path.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "random": os.urandom(4096)}[damage]
    )
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert str(path) in message and "start the run again" in message


# ------------------------------------------------------------------------------ CLI / resume


def small_scenario(tiny_scenario, path: Path, num_rounds: int = 2) -> Path:
    return tiny_scenario.toml(
        path,
        name="ckpt",
        seed=3,
        num_rounds=num_rounds,
        train={"epochs": 1, "batch_size": 32, "lr": 0.05},
        federation={"fraction_train": 1.0, "fraction_evaluate": 0.0},
    )


def fedge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedge.cli", *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_resume_with_crafted_checkpoint_exits_2_without_running_it(
    tmp_path: Path, tiny_scenario
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    small_scenario(tiny_scenario, run_dir / "scenario.toml")
    marker = tmp_path / "pwned"
    crafted_checkpoint(run_dir, marker)
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    result = fedge("run", "--resume", str(run_dir), "--quiet")
    assert result.returncode == 2, result.stdout + result.stderr
    assert not marker.exists()
    assert "Traceback" not in result.stdout + result.stderr
    assert "refused unread" in " ".join(result.stdout.split())


def test_folder_killed_before_first_checkpoint_can_be_resumed(
    tmp_path: Path, tiny_scenario
) -> None:
    """Round 0 logged, no checkpoint yet (killed during round 1): --resume starts it again."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    small_scenario(tiny_scenario, run_dir / "scenario.toml")
    (run_dir / "metrics.jsonl").write_text('{"round": 0, "central_accuracy": 0.1}\n')
    result = fedge("run", "--resume", str(run_dir), "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no checkpoint yet" in result.stdout
    assert [r["round"] for r in load_run(run_dir).rounds] == [0, 1, 2]
    # and a plain `fedge run --run-dir` into a used folder is refused with a message, no traceback
    again = fedge("run", str(run_dir / "scenario.toml"), "--run-dir", str(run_dir), "--quiet")
    assert again.returncode == 2
    assert "--resume" in again.stdout and "Traceback" not in again.stdout + again.stderr


def test_summary_after_resume_counts_the_whole_runs_wall_time(
    tmp_path: Path, tiny_scenario
) -> None:
    scenario_file = small_scenario(tiny_scenario, tmp_path / "s.toml", num_rounds=2)
    run_dir = tmp_path / "run"
    run_engine(load_scenario(scenario_file), run_dir, show_progress=False)
    # Pretend rounds 1-2 took 1000 s, and that the run was meant to go on to round 4.
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[-1]["cumulative_wall_time_s"] = 1000.0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scenario_toml = run_dir / "scenario.toml"
    scenario_toml.write_text(scenario_toml.read_text().replace("num_rounds = 2", "num_rounds = 4"))
    summary = run_engine(load_scenario(scenario_toml), run_dir, show_progress=False, resume=True)
    after = load_run(run_dir).rounds
    assert [r["round"] for r in after] == [0, 1, 2, 3, 4]
    assert after[3]["cumulative_wall_time_s"] > 1000.0
    assert summary["total_wall_time_s"] > 1000.0
    assert json.loads((run_dir / "summary.json").read_text())["total_wall_time_s"] > 1000.0
