"""Compare runs: one plot and a markdown report (per-run table + mean ± std over seeds).

Runs whose scenarios are equal apart from ``seed``, ``output_dir`` and ``name`` form a *group*
(the seeds of one configuration). ``comparison.png`` draws each group of several runs as its mean
with a shaded ±std band over thin per-run lines, and every other run as its own line.
``comparison.md`` holds a table with one row per run and a table with one row per group
(mean ± sample std, n − 1, over the group's seeds: :mod:`scenarios.stats`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scenarios.results import (
    METRICS_FILE,
    RunData,
    atomic_write,
    draw_line,
    load_run,
    new_figure,
    save_figure,
    series,
    style_axes,
)
from scenarios.stats import format_mean_std, mean_std, std_caption

GROUP_IGNORED_KEYS = ("seed", "output_dir", "name")
_SEED_SUFFIX = re.compile(r"(?:[-_]s\d+|[-_]seed[-_]?\d+)(?:-\d{8}-\d{6}(?:-\d+)?)?$")


# -------------------- finding runs


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Each path is a run dir (holds ``metrics.jsonl``) or a folder searched for run dirs.

    Runs found under one folder are sorted; duplicates are dropped; folders inside a run (e.g. its
    ``logs``) are not searched. Raises FileNotFoundError for a missing path or when no run is found.
    """
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such run or folder: {path}")
        if path.is_file() and path.name == METRICS_FILE:
            path = path.parent
        if (path / METRICS_FILE).is_file():
            found[path] = None
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is neither a run folder nor a folder of runs")
        kept: list[Path] = []
        # Sorted, so a run comes before the folders inside it, which are then skipped.
        for run in sorted(p.parent for p in path.rglob(METRICS_FILE) if p.is_file()):
            if not any(k in run.parents for k in kept):
                kept.append(run)
        found.update(dict.fromkeys(kept))
    if not found:
        listed = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise FileNotFoundError(f"no fedge runs (folders with {METRICS_FILE}) found in: {listed}")
    return list(found)


# -------------------- grouping


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def group_key(scenario: dict) -> str:
    """What must be equal for two runs to be seeds of one configuration."""
    return json.dumps(
        {k: v for k, v in scenario.items() if k not in GROUP_IGNORED_KEYS},
        sort_keys=True,
        default=str,
    )


def strip_seed_suffix(name: str) -> str:
    """``fedavg-s3`` / ``fedavg_seed3`` (maybe + ``-YYYYmmdd-HHMMSS``) -> ``fedavg``."""
    return _SEED_SUFFIX.sub("", name) or name


def _algorithm(run: RunData) -> str:
    algorithm = run.scenario.get("algorithm")
    return str(algorithm.get("name", "?")) if isinstance(algorithm, dict) else "?"


@dataclass
class Group:
    """Runs of one configuration (different seeds)."""

    label: str
    runs: list[RunData]


def group_runs(runs: Sequence[RunData]) -> list[Group]:
    """Group runs by scenario minus seed/output_dir/name (first-appearance order), label them."""
    by_key: dict[str, list[RunData]] = {}
    for run in runs:
        by_key.setdefault(group_key(run.scenario), []).append(run)
    groups = []
    for members in by_key.values():
        stripped = {strip_seed_suffix(r.run_dir.name) for r in members}
        names = {str(r.scenario.get("name", "")) for r in members}
        if len(stripped) == 1:
            label = stripped.pop()
        elif len(names) == 1 and "" not in names:
            label = names.pop()
        else:
            label = _algorithm(members[0])
        groups.append(Group(label, members))
    # Configurations that ended up with the same label: add the settings that tell them apart.
    by_label: dict[str, list[Group]] = {}
    for group in groups:
        by_label.setdefault(group.label, []).append(group)
    for clashing in by_label.values():
        if len(clashing) < 2:
            continue
        flats = [
            _flatten({k: v for k, v in g.runs[0].scenario.items() if k not in GROUP_IGNORED_KEYS})
            for g in clashing
        ]
        keys = sorted(
            {
                k
                for f in flats
                for k in f
                if len({json.dumps(x.get(k), default=str) for x in flats}) > 1
            }
        )
        for i, (group, flat) in enumerate(zip(clashing, flats, strict=True), 1):
            detail = ", ".join(f"{k}={flat.get(k)}" for k in keys) or f"#{i}"
            group.label = f"{group.label} [{detail}]"
    return groups


# -------------------- numbers


def _lower_is_better(metric: str) -> bool:
    return "loss" in metric


def final_and_best(run: RunData, metric: str) -> tuple[float, float]:
    """Last and best finite value of ``metric`` over the run's rounds (NaN if never logged)."""
    _, ys = series(run.rounds, metric)
    ys = [y for y in ys if math.isfinite(y)]
    if not ys:
        return math.nan, math.nan
    return ys[-1], (min(ys) if _lower_is_better(metric) else max(ys))


