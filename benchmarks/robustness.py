"""Robustness table: final central accuracy under poisoning, for FedAvg and each defence.

mnist1d, Dirichlet alpha = 0.5, 10 clients, 3 seeds; 0/1/2/3 attackers (partition ids 0..n-1) of
each kind in clients/attacks.py, at their default strengths; defences from server/robust.py and
the reply validator. Small on purpose (one CPU core, ~3-5 minutes per attack kind): the settings
are printed in the table. Cells are cached in a JSON file, so the table can be built in several
invocations (one per attack kind) and rerun cheaply:

    PYTHONPATH=. python benchmarks/robustness.py --kinds none,sign_flip      # ~4 min each (2-core box)
    PYTHONPATH=. python benchmarks/robustness.py --kinds scale,gaussian
    PYTHONPATH=. python benchmarks/robustness.py --kinds label_flip,free_rider
    PYTHONPATH=. python benchmarks/robustness.py --table    # writes docs/results/robustness.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from fedge.engines import run_engine
from scenarios.config import validate_scenario
from scenarios.stats import format_mean_std, std_caption

KINDS = ["sign_flip", "scale", "gaussian", "label_flip", "free_rider"]
ATTACKERS = [1, 2, 3]
SEEDS = [0, 1, 2]
# name -> robustness settings (Bulyan and Krum are left out: see the notes under the table)
DEFENCES: dict[str, dict] = {
    "FedAvg (mean)": {},
    "FedMedian": {"aggregation": "median"},
    "FedTrimmedAvg b=0.3": {"aggregation": "trimmed_mean", "trim_beta": 0.3},
    "MultiKrum f=3": {"aggregation": "multikrum", "num_malicious": 3},
    "mean + norm bound 3x median": {"relative_norm_bound": 3.0},
}
SETTINGS = {
    "num_rounds": 10,
    "data": {
        "dataset": "mnist1d",
        "num_clients": 10,
        "partitioner": "dirichlet",
        "alpha": 0.5,
        "num_samples": 4000,
    },
    "model": {"name": "cnn1d", "channels": 8},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    "federation": {"fraction_train": 1.0, "fraction_evaluate": 0.0},
}
CACHE = Path("docs/results/robustness.json")
TABLE = Path("docs/results/robustness.md")


def cell_key(kind: str, attackers: int, defence: str, seed: int) -> str:
    return f"{kind}|{attackers}|{defence}|{seed}"


def run_cell(kind: str, attackers: int, defence: str, seed: int, out: Path) -> dict:
    raw = {
        **SETTINGS,
        "name": "robustness",
        "seed": seed,
        "output_dir": str(out),
        "robustness": {"checkpoint": False, "max_skipped_share": 1.0, **DEFENCES[defence]},
        "attack": {"kind": kind, "clients": list(range(attackers))}
        if attackers
        else {"kind": "none"},
    }
    scenario = validate_scenario(raw)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_engine(scenario, Path(tempfile.mkdtemp(dir=out)), show_progress=False)
    return {
        "commit": _commit(),
        "final_accuracy": summary["final_accuracy"],
        "rounds_aggregated": summary.get("num_rounds_aggregated"),
        "seconds": time.perf_counter() - t0,
    }


def _commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


def load_cache() -> dict:
    return json.loads(CACHE.read_text()) if CACHE.exists() else {}


def run(kinds: list[str]) -> None:
    cache = load_cache()
    cells = [("none", 0, d, s) for d in DEFENCES for s in SEEDS] if "none" in kinds else []
    cells += [
        (k, n, d, s)
        for k in kinds
        if k != "none"
        for n in ATTACKERS
        for d in DEFENCES
        for s in SEEDS
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for kind, n, defence, seed in cells:
            key = cell_key(kind, n, defence, seed)
            if key in cache:
                continue
            cache[key] = run_cell(kind, n, defence, seed, Path(tmp))
            print(f"{key}: {100 * cache[key]['final_accuracy']:.1f}%", flush=True)
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")


def table() -> str:
    cache = load_cache()

    def accs(kind: str, n: int, defence: str) -> list[float]:
        return [
            cache[cell_key(kind, n, defence, s)]["final_accuracy"]
            for s in SEEDS
            if cell_key(kind, n, defence, s) in cache
        ]

    clean = accs("none", 0, "FedAvg (mean)")
    clean_mean = statistics.mean(clean) if clean else float("nan")
    lines = [
        "| attack | attackers | " + " | ".join(DEFENCES) + " |",
        "|---|---|" + "---|" * len(DEFENCES),
        "| none | 0 | "
        + " | ".join(format_mean_std(accs("none", 0, d), 100, 1) for d in DEFENCES)
        + " |",
    ]
    verdicts = []
    for kind in KINDS:
        for n in ATTACKERS:
            row = [accs(kind, n, d) for d in DEFENCES]
            if not any(row):
                continue
            cells = " | ".join(format_mean_std(r, 100, 1) for r in row)
            lines.append(f"| {kind} | {n} | {cells} |")
            if kind in ("sign_flip", "scale") and n <= 2 and all(row):
                best = max((statistics.mean(r), d) for r, d in zip(row, DEFENCES, strict=True))
                verdicts.append((kind, n, best[1], 100 * (clean_mean - best[0])))
    measured = sorted({c.get("commit", "?") for c in cache.values()})
    commit = f"{_commit()} (cells measured at {', '.join(measured)})"
    seconds = [c["seconds"] for c in cache.values()]
    s = SETTINGS
    out = [
        "# Robustness to poisoning: accuracy under attack, FedAvg and each defence",
        "",
        f"Final central test accuracy (%, {std_caption(len(SEEDS))}: "
        f"{', '.join(map(str, SEEDS))}) after {s['num_rounds']} rounds. Setting: "
        f"{s['data']['dataset']}, {s['data']['num_clients']} clients, Dirichlet alpha = "
        f"{s['data']['alpha']}, {s['data']['num_samples']} samples, {s['model']['name']} "
        f"(channels {s['model']['channels']}), {s['train']['epochs']} local epochs, lr "
        f"{s['train']['lr']}, momentum {s['train']['momentum']}, every client every round. "
        "Attackers are partition ids 0..n-1 at their default strengths (sign_flip: the update "
        "negated, x1; scale: x10; gaussian: N(0, 1) instead of the update; label_flip: y -> 9 - y; "
        "free_rider: returns the model it was sent). Small on purpose, so the whole table runs "
        "on one CPU core in minutes; absolute accuracies are those of a short run.",
        "",
        f"Machine: 2-core CPU box shared with other jobs; commit {commit}; "
        f"{len(cache)} runs, median {statistics.median(seconds):.1f} s each "
        f"({sum(seconds) / 60:.0f} min of runs in all).",
        "Reproduce: `PYTHONPATH=. python benchmarks/robustness.py --kinds none,sign_flip` (and "
        "the other kinds), then `--table`.",
        "",
        *lines,
        "",
        "## Target: with the best defence, up to 2 of 10 sign-flip or scaling attackers cost "
        "<= 5 points against clean FedAvg",
        "",
        f"Clean FedAvg: {100 * clean_mean:.1f} %.",
        "",
    ]
    for kind, n, best, cost in verdicts:
        status = "met" if cost <= 5 else "NOT met"
        out.append(
            f"- {kind}, {n} attacker(s): best defence {best} "
            f"({'costs' if cost >= 0 else 'gains'} {abs(cost):.1f} points) -> {status}"
        )
    out += [
        "",
        "Reading it: at this short budget under label skew, the coordinate-wise rules (median, "
        "trimmed mean) and MultiKrum cost 5-8 points on clean data, because they discard or "
        "down-weight honest but dissimilar clients. The relative norm bound costs nothing on "
        "clean data and neutralises boosted (scale) and noise (gaussian) attackers, but cannot "
        "see a x1 sign flip or label flip, whose updates have honest norms; against 3 sign "
        "flippers the robust rules (MultiKrum best) beat FedAvg. The target is not met for 2 "
        "sign-flip attackers: no defence here does better than FedAvg itself (22.4 % vs 29.4 % "
        "clean). A ±1-3 point difference is within the seed spread (see the ± columns).",
        "",
        "Notes:",
        '- Bulyan (`robustness.aggregation = "bulyan"`) is available but not in the table: '
        "Flower 1.42's implementation took 5-9 s per round on this model here (its per-coordinate "
        "selection is pure Python), 50x the other rules; it also needs n >= 4f + 3 replies.",
        "- Krum (one selected client's model) is available; MultiKrum is shown instead, since a "
        "single client's model under Dirichlet(0.5) label skew is a poor global model.",
        "- The relative norm bound (`robustness.relative_norm_bound`) only removes updates *longer* "
        "than 3x the round's median: it stops scaling and noise, not a x1 sign flip (same norm).",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="", help="comma-separated: none and/or attack kinds")
    parser.add_argument("--table", action="store_true", help=f"write {TABLE} from the cache")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - {"none", *KINDS})
    if unknown:
        parser.error(f"unknown kinds {unknown}; allowed: none, {', '.join(KINDS)}")
    if kinds:
        run(kinds)
    if args.table:
        TABLE.write_text(table())
        print(TABLE.read_text())


if __name__ == "__main__":
    main()
