"""The results layer: one directory per run, written so that a crash loses nothing already logged.

Layout of a run directory::

    scenario.toml    the resolved scenario (rerunnable with ``fedge run``)
    metrics.jsonl    one JSON object per round, appended + flushed as it ends (0 = before training)
    clients.jsonl    one JSON object per client per round, appended and flushed the same way
    model.pt         final global weights (``torch.save`` of a state dict)
    metrics.csv      written by :meth:`RunWriter.finalize`: union of all round keys, rounds in order
    accuracy.png     written by :meth:`RunWriter.finalize`: central accuracy and losses vs round
    summary.json     written by :meth:`RunWriter.finalize`: headline numbers (see :func:`summarize`)

Append-only files are written whole lines per ``write`` and flushed; every other file is written
to a temporary file in the same folder and moved into place with ``os.replace``, so readers only
ever see a complete old file or a complete new one. :func:`load_run` reads a finished or a crashed
run alike (a crashed run gets its summary computed from the rounds that made it to disk).

Non-finite floats are kept (Python's ``json`` writes ``NaN``/``Infinity`` and reads them back).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import tomllib
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCENARIO_FILE = "scenario.toml"
METRICS_FILE = "metrics.jsonl"
CLIENTS_FILE = "clients.jsonl"
CSV_FILE = "metrics.csv"
PLOT_FILE = "accuracy.png"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"

DPI = 120


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once, at import (os.umask is process-wide, not thread-safe)

Record = dict[str, Any]


# -------------------- writing


def _json_default(obj: Any) -> Any:
    """Make numpy / torch scalars and arrays (via ``tolist``) and paths JSON-serialisable."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, default=_json_default, **kwargs)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path`` atomically.

    The temporary file is removed if the body raises: a failed write leaves the old file as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # make the bytes durable before the rename makes them visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` via a temporary file and ``os.replace``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)
    return Path(path)


class RunObserver:
    """Watches a run as it is written: each round's record once it is on disk, and the run's end.
    Experiment trackers are observers of the :class:`RunWriter`; the round loop knows none of them.
    No-op base: override what you need."""

    def on_round(self, record: Record) -> None:
        """One round's record, exactly as appended to ``metrics.jsonl``."""

    def on_end(self, summary: dict | None) -> None:
        """The run's final summary, once every file is written; None when the run raised."""


