"""Test-wide offline Flower environment (no telemetry, no update check, no runtime installs, temp
homes) and the ``tiny_scenario`` fixture that tests build their runs from."""

import copy
import os
import tempfile
from pathlib import Path

import pytest

_HOME = tempfile.mkdtemp(prefix="fedge-tests-")
os.environ.update(
    {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": os.path.join(_HOME, "flwr"),
        "HF_HOME": os.path.join(_HOME, "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_DEDUP_LOGS": "0",
        # Every Ray runtime a test starts is private: unset, ray.init() joins whatever cluster
        # `ray start` last left on the machine (its address file outlives the cluster, and a dead
        # one hangs the run). Tests of engine.ray_address pass their own.
        "RAY_ADDRESS": "local",
    }
)


# -------------------- the tests' tiny scenario (one definition; tests override what they test)

TINY_SCENARIO = {
    "num_rounds": 2,
    "data": {"dataset": "mnist1d", "num_clients": 3, "num_samples": 600},
    "model": {"name": "mlp", "hidden": [16]},
}


class TinyScenario:
    """Builds the tiny scenario: :data:`TINY_SCENARIO` writing under ``output_dir``. Each keyword
    replaces a top-level key; a table keyword is merged into that table
    (``data={"num_clients": 2}`` keeps the dataset and sample count)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir

    def raw(self, **tables) -> dict:
        raw = {**copy.deepcopy(TINY_SCENARIO), "output_dir": str(self.output_dir)}
        for key, value in tables.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        return raw

    def __call__(self, **tables):
        from scenarios.config import validate_scenario

        return validate_scenario(self.raw(**tables))

    def toml(self, path: Path, **tables) -> Path:
        """Write the scenario as a TOML file at ``path`` (for the CLI); return ``path``."""
        import tomli_w

        path.write_text(tomli_w.dumps(self.raw(**tables)))
        return path


@pytest.fixture
def tiny_scenario(tmp_path: Path) -> TinyScenario:
    """The tiny scenario's builder, writing runs under the test's ``tmp_path``."""
    return TinyScenario(tmp_path)


# -------------------- parallel runs (pytest-xdist, `-n 2` in pyproject's addopts)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start a Ray runtime share one xdist group, so they run one at a time in one
    worker: two Ray runtimes at once would each claim every core and the object-store memory.
    The other worker meanwhile runs the deployment tests, which mostly wait on Flower's polls."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))
