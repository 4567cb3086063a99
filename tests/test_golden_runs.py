"""Behaviour is pinned: a few tiny runs (every algorithm family, edge trainers, device clock) give the
per-round central accuracy and loss recorded before the layout change (tests/golden_runs.json)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fedge.engines import run_engine
from scenarios.config import validate_scenario
from scenarios.results import load_run

GOLDEN = json.loads((Path(__file__).with_name("golden_runs.json")).read_text())


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_same_numbers_as_recorded(case: str, tmp_path: Path) -> None:
    expected = GOLDEN["cases"][case]
    raw = copy.deepcopy(GOLDEN["base"])
    raw.update(copy.deepcopy(expected["overrides"]))
    raw.update(name=case, output_dir=str(tmp_path))
    run_engine(validate_scenario(raw), tmp_path / "run", show_progress=False)
    rounds = load_run(tmp_path / "run").rounds
    assert [r.get("central_accuracy") for r in rounds] == expected["central_accuracy"]
    assert [r.get("central_loss") for r in rounds] == pytest.approx(
        expected["central_loss"], rel=1e-6, abs=1e-9
    )
