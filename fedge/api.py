"""fedge as a library: run a scenario, read a run back, sweep a grid of overrides × seeds.

    import fedge
    run = fedge.run("scenarios/quickstart.toml", overrides={"num_rounds": 2})
    run.summary["final_accuracy"], run.rounds[-1], run.run_dir

The ``fedge`` command line is a thin layer over these functions. A run leaves the caller's process
as it found it (:func:`preserved_process_state`) and raises instead of exiting:
:class:`~scenarios.config.ScenarioError` for a scenario that cannot run,
:class:`~clients.datasets.DataError` for data that cannot be built,
:class:`~fedge.engines.errors.EngineError` when an engine fails, and :class:`RunFailed` when the
run finished but (mostly) aggregated nothing.

Heavy modules (torch, Flower) are imported when a run starts, not when this module is imported.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scenarios.config import (
    Overrides,
    Scenario,
    ScenarioError,
    apply_overrides,
    load_scenario,
    parse_override,
    scenario_from_toml,
    validate_scenario,
)
from scenarios.results import SCENARIO_FILE, RunData
from scenarios.results import load_run as load_run_data

ScenarioSource = str | Path | Scenario


@dataclass(frozen=True)
class Run:
    """A run's results as plain Python: ``summary`` (headline numbers), ``rounds`` (one dict per
    round, as in ``metrics.jsonl``), ``clients`` (one dict per client per round, as in
    ``clients.jsonl``), the ``run_dir`` holding every file, and the validated ``scenario``.
    ``complete`` is False for a run that never finalized (its summary is computed from its rounds).
    """

    run_dir: Path
    scenario: Scenario
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    complete: bool = True

    @property
    def failed(self) -> bool:
        """True when the run finished but was judged failed (``summary["failure"]`` says why)."""
        return self.summary.get("status") == "failed"

    def to_pandas(self, table: Literal["rounds", "clients"] = "rounds") -> Any:
        """``rounds`` or ``clients`` as a ``pandas.DataFrame`` (pandas is not a fedge dependency)."""
        if table not in ("rounds", "clients"):
            raise ValueError(f"table must be 'rounds' or 'clients', not {table!r}")
        try:
            import pandas
        except ImportError as err:
            raise ImportError(
                "Run.to_pandas needs pandas, which fedge does not install: `pip install pandas` "
                "(or use run.rounds / run.clients, plain lists of dicts)"
            ) from err
        return pandas.DataFrame(self.rounds if table == "rounds" else self.clients)

    @classmethod
    def from_data(cls, data: RunData) -> Run:
        try:
            scenario = validate_scenario(data.scenario)
        except ScenarioError as err:
            raise ScenarioError(f"{data.run_dir / SCENARIO_FILE}: {err}") from None
        return cls(data.run_dir, scenario, data.summary, data.rounds, data.clients, data.complete)


class RunFailed(RuntimeError):
    """The run finished but was judged failed (e.g. most rounds aggregated nothing); ``.run``
    holds its results, ``.run.summary["failure"]`` the reason."""

    def __init__(self, run: Run) -> None:
        super().__init__(f"run failed: {run.summary.get('failure')} — results: {run.run_dir}")
        self.run = run


@dataclass(frozen=True)
class Sweep:
    """The runs of :func:`sweep` (failed ones included, see :attr:`Run.failed`) and the
    comparison it wrote: ``report`` (markdown table) and ``plot`` (PNG) in ``folder``."""

    folder: Path
    runs: list[Run]
    report: Path
    plot: Path


# -------------------- scenarios


def resolve_scenario(scenario: ScenarioSource, overrides: Overrides | None = None) -> Scenario:
    """A validated scenario from a TOML file path, TOML text or a :class:`Scenario`, with
    ``overrides`` (``["k=v", ...]`` or ``{"data.alpha": 0.1, ...}``) applied.

    A string holding a newline or ``=`` is TOML text; any other string is a file path."""
    if isinstance(scenario, Scenario):
        if not overrides:
            return scenario
        return validate_scenario(
            apply_overrides(json.loads(scenario.model_dump_json(exclude_none=True)), overrides)
        )
    if isinstance(scenario, str) and ("\n" in scenario or "=" in scenario):
        return scenario_from_toml(scenario, overrides)
    if isinstance(scenario, str | Path):
        return load_scenario(scenario, overrides)
    raise TypeError(
        f"scenario must be a TOML file path, TOML text or a fedge Scenario, not "
        f"{type(scenario).__name__}"
    )


def check_scenario(scenario: Scenario) -> None:
    """Build the run's objects once (data, model, strategy) to fail on bad input before any run
    folder or process exists. Raises ScenarioError, DataError or ValueError naming the problem."""
    from server.setup import build_run

    with preserved_process_state():  # building seeds the global RNGs, as a run does
        build_run(scenario)


def validate(scenario: ScenarioSource, overrides: Overrides | None = None) -> Scenario:
    """Resolve and check a scenario without training; return it (what ``fedge validate`` does)."""
    resolved = resolve_scenario(scenario, overrides)
    check_scenario(resolved)
    return resolved


# -------------------- runs


def run(
    scenario: ScenarioSource,
    overrides: Overrides | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> Run:
    """Run a scenario on the engine it names (``engine.name``); return its results.

    ``run_dir`` defaults to ``<output_dir>/<name>-s<seed>-<time>``; ``progress=False`` drops the
    per-round progress line. Raises :class:`RunFailed` (with ``.run``) for a run judged failed.
    """
    resolved = resolve_scenario(scenario, overrides)
    from server.app import default_run_dir

    return _run_engine(resolved, Path(run_dir) if run_dir else default_run_dir(resolved), progress)


def resume(run_dir: str | Path, progress: bool = True) -> Run:
    """Continue an interrupted run from its last checkpoint, with the run's own scenario."""
    run_dir = Path(run_dir)
    if not (run_dir / SCENARIO_FILE).is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a run folder (no {SCENARIO_FILE}); pass the folder of a run"
        )
    return _run_engine(load_scenario(run_dir / SCENARIO_FILE), run_dir, progress, resume=True)