class RunWriter:
    """Writes one run directory. Per-round logging is append + flush; whole files are atomic."""

    def __init__(
        self, run_dir: Path, resume: bool = False, observers: Sequence[RunObserver] = ()
    ) -> None:
        """``resume=True`` appends to a run folder that already holds rounds (``fedge run --resume``).
        ``observers`` see each logged round and the end (:meth:`close`)."""
        self.run_dir = Path(run_dir)
        self.observers = list(observers)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if not resume and metrics.exists() and metrics.stat().st_size > 0:
            raise FileExistsError(
                f"{metrics} already holds a run; refusing to mix two runs in one folder "
                "(pick a new --run-dir, or continue the run with `fedge run --resume DIR`)"
            )
        # An (empty) metrics.jsonl marks the folder as a run from the start, so a run that dies
        # before round 0 is still found by `fedge report` and read by load_run (with no rounds).
        metrics.touch()

    def _append(self, name: str, lines: Sequence[str]) -> None:
        if not lines:
            return
        with open(self.run_dir / name, "a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))  # a single write of whole lines
            fh.flush()

    def write_scenario(self, toml_text: str) -> None:
        """Write the resolved scenario as ``scenario.toml``."""
        atomic_write(self.run_dir / SCENARIO_FILE, toml_text)

    def log_round(self, record: dict[str, float | int | None]) -> None:
        """Append one round's record (must hold ``"round"``) to ``metrics.jsonl`` and flush it."""
        if "round" not in record:
            raise ValueError(f"a round record needs a 'round' key; got keys {sorted(record)}")
        line = {"round": int(record["round"]), **{k: v for k, v in record.items() if k != "round"}}
        self._append(METRICS_FILE, [_dumps(line)])
        for observer in self.observers:
            observer.on_round(line)

    def log_clients(self, server_round: int, rows: list[dict]) -> None:
        """Append one line per client row to ``clients.jsonl``, each tagged with ``"round"``."""
        lines = [
            _dumps({"round": int(server_round), **{k: v for k, v in row.items() if k != "round"}})
            for row in rows
        ]
        self._append(CLIENTS_FILE, lines)

    def save_model(self, state_dict: dict, name: str = MODEL_FILE) -> Path:
        """``torch.save`` the state dict atomically; return its path."""
        import torch

        path = self.run_dir / name
        with atomic_path(path) as tmp:
            torch.save(state_dict, tmp)
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as an indented JSON file in the run dir, atomically; return its path."""
        return atomic_write(self.run_dir / name, _dumps(obj, indent=2) + "\n")

    def finalize(self, extra: dict | None = None) -> dict:
        """Write ``metrics.csv``, ``accuracy.png`` and ``summary.json`` (plus ``extra`` keys, e.g.
        the run's status); return the summary."""
        rounds = sorted(read_jsonl(self.run_dir / METRICS_FILE), key=lambda r: r["round"])
        write_csv(rounds, self.run_dir / CSV_FILE)
        plot_run_overview(rounds, self.run_dir / PLOT_FILE, title=self.run_dir.name)
        summary = {**summarize(rounds), **(extra or {})}
        self.write_json(SUMMARY_FILE, summary)
        return summary

    def close(self, summary: dict | None) -> None:
        """Tell the observers the run ended: with its final ``summary``, or None if it raised."""
        for observer in self.observers:
            observer.on_end(summary)


# -------------------- summaries


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _values(rounds: Sequence[Record], key: str) -> list[tuple[int, float]]:
    """(round, value) for every record where ``key`` holds a number."""
    return [(r["round"], r[key]) for r in rounds if _is_number(r.get(key))]


def _total(rounds: Sequence[Record], key: str) -> int | float:
    vals = [v for _, v in _values(rounds, key)]
    total = sum(vals)
    return int(total) if all(isinstance(v, int) for v in vals) else float(total)


def summarize(rounds: Sequence[Record]) -> dict:
    """Headline numbers of a run from its round records (any order).

    ``final_accuracy`` is the last finite ``central_accuracy``; ``best_accuracy``/``best_round``
    the highest one (earliest on ties; round 0 included). Accuracies are NaN and ``best_round``
    None when no accuracy was logged. ``num_rounds`` is the highest round number (0 if only
    round 0 or nothing was logged). ``total_wall_time_s`` is the last ``cumulative_wall_time_s``,
    else the sum of ``wall_time_s``; byte totals are sums over rounds.
    """
    rounds = sorted(rounds, key=lambda r: r["round"])
    acc = [(r, v) for r, v in _values(rounds, "central_accuracy") if math.isfinite(v)]
    best_round, best = max(acc, key=lambda rv: (rv[1], -rv[0])) if acc else (None, math.nan)
    cumulative = _values(rounds, "cumulative_wall_time_s")
    wall = float(cumulative[-1][1]) if cumulative else float(_total(rounds, "wall_time_s"))
    return {
        "final_accuracy": float(acc[-1][1]) if acc else math.nan,
        "best_accuracy": float(best),
        "best_round": best_round,
        "num_rounds": max((int(r["round"]) for r in rounds), default=0),
        "total_wall_time_s": wall,
        "total_bytes_up": _total(rounds, "bytes_up"),
        "total_bytes_down": _total(rounds, "bytes_down"),
    }


def union_keys(records: Sequence[Record]) -> list[str]:
    """All keys of ``records`` in order of first appearance, ``round`` first."""
    keys: dict[str, None] = {"round": None}
    for record in records:
        keys.update(dict.fromkeys(record))
    return list(keys)


def write_csv(rounds: Sequence[Record], path: Path) -> Path:
    """Rounds as CSV: a column per key seen in any round, empty cells where a round lacks it."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=union_keys(rounds), restval="", lineterminator="\n")
    writer.writeheader()
    for record in rounds:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return atomic_write(path, buf.getvalue())


# -------------------- reading


def read_jsonl(path: Path) -> list[Record]:
    """Read a JSONL file; a truncated *last* line (killed mid-write) is skipped with a warning."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines):
                warnings.warn(f"{path}:{i}: skipping a truncated last line ({err})", stacklevel=2)
                break
            raise ValueError(f"{path}:{i}: not valid JSON: {err}") from err
    return records


@dataclass
class RunData:
    """A run read back from disk (finished or crashed)."""

    run_dir: Path
    scenario: dict
    rounds: list[dict]
    clients: list[dict]
    summary: dict
    complete: bool = field(
        default=True
    )  # False when summary.json is missing (the run never finalized)

    @property
    def name(self) -> str:
        return self.run_dir.name


def load_run(run_dir: Path) -> RunData:
    """Read a run directory; raise FileNotFoundError naming what is missing if it is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} is not a fedge run: {metrics} is missing")
    rounds = sorted(read_jsonl(metrics), key=lambda r: r["round"])
    clients_file = run_dir / CLIENTS_FILE
    clients = read_jsonl(clients_file) if clients_file.is_file() else []
    scenario_file = run_dir / SCENARIO_FILE
    scenario = (
        tomllib.loads(scenario_file.read_text(encoding="utf-8")) if scenario_file.is_file() else {}
    )
    summary_file = run_dir / SUMMARY_FILE
    complete = summary_file.is_file()
    summary = (
        json.loads(summary_file.read_text(encoding="utf-8")) if complete else summarize(rounds)
    )
    return RunData(run_dir, scenario, rounds, clients, summary, complete)


# -------------------- plots


def new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.2) -> tuple[Any, list[Any]]:
    """A headless Agg figure (no pyplot: no global state, nothing to close, safe in threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save_figure(fig: Any, out: Path) -> Path:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(out)


def series(
    rounds: Sequence[Record], key: str, x_key: str = "round"
) -> tuple[list[float], list[float]]:
    """x and y of ``key`` vs ``x_key`` over the records where both are numbers."""
    pts = [
        (r[x_key], r[key]) for r in rounds if _is_number(r.get(x_key)) and _is_number(r.get(key))
    ]
    return [x for x, _ in pts], [y for _, y in pts]


def style_axes(ax: Any, x_key: str, y_label: str, title: str | None, has_lines: bool) -> None:
    ax.set_xlabel(x_key.replace("_", " "))
    if x_key == "round":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(y_label)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if has_lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def draw_line(ax: Any, xs: Sequence[float], ys: Sequence[float], label: str, **kwargs: Any) -> None:
    marker = "o" if len(xs) <= 30 else None
    ax.plot(xs, ys, marker=marker, markersize=3, label=label, **kwargs)


def plot_metric(
    runs: list[RunData], key: str, out: Path, x_key: str = "round", title: str | None = None
) -> Path:
    """Plot ``key`` vs ``x_key``, one line per run (label: run folder name); return ``out``."""
    fig, (ax,) = new_figure()
    drawn = 0
    for run in runs:
        xs, ys = series(run.rounds, key, x_key)
        if xs:
            draw_line(ax, xs, ys, run.run_dir.name)
            drawn += 1
    style_axes(ax, x_key, key.replace("_", " "), title or f"{key} vs {x_key}", drawn > 0)
    return save_figure(fig, out)


def plot_run_overview(rounds: Sequence[Record], out: Path, title: str | None = None) -> Path:
    """Two panels for one run: central accuracy vs round; central (and train) loss vs round."""
    fig, (acc_ax, loss_ax) = new_figure(ncols=2)
    xs, ys = series(rounds, "central_accuracy")
    if xs:
        draw_line(acc_ax, xs, ys, "central accuracy")
    style_axes(
        acc_ax, "round", "accuracy", f"{title} — accuracy" if title else "accuracy", bool(xs)
    )
    drawn = 0
    for key in ("central_loss", "train_loss"):
        xs, ys = series(rounds, key)
        if xs:
            draw_line(loss_ax, xs, ys, key.replace("_", " "))
            drawn += 1
    style_axes(loss_ax, "round", "loss", f"{title} — loss" if title else "loss", drawn > 0)
    return save_figure(fig, out)
