"""A run that aggregated nothing does not say "done" (issue #17)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedge.cli import app
from server.outcome import judge_run


def test_judge_counts_skipped_rounds_and_names_the_cause() -> None:
    rounds = [{"round": 0}] + [
        {"round": r, "aggregated": 0, "round_skipped": 1, "num_invalid_norm": 3} for r in (1, 2, 3)
    ]
    verdict = judge_run(rounds, max_skipped_share=1.0)  # even the laxest share: all skipped fails
    assert verdict["status"] == "failed" and verdict["num_rounds_aggregated"] == 0
    assert "3 of 3 rounds" in verdict["failure"] and "norm: 3" in verdict["failure"]
    half = [{"round": 0}, {"round": 1, "aggregated": 1}, {"round": 2, "aggregated": 0}]
    assert judge_run(half, 0.5)["status"] == "ok"
    assert judge_run(half, 0.4)["status"] == "failed"
    assert judge_run([{"round": 0}, {"round": 1, "aggregated": 1}], 0.0)["status"] == "ok"


def scenario(tiny_scenario, **robustness: float) -> Path:
    return tiny_scenario.toml(
        tiny_scenario.output_dir / "s.toml",
        name="skips",
        seed=1,
        federation={"fraction_evaluate": 0.0},
        robustness=robustness,
    )


def test_a_run_that_skipped_every_round_exits_non_zero(tmp_path: Path, tiny_scenario) -> None:
    # every honest update is longer than 1e-9: the validator excludes all, every round skips
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(scenario(tiny_scenario, max_update_norm=1e-9)), "--run-dir", str(run_dir)]
    )
    said = " ".join(result.output.split())
    assert result.exit_code == 1, said
    assert "run failed" in said and "2 of 2 rounds aggregated nothing" in said
    assert "done" not in said
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["num_rounds_aggregated"] == 0
    assert "too few valid replies" in summary["failure"] and "norm: 3" in summary["failure"]


def test_a_healthy_run_is_ok(tmp_path: Path, tiny_scenario) -> None:
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(scenario(tiny_scenario)), "--run-dir", str(run_dir)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["num_rounds_aggregated"] == 2
