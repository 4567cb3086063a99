"""Personalized evaluation on the server side: what to ask clients, and what to report.

* :func:`evaluate_config_fn` turns ``[personalization]`` into the per-round evaluate config the
  round loop sends (``finetune-epochs`` / ``finetune-steps``; rounds off the ``evaluate_every``
  schedule skip client evaluation; the last round is always evaluated).
* :func:`finalize_personalization` reads the per-client rows of the last evaluated round and
  writes ``personalization.json`` (per-client accuracies; mean and worst-10% before and after
  fine-tuning), ``personalized_hist.png`` (per-client histogram) and
  ``personalized_vs_global.png`` (central accuracy of the global arrays, mean local accuracy
  before and after fine-tuning, per round), and adds the headline numbers to ``summary.json``.

Worst-10% = mean accuracy of the ⌈10%⌉ worst clients (at least one). Means here are unweighted
over clients; the per-round ``local_accuracy``/``personalized_accuracy`` columns in
``metrics.jsonl`` are Flower's sample-weighted averages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord

from scenarios.config import Scenario
from scenarios.results import (
    CLIENTS_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    _dumps,
    atomic_write,
    draw_line,
    new_figure,
    read_jsonl,
    save_figure,
    series,
    style_axes,
)

PERSONALIZATION_FILE = "personalization.json"
HIST_FILE = "personalized_hist.png"
CURVES_FILE = "personalized_vs_global.png"


def evaluate_config_fn(scenario: Scenario) -> Callable[[int], ConfigRecord | None] | None:
    """The loop's ``evaluate_config`` for this scenario (None when personalization is off)."""
    pers = scenario.personalization
    if not pers.enabled:
        return None

    def config(server_round: int) -> ConfigRecord | None:
        if server_round % pers.evaluate_every and server_round != scenario.num_rounds:
            return None
        return ConfigRecord(
            {"finetune-epochs": pers.finetune_epochs, "finetune-steps": pers.finetune_steps}
        )

    return config


def worst_fraction_mean(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the ⌈fraction·n⌉ lowest values (at least one); NaN for no values."""
    vals = sorted(v for v in values if math.isfinite(v))
    if not vals:
        return math.nan
    k = max(1, math.ceil(fraction * len(vals)))
    return float(np.mean(vals[:k]))


def client_accuracies(rows: list[dict], key: str) -> tuple[int | None, dict[int, float]]:
    """(last round where some client reported ``key``, partition id -> value in that round)."""
    rounds = [r["round"] for r in rows if isinstance(r.get(key), int | float)]
    if not rounds:
        return None, {}
    last = max(rounds)
    return last, {
        int(r["partition_id"]): float(r[key])
        for r in rows
        if r["round"] == last and isinstance(r.get(key), int | float) and "partition_id" in r
    }


def plot_histogram(per_client: dict[str, dict[int, float]], out: Path, title: str) -> Path:
    fig, (ax,) = new_figure()
    bins = np.linspace(0.0, 1.0, 21)
    for label, values in per_client.items():
        if values:
            ax.hist(list(values.values()), bins=bins, alpha=0.6, label=label)
    ax.set_xlabel("local test accuracy")
    ax.set_ylabel("clients")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, out)


def plot_curves(rounds: list[dict], out: Path, title: str) -> Path:
    fig, (ax,) = new_figure()
    drawn = 0
    for key, label in (
        ("central_accuracy", "global arrays, central test"),
        ("local_accuracy", "received model, local test"),
        ("personalized_accuracy", "after fine-tuning, local test"),
    ):
        xs, ys = series(rounds, key)
        if xs:
            draw_line(ax, xs, ys, label)
            drawn += 1
    style_axes(ax, "round", "accuracy", title, drawn > 0)
    return save_figure(fig, out)


def finalize_personalization(run_dir: Path, summary: dict) -> dict:
    """Write the personalization files of ``run_dir``; return ``summary`` plus its headline numbers
    (also written back to ``summary.json``). Does nothing when no client reported accuracy."""
    run_dir = Path(run_dir)
    clients_file = run_dir / CLIENTS_FILE
    rows = read_jsonl(clients_file) if clients_file.is_file() else []
    pers_round, personalized = client_accuracies(rows, "personalized_accuracy")
    local_round, local = client_accuracies(rows, "local_accuracy")
    if local_round is None:
        return summary
    if pers_round is not None:  # compare before/after in the same round
        local = client_accuracies([r for r in rows if r["round"] == pers_round], "local_accuracy")[
            1
        ]
    extra = {
        "personalization_round": pers_round if pers_round is not None else local_round,
        "num_clients_evaluated": len(personalized or local),
        "local_accuracy_mean": float(np.mean(list(local.values()))) if local else math.nan,
        "local_accuracy_worst10": worst_fraction_mean(list(local.values())),
    }
    if personalized:
        extra["personalized_accuracy_mean"] = float(np.mean(list(personalized.values())))
        extra["personalized_accuracy_worst10"] = worst_fraction_mean(list(personalized.values()))
    atomic_write(
        run_dir / PERSONALIZATION_FILE,
        _dumps(
            {
                **extra,
                "local_accuracy": {str(p): v for p, v in sorted(local.items())},
                "personalized_accuracy": {str(p): v for p, v in sorted(personalized.items())},
            },
            indent=2,
        )
        + "\n",
    )
    plot_histogram(
        {"before fine-tuning": local, "after fine-tuning": personalized},
        run_dir / HIST_FILE,
        f"per-client accuracy, round {extra['personalization_round']}",
    )
    rounds = sorted(read_jsonl(run_dir / METRICS_FILE), key=lambda r: r["round"])
    plot_curves(rounds, run_dir / CURVES_FILE, f"{run_dir.name}: personalized vs global")
    merged = {**summary, **extra}
    atomic_write(run_dir / SUMMARY_FILE, _dumps(merged, indent=2) + "\n")
    return merged