def _is_fraction(metric: str) -> bool:
    return "accuracy" in metric


def _fmt_metric(value: float, metric: str) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{100 * value:.2f}" if _is_fraction(metric) else f"{value:.4f}"


def _fmt_bytes(value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def _fmt_seconds(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) and math.isfinite(value) else "—"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def comparison_markdown(
    runs: Sequence[RunData], groups: Sequence[Group], metric: str, png_name: str
) -> str:
    """The text of ``comparison.md``."""
    pretty = metric.replace("_", " ")
    unit = " (%)" if _is_fraction(metric) else ""
    lines = [f"# Comparison: {pretty}", "", f"![{pretty} vs round]({png_name})", "", "## Runs", ""]
    rows = []
    for run in runs:
        final, best = final_and_best(run, metric)
        name = run.run_dir.name + ("" if run.complete else " (incomplete)")
        rows.append(
            [
                name,
                _algorithm(run),
                run.scenario.get("seed", "—"),
                run.summary.get("num_rounds", "—"),
                _fmt_metric(final, metric),
                _fmt_metric(best, metric),
                _fmt_bytes(run.summary.get("total_bytes_up")),
                _fmt_seconds(run.summary.get("total_wall_time_s")),
            ]
        )
    lines += _table(
        [
            "run",
            "algorithm",
            "seed",
            "rounds",
            f"final {pretty}{unit}",
            f"best {pretty}{unit}",
            "total bytes up",
            "wall time (s)",
        ],
        rows,
    )
    lines += [
        "",
        "## Over seeds",
        "",
        f"Runs whose scenarios differ only in {', '.join(GROUP_IGNORED_KEYS)}; "
        f"{std_caption()} (n: the n seeds column).",
        "",
    ]
    rows = []
    for group in groups:
        finals = [final_and_best(r, metric)[0] for r in group.runs]
        seeds = ", ".join(str(r.scenario.get("seed", "?")) for r in group.runs)
        row = [group.label, _algorithm(group.runs[0]), len(group.runs), seeds]
        if _is_fraction(metric):
            row.append(format_mean_std(finals, scale=100, digits=2))
        row.append(format_mean_std(finals, digits=4))
        rows.append(row)
    header = ["group", "algorithm", "n seeds", "seeds"]
    if _is_fraction(metric):
        header.append(f"final {pretty} (%) mean ±std")
    header.append(f"final {pretty} mean ±std")
    lines += _table(header, rows)
    return "\n".join(lines) + "\n"


# -------------------- plot


def _mean_curve(
    runs: Sequence[RunData], metric: str, x_key: str
) -> tuple[list[float], list[float], list[float]]:
    """Per-x mean and sample std over the runs that logged that x."""
    at: dict[float, list[float]] = {}
    for run in runs:
        for x, y in zip(*series(run.rounds, metric, x_key), strict=True):
            at.setdefault(x, []).append(y)
    xs = sorted(at)
    stats = [mean_std(at[x]) for x in xs]
    return xs, [m for m, _ in stats], [s for _, s in stats]


def plot_comparison(groups: Sequence[Group], metric: str, out: Path, x_key: str = "round") -> Path:
    """Groups of several seeds as mean ±std bands over thin per-run lines; single runs as lines."""
    fig, (ax,) = new_figure(width=7.5, height=4.6)
    drawn = 0
    for i, group in enumerate(groups):
        color = f"C{i % 10}"
        if len(group.runs) == 1:
            xs, ys = series(group.runs[0].rounds, metric, x_key)
            if xs:
                draw_line(ax, xs, ys, group.runs[0].run_dir.name, color=color)
                drawn += 1
            continue
        for run in group.runs:
            xs, ys = series(run.rounds, metric, x_key)
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
        xs, mean, std = _mean_curve(group.runs, metric, x_key)
        if xs:
            draw_line(
                ax,
                xs,
                mean,
                f"{group.label} (mean ±std, n={len(group.runs)})",
                color=color,
                linewidth=2,
            )
            lo = [m - s for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
            drawn += 1
    style_axes(
        ax,
        x_key,
        metric.replace("_", " "),
        f"{metric.replace('_', ' ')} vs {x_key.replace('_', ' ')}",
        drawn > 0,
    )
    return save_figure(fig, out)


# -------------------- entry point


def compare_runs(
    run_dirs: list[Path], out_dir: Path, metric: str = "central_accuracy", x_key: str = "round"
) -> tuple[Path, Path]:
    """Write ``out_dir/comparison.png`` and ``out_dir/comparison.md``; return both paths."""
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run folder")
    runs = [load_run(Path(d)) for d in run_dirs]
    groups = group_runs(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_comparison(groups, metric, out_dir / "comparison.png", x_key=x_key)
    md = atomic_write(
        out_dir / "comparison.md", comparison_markdown(runs, groups, metric, png.name)
    )
    return png, md
