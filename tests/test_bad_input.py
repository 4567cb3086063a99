"""Bad scenarios, missing data, unknown names: a clear error before any work, non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from fedge.cli import app

runner = CliRunner()


def scenario_file(tmp_path: Path, **tables) -> Path:
    raw = {
        "name": "bad",
        "num_rounds": 1,
        "output_dir": str(tmp_path / "results"),
        "data": {"dataset": "mnist1d", "num_clients": 2, "num_samples": 200},
        "model": {"name": "mlp", "hidden": [8]},
    }
    for key, value in tables.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


CASES = {
    "unknown algorithm": ({"algorithm": {"name": "fedmagic"}}, "unknown algorithm 'fedmagic'"),
    "unknown device": ({"engine": {"device": "tpu"}}, "engine.device"),
    "unknown engine": ({"engine": {"name": "kubernetes"}}, "engine.name"),
    "unknown key": ({"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key"),
    "out of bounds": ({"num_rounds": 0}, "num_rounds"),
    "unknown model": ({"model": {"name": "resnet9000"}}, "model.name"),
    "missing data": (
        {
            "data": {
                "dataset": "hub",
                "hub_path": "parquet",
                "hub_data_files": {"train": "/nonexistent/train.parquet"},
            }
        },
        "data.hub_path",
    ),
    "too many clients": ({"data": {"num_clients": 500}}, "data.num_clients"),
    "fedprox bad mu": ({"algorithm": {"name": "fedprox", "mu": -1.0}}, "algorithm.mu"),
    # issue 18: what `validate` used to pass and `run` could not run
    "unknown trainer": (
        {"edge": {"trainers": {"*": "nonexistent"}}},
        "edge.trainers['*']: unknown trainer 'nonexistent'",
    ),
    "misspelt trainer": ({"edge": {"trainers": {"0": "tpsdg"}}}, "(did you mean 'tpsgd'?)"),
    "trainer range past the clients": (
        {"edge": {"trainers": {"9-12": "tpsgd"}}},
        "selector '9-12' names client 12, but data.num_clients=2 has ids 0..1",
    ),
    "trainer id past the clients": (
        {"edge": {"trainers": {"2": "tpsgd"}}},
        "selector '2' names client 2",
    ),
    "reversed trainer range": ({"edge": {"trainers": {"1-0": "tpsgd"}}}, "reversed range"),
    "infinite lr": ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number"),
    "infinite mu": (
        {"algorithm": {"name": "fedprox", "mu": float("inf")}},
        "algorithm.mu: Input should be a finite number",
    ),
    "infinite deadline": (
        {"devices": {"classes": ["t4"], "policy": "deadline", "deadline_s": float("inf")}},
        "devices.deadline_s: Input should be a finite number",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_scenario_fails_before_any_work(case: str, tmp_path: Path) -> None:
    tables, expected = CASES[case]
    path = scenario_file(tmp_path, **tables)
    for command in (["validate", str(path)], ["run", str(path), "--quiet"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and expected in " ".join(result.output.split())
    assert not (tmp_path / "results").exists()  # no run folder was made: nothing started


def _fails(args: list[str], expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output


def test_missing_scenario_file_and_bad_resume(tmp_path: Path) -> None:
    _fails(["run", str(tmp_path / "nope.toml")], "scenario file not found")
    _fails(["run", "--resume", str(tmp_path)], "not a run folder")
    (tmp_path / "scenario.toml").write_text(scenario_file(tmp_path).read_text())
    # killed before its first checkpoint: nothing to lose, the folder is started again
    result = runner.invoke(app, ["run", "--resume", str(tmp_path), "--quiet"])
    assert result.exit_code == 0 and "starting it again from round 1" in result.output
    _fails(["run"], "--resume")