def _run_engine(scenario: Scenario, run_dir: Path, progress: bool, resume: bool = False) -> Run:
    from fedge.engines import run_engine  # imports torch and Flower: outside the preserved state

    if scenario.engine.name != "inprocess":  # fail before Flower processes start
        check_scenario(scenario)
    with preserved_process_state():
        run_engine(scenario, run_dir, show_progress=progress, resume=resume)
    result = load_run(run_dir)
    if result.failed:
        raise RunFailed(result)
    return result


def load_run(path: str | Path) -> Run:
    """Read a run folder (finished or crashed) back; FileNotFoundError if it is not a run."""
    return Run.from_data(load_run_data(Path(path)))


# -------------------- sweeps


GridSpec = Mapping[str, Sequence[Any]] | Sequence[str]


def sweep(
    scenario: ScenarioSource,
    grid: GridSpec | None = None,
    seeds: Sequence[int] = (0,),
    overrides: Overrides | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> Sweep:
    """Run ``scenario`` over the cartesian product of ``grid`` × ``seeds``, then write a
    comparison (``comparison.md``/``.png``, mean ± sample std over seeds) to ``out``.

    ``grid``: ``{"algorithm.name": ["fedavg", "fedprox"]}`` or ``["algorithm.name=fedavg,fedprox"]``.
    Each run is ``<out>/<label>-s<seed>`` (label: the grid values, e.g. ``fedprox_alpha-0.1``).
    A failed run is a result of the sweep (:attr:`Run.failed`), not its end.
    """
    from fedge.report import compare_runs

    base = resolve_scenario(scenario, overrides)
    axes = [
        [(key, value, _label(key, text)) for value, text in values] for key, values in _axes(grid)
    ]
    seed_list = [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("a sweep needs at least one seed")
    folder = Path(out) if out else _default_sweep_dir(base)
    combos = list(itertools.product(*axes))
    runs: list[Run] = []
    for i, (combo, seed) in enumerate(itertools.product(combos, seed_list), 1):
        label = "_".join(part for _, _, part in combo) or base.name
        if progress:
            print(f"sweep {i}/{len(combos) * len(seed_list)} {label} seed={seed}", flush=True)
        changes = {**{key: value for key, value, _ in combo}, "seed": seed, "name": label}
        try:
            runs.append(run(base, changes, folder / f"{label}-s{seed}", progress))
        except RunFailed as failed:
            runs.append(failed.run)
    plot, report = compare_runs([r.run_dir for r in runs], folder)
    return Sweep(folder, runs, report, plot)


def _axes(grid: GridSpec | None) -> list[tuple[str, list[tuple[Any, str]]]]:
    """(dotted key, [(value, its text for labels)]) per grid axis."""
    if grid is None:
        return []
    if isinstance(grid, Mapping):
        return [(key, [(v, _text(v)) for v in values]) for key, values in grid.items()]
    axes = []
    for item in [grid] if isinstance(grid, str) else grid:
        path, value = parse_override(item)
        key = ".".join(path)
        texts = [_text(v) for v in value] if isinstance(value, list) else str(value).split(",")
        # each text is read back as a TOML literal, as `--set key=text` would be
        axes.append((key, [(parse_override(f"{key}={t}")[1], t) for t in texts]))
    return axes


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _label(key: str, text: str) -> str:
    """``algorithm.name``, ``fedprox`` -> ``fedprox``; ``data.alpha``, ``0.1`` -> ``alpha-0.1``."""
    last = key.split(".")[-1]
    label = text if last == "name" else f"{last}-{text}"
    # the label names a folder (and the run): path parts in a value must not become folders
    return label.replace("/", "_").replace("\\", "_").strip(".") or "run"


def _default_sweep_dir(scenario: Scenario) -> Path:
    return (
        scenario.resolved_output_dir() / f"sweep-{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )


# -------------------- the caller's process


@contextmanager
def preserved_process_state() -> Iterator[None]:
    """Put back what a run changes in this process: torch's thread count, the global RNGs
    (``random``, numpy, torch) that seeding resets, environment variables, warning filters,
    the level/handlers/propagation of every logger that existed before, and Flower's
    ``TaskIdentity`` (the in-process engine sets it as a SuperNode would)."""
    import numpy as np
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    threads = torch.get_num_threads()
    rng_states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    environ = dict(os.environ)
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    logger_states = {lg: (lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers}
    identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    try:
        with warnings.catch_warnings():  # puts the warning filters back
            yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        for lg, (level, handlers, propagate, disabled) in logger_states.items():
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity
