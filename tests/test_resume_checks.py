"""``fedge run --resume`` checks the checkpoint against the run before it changes anything (issue
#23): a checkpoint from another scenario, or with other parameter names, shapes or dtypes, is
refused with one message saying what differs and what to do, and every file of the run folder
stays byte-identical; a finished run resumed is a no-op that says so."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from fedge.cli import app
from fedge.engines import run_engine
from scenarios.config import load_scenario
from server.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint

runner = CliRunner()


def write_scenario(path: Path, output_dir: Path, **changes) -> Path:
    raw = {
        "name": "checks",
        "seed": 3,
        "num_rounds": 2,
        "output_dir": str(output_dir),
        "data": {"dataset": "mnist1d", "num_clients": 3, "num_samples": 600},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "federation": {"fraction_train": 1.0, "fraction_evaluate": 0.0},
    }
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[leaf] = value
    path.write_text(tomli_w.dumps(raw))
    return path


def hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (names and contents): what a refused resume must not touch."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def finished_run(tmp_path: Path, name: str, **changes) -> Path:
    run_dir = tmp_path / name
    scenario = write_scenario(tmp_path / f"{name}.toml", tmp_path, **changes)
    run_engine(load_scenario(scenario), run_dir, show_progress=False)
    return run_dir


def resume(run_dir: Path):
    return runner.invoke(app, ["run", "--resume", str(run_dir), "--quiet"])


def plain(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    return {
        "own": finished_run(tmp, "own"),
        "wider": finished_run(tmp, "wider", **{"model.hidden": [24]}),
        "other_seed": finished_run(tmp, "other_seed", seed=4),
    }


def copy_run(runs: dict[str, Path], tmp_path: Path, foreign: str | None = None) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(runs["own"], run_dir)
    if foreign is not None:
        shutil.copy(runs[foreign] / CHECKPOINT_FILE, run_dir / CHECKPOINT_FILE)
    return run_dir


def raise_rounds(run_dir: Path, num_rounds: int) -> None:
    """num_rounds is one of what a resume may change: the run has rounds left again."""
    toml = run_dir / "scenario.toml"
    toml.write_text(toml.read_text().replace("num_rounds = 2", f"num_rounds = {num_rounds}"))


@pytest.mark.parametrize("rounds_left", [False, True])
def test_checkpoint_with_other_shapes_is_refused_and_nothing_changes(
    runs: dict[str, Path], tmp_path: Path, rounds_left: bool
) -> None:
    run_dir = copy_run(runs, tmp_path, foreign="wider")
    if rounds_left:
        raise_rounds(run_dir, 3)
    before = hashes(run_dir)
    result = resume(run_dir)
    assert result.exit_code == 2, result.output
    message = plain(result.output)
    assert "does not belong to this run" in message
    assert "model.hidden" in message  # the scenario key that differs ...
    assert "this model float32[16, 40]" in message  # ... and the parameters' shapes
    assert "Nothing in" in message and "was changed" in message
    assert isinstance(result.exception, SystemExit)  # fail()'s exit 2, not an uncaught error
    assert hashes(run_dir) == before


@pytest.mark.parametrize("rounds_left", [False, True])
def test_checkpoint_of_another_scenario_is_refused_and_nothing_changes(
    runs: dict[str, Path], tmp_path: Path, rounds_left: bool
) -> None:
    """Same model (names, shapes, dtypes all fit) but another seed: only the fingerprint tells."""
    run_dir = copy_run(runs, tmp_path, foreign="other_seed")
    if rounds_left:
        raise_rounds(run_dir, 3)
    before = hashes(run_dir)
    result = resume(run_dir)
    assert result.exit_code == 2, result.output
    assert "seed: checkpoint 4, this run 3" in plain(result.output)
    assert "scenario.toml this run was started with" in plain(result.output)
    assert hashes(run_dir) == before


def test_finished_run_resumed_is_a_noop_that_says_so(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_run(runs, tmp_path)
    before = hashes(run_dir)
    result = resume(run_dir)
    assert result.exit_code == 0, result.output
    assert "already finished" in result.output and "no file changed" in result.output
    assert hashes(run_dir) == before


def test_raised_num_rounds_still_resumes(runs: dict[str, Path], tmp_path: Path) -> None:
    """What a resume may change (num_rounds here) is not a mismatch."""
    run_dir = copy_run(runs, tmp_path)
    raise_rounds(run_dir, 3)
    result = resume(run_dir)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run_dir).server_round == 3


def test_checkpoint_past_num_rounds_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_run(runs, tmp_path)
    toml = run_dir / "scenario.toml"
    toml.write_text(toml.read_text().replace("num_rounds = 2", "num_rounds = 1"))
    before = hashes(run_dir)
    result = resume(run_dir)
    assert result.exit_code == 2
    assert "is after round 2 but the scenario has num_rounds=1" in plain(result.output)
    assert hashes(run_dir) == before


def test_flower_engines_are_checked_before_any_process_writes_logs(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """On the ray/deployment engines the CLI checks before it starts Flower (whose logs would
    land in the run folder): no process starts, no `logs/` appears."""
    run_dir = copy_run(runs, tmp_path, foreign="wider")
    toml = run_dir / "scenario.toml"
    toml.write_text(toml.read_text().replace('name = "inprocess"', 'name = "deployment"'))
    assert 'name = "deployment"' in toml.read_text()
    before = hashes(run_dir)
    result = resume(run_dir)
    assert result.exit_code == 2, result.output
    assert "does not belong to this run" in plain(result.output)
    assert not (run_dir / "logs").exists()
    assert hashes(run_dir) == before


def test_state_that_does_not_fit_the_strategy_is_a_clear_error(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """The arrays fit but the saved strategy state does not (an edited checkpoint)."""
    from server.checkpoint import restore_run_state

    state = load_checkpoint(runs["own"])
    state.strategy_state, state.plugin_states = {"unexpected": 1}, []

    class Strict:
        def load_state_dict(self, state: dict) -> None:
            raise KeyError("gamma")

    with pytest.raises(CheckpointError, match="does not fit this run's Strict"):
        restore_run_state(state, Strict(), [])
