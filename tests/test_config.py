"""Scenario validation: bad input fails before any work, naming the key and the allowed values."""

from pathlib import Path

import pytest

from scenarios.config import (
    Scenario,
    ScenarioError,
    apply_overrides,
    load_scenario,
    scenario_to_toml,
    validate_scenario,
)

SCENARIOS = sorted((Path(__file__).parents[1] / "scenarios").glob("*.toml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_shipped_scenarios_validate(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.num_rounds >= 1


@pytest.mark.parametrize(
    ("raw", "needles"),
    [
        ({"bogus": 1}, ["bogus", "unknown key", "num_rounds"]),
        ({"data": {"alhpa": 0.1}}, ["data.alhpa", "alpha"]),
        ({"data": {"alpha": -1}}, ["data.alpha", "greater than 0"]),
        ({"num_rounds": "ten"}, ["num_rounds", "integer"]),
        ({"model": {"name": "resnet"}}, ["model.name", "'mlp'", "'cnn1d'"]),
        ({"algorithm": {"name": "fedsgd"}}, ["algorithm", "fedsgd", "fedavg", "fedprox"]),
        ({"algorithm": {"name": "fedprox", "mu": -0.1}}, ["algorithm.mu"]),
        (
            {"data": {"num_clients": 2}, "federation": {"min_train_clients": 3}},
            ["min_train_clients", "num_clients"],
        ),
        ({"data": {"dataset": "hub"}}, ["hub_path"]),
        ({"algorithm": {"name": "fedlaw"}}, ["fedlaw", "data.proxy_fraction", "proxy_file"]),
        ({"algorithm": {"name": "lora_sparse"}}, ["lora_sparse", "data.proxy_fraction"]),
        ({"engine": {"name": "slurm"}}, ["engine.name", "'inprocess'", "'ray'", "'deployment'"]),
    ],
)
def test_bad_scenarios_name_the_key(raw: dict, needles: list[str]) -> None:
    with pytest.raises(ScenarioError) as err:
        validate_scenario(raw)
    for needle in needles:
        assert needle in str(err.value)


def test_overrides_dotted_keys_and_types() -> None:
    raw = apply_overrides(
        {"data": {"alpha": 0.5}},
        ["data.alpha=0.1", "num_rounds=7", "algorithm.name=fedprox", "model.hidden=[8, 4]"],
    )
    scenario = validate_scenario(raw)
    assert scenario.data.alpha == 0.1
    assert scenario.num_rounds == 7
    assert scenario.algorithm.name == "fedprox"
    assert scenario.algorithm.mu == 0.01  # the algorithm's declared default
    assert scenario.model.hidden == [8, 4]


def test_bad_override_syntax() -> None:
    with pytest.raises(ScenarioError, match="key=value"):
        apply_overrides({}, ["num_rounds"])


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num_rounds = = 3")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(bad)


def test_round_trips_through_run_config_and_toml(tmp_path: Path) -> None:
    scenario = validate_scenario(
        {
            "seed": 3,
            "algorithm": {"name": "fedprox", "mu": 0.2},
            "data": {"partitioner": "dirichlet"},
        }
    )
    assert Scenario.from_run_config(scenario.to_run_config()) == scenario
    path = tmp_path / "resolved.toml"
    path.write_text(scenario_to_toml(scenario))
    assert load_scenario(path) == scenario.model_copy(update={"name": scenario.name})
    assert Scenario.from_run_config({}) == Scenario()


@pytest.mark.parametrize(
    "name", ["../../x", "/tmp/x", "a/b", "..", ".", "", "a\\b", "..\\x", "x\x00y"]
)
def test_run_names_with_path_parts_are_refused(name: str) -> None:
    """The name becomes <output_dir>/<name>-...: a path part would write outside output_dir."""
    with pytest.raises(ScenarioError, match="plain folder name"):
        validate_scenario({"name": name})


def test_cli_refuses_a_run_name_that_escapes_output_dir(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedge.cli import app

    out = tmp_path / "a" / "b" / "out"  # name=../../escaped would land in tmp_path
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'output_dir = "{out}"\n')
    result = CliRunner().invoke(app, ["run", str(scenario), "--set", "name=../../escaped"])
    assert result.exit_code == 2
    assert "plain folder name" in " ".join(result.output.split())
    assert not list(tmp_path.rglob("escaped*"))
    assert validate_scenario({"name": "fedavg-alpha_0.1..x"}).name == "fedavg-alpha_0.1..x"
