"""The `fedge` command line: run, validate, sweep, report — and clean failures on bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from typer.testing import CliRunner

from fedge.cli import app
from scenarios.results import load_run

runner = CliRunner()
QUICK = Path(__file__).parents[1] / "scenarios" / "quickstart.toml"
SMALL = [
    "--set", "num_rounds=2",
    "--set", "data.num_clients=3",
    "--set", "data.num_samples=600",
    "--set", "model.name=mlp",
    "--set", "model.hidden=[16]",
]  # fmt: skip


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_run_writes_results_and_reports_where(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    flwr_log = _Records()
    logging.getLogger("flwr").addHandler(flwr_log)
    try:
        result = runner.invoke(app, ["run", str(QUICK), *SMALL, "--run-dir", str(run_dir)])
    finally:
        logging.getLogger("flwr").removeHandler(flwr_log)
    # the run is built once: Flower's strategy (and its warnings) is constructed once
    assert sum("fraction_evaluate is set to 0.0" in m for m in flwr_log.messages) == 1
    assert result.exit_code == 0, result.output
    assert str(run_dir) in result.output.replace("\n", "")
    run = load_run(run_dir)
    assert [r["round"] for r in run.rounds] == [0, 1, 2]
    assert run.scenario["num_rounds"] == 2 and run.scenario["model"]["hidden"] == [16]
    assert json.loads((run_dir / "summary.json").read_text())["num_rounds"] == 2


def test_bad_input_fails_before_work_with_named_key(tmp_path: Path) -> None:
    cases = [
        (["run", str(QUICK), "--set", "data.alpah=0.1"], "data.alpah"),
        (["run", str(QUICK), "--set", "algorithm.name=fedfoo"], "fedfoo"),
        (["run", str(tmp_path / "missing.toml")], "not found"),
        (
            [
                "run",
                str(QUICK),
                "--set",
                "data.partitioner=pathological",
                "--set",
                "data.classes_per_client=12",
            ],
            "classes_per_client",
        ),
        (["validate", str(QUICK), "--set", "model.name=cnn2d"], "cnn2d"),
    ]
    for args, needle in cases:
        result = runner.invoke(
            app, [*args, "--set", f"output_dir={tmp_path / 'out'}"] if args[0] == "run" else args
        )
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_validate_ok() -> None:
    result = runner.invoke(app, ["validate", str(QUICK)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_sweep_then_report(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = [
        "sweep",
        str(QUICK),
        *SMALL,
        "--set",
        "num_rounds=1",
        "--grid",
        "algorithm.name=fedavg,fedprox",
    ]
    result = runner.invoke(app, [*args, "--seeds", "0,1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["fedavg-s0", "fedavg-s1", "fedprox-s0", "fedprox-s1"]
    table = (out / "comparison.md").read_text()
    assert "fedprox" in table and "±" in table
    assert (out / "comparison.png").stat().st_size > 0

    report_dir = tmp_path / "report"
    result = runner.invoke(app, ["report", str(out), "--out", str(report_dir)])
    assert result.exit_code == 0, result.output
    assert (report_dir / "comparison.md").read_text() == table
