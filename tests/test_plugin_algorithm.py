"""A third-party algorithm plugs in through the ``fedge.algorithms`` entry-point group and runs end
to end, without any edit to fedge; a FedAvg run imports neither peft nor transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedge.engines import run_engine
from scenarios import registry
from scenarios.config import ScenarioError, validate_scenario
from scenarios.results import load_run

PLUGINS = Path(__file__).with_name("plugins")


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `pip install` of a package declaring the entry point leaves on sys.path: its module
    and a dist-info folder with entry_points.txt."""
    dist = tmp_path / "tiny_algorithm-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-algorithm\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\ntinyavg = tiny_algorithm:TinyAvgConfig\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGINS))
    registry.algorithm_config.cache_clear()
    registry.algorithm_names.cache_clear()
    yield
    registry.algorithm_config.cache_clear()
    registry.algorithm_names.cache_clear()


def tiny(tiny_scenario, algorithm: dict) -> dict:
    return tiny_scenario.raw(
        name="plugin", seed=1, train={"batch_size": 16, "lr": 0.1}, algorithm=algorithm
    )


def test_unknown_before_install(tiny_scenario) -> None:
    with pytest.raises(ScenarioError, match="unknown algorithm 'tinyavg'; allowed: .*fedavg"):
        validate_scenario(tiny(tiny_scenario, {"name": "tinyavg"}))


def test_plugin_algorithm_runs_end_to_end(
    installed_plugin: None, tmp_path: Path, tiny_scenario
) -> None:
    assert "tinyavg" in registry.algorithm_names()
    with pytest.raises(ScenarioError, match="algorithm.step"):
        validate_scenario(tiny(tiny_scenario, {"name": "tinyavg", "step": 2.0}))  # its own bounds

    def run(step: float, folder: str) -> list[dict]:
        scenario = validate_scenario(tiny(tiny_scenario, {"name": "tinyavg", "step": step}))
        run_engine(scenario, tmp_path / folder, show_progress=False)
        return load_run(tmp_path / folder).rounds

    half, full = run(0.5, "half"), run(1.0, "full")
    assert [r["tiny_step"] for r in half[1:]] == [0.5, 0.5]  # the plug-in's trainer ran
    assert half[-1]["central_loss"] != full[-1]["central_loss"]  # and its hyperparameter acts
    assert all(r["num_failures"] == 0 for r in half[1:])


def test_fedavg_run_and_help_import_no_peft(tmp_path: Path) -> None:
    code = (
        "import sys, subprocess\n"
        "from pathlib import Path\n"
        "from fedge.engines import run_engine\n"
        "from scenarios.config import load_scenario\n"
        "sc = load_scenario('scenarios/quickstart.toml', ['num_rounds=1', 'data.num_clients=2',"
        f" 'output_dir={tmp_path}'])\n"
        f"run_engine(sc, Path({str(tmp_path)!r}) / 'run', show_progress=False)\n"
        "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    code = (
        "import sys\nfrom fedge.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'flwr', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_plugin_gets_the_conservative_capabilities(
    installed_plugin: None, tmp_path: Path, capsys, tiny_scenario
) -> None:
    """A plug-in that declares no capability is not packed (the packed engine trains it through
    the ClientApp, saying why), gets no robust aggregation rule and no sparse replies."""
    declared = registry.algorithm_config("tinyavg")
    assert not (declared.packable or declared.fedavg_aggregation or declared.sparse_replies)
    with pytest.raises(ScenarioError, match="replaces FedAvg's mean and works with fedavg"):
        validate_scenario(
            {**tiny(tiny_scenario, {"name": "tinyavg"}), "robustness": {"aggregation": "median"}}
        )
    rounds = {}
    for engine in ("inprocess", "packed"):
        raw = {**tiny(tiny_scenario, {"name": "tinyavg"}), "engine": {"name": engine}}
        run_engine(validate_scenario(raw), tmp_path / engine, show_progress=False)
        rounds[engine] = [r.get("central_loss") for r in load_run(tmp_path / engine).rounds]
    assert "0 client updates packed (6 sequential: trainer 'tinyavg' declares no LocalPlan" in (
        capsys.readouterr().out
    )
    assert rounds["packed"] == rounds["inprocess"]
