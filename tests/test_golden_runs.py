"""Behaviour is pinned: a few tiny runs (every algorithm family, edge trainers, device clock) give the
per-round central accuracy and loss recorded before the layout change (tests/golden_runs.json):
exactly on the in-process engine; on the packed engine, whose batched float sums differ in the last
bits, accuracy within 1e-3 and loss within 1e-4 (relative)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fedge.engines import run_engine
from scenarios.config import validate_scenario
from scenarios.results import load_run

GOLDEN = json.loads((Path(__file__).with_name("golden_runs.json")).read_text())


@pytest.mark.parametrize("engine", ["inprocess", "packed"])
@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_same_numbers_as_recorded(case: str, engine: str, tmp_path: Path) -> None:
    expected = GOLDEN["cases"][case]
    raw = copy.deepcopy(GOLDEN["base"])
    raw.update(copy.deepcopy(expected["overrides"]))
    raw.update(name=case, output_dir=str(tmp_path), engine={"name": engine})
    run_engine(validate_scenario(raw), tmp_path / "run", show_progress=False)
    rounds = load_run(tmp_path / "run").rounds
    accuracy = [r.get("central_accuracy") for r in rounds]
    loss = [r.get("central_loss") for r in rounds]
    if engine == "inprocess":
        assert accuracy == expected["central_accuracy"]
        assert loss == pytest.approx(expected["central_loss"], rel=1e-6, abs=1e-9)
    else:
        assert accuracy == pytest.approx(expected["central_accuracy"], abs=1e-3)
        assert loss == pytest.approx(expected["central_loss"], rel=1e-4)
