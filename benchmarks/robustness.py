"""Robustness table: final central accuracy under poisoning, for every attack and defence.

Setting (``SETTINGS``): scikit-learn digits, an MLP, Dirichlet label skew, 20 rounds, where
clean FedAvg reaches 86-92 % at 10 clients. The full grid is
every attack kind (``clients/attacks.py``, ``server/omniscient_attack.py``) × 0-3 attackers at
10 clients (0, 2, 5, 10 = 0-20 % at 50) × every defence (``DEFENCES``) × Dirichlet 0.5 and 0.1 ×
3 seeds. Each cell is one run, appended to a JSON cache as soon as it finishes, so the grid can be
run in pieces and resumed: cells already in the cache are skipped.

    PYTHONPATH=. nice python benchmarks/robustness.py --clients 10 --attackers 2   # a subset
    PYTHONPATH=. nice python benchmarks/robustness.py                              # the full grid
    PYTHONPATH=. nice python benchmarks/robustness.py --quickstart   # fedge's defaults, quickstart
    PYTHONPATH=. nice python benchmarks/robustness.py --algorithms   # FedLD, FedLAW, clustered
    PYTHONPATH=. python benchmarks/robustness.py --table   # writes docs/results/robustness.md

``--clients``, ``--alphas``, ``--attackers``, ``--kinds``, ``--defences`` and ``--seeds`` narrow
the grid (comma-separated). Results: mean ± sample standard deviation (n − 1) over the seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import get_args

import torch

from fedge.engines import run_engine
from scenarios.config import AttackConfig, load_scenario, validate_scenario
from scenarios.stats import format_mean_std, std_caption

# every attack the schema knows, in its order
KINDS = [k for k in get_args(AttackConfig.model_fields["kind"].annotation) if k != "none"]
ATTACKERS = {10: [1, 2, 3], 50: [2, 5, 10]}
ALPHAS = [0.5, 0.1]
SEEDS = [0, 1, 2]
# Settings where some of SEEDS have no split (digits' 1,365 training examples into 50 clients of
# >= 2 at Dirichlet 0.1: flwr-datasets gives up on seeds 0 and 2): the seeds used instead.
GRID_SEEDS = {(50, 0.1): [1, 3, 4, 5]}
NO_DEFENCE = {"relative_norm_bound": 0.0, "max_weight_share": 1.0, "direction_check": False}
# fedge's defaults of issue #23 (relative norm bound 3, weight cap "auto"), without the direction
# check that #24 turned on by default: the cells were measured so
NORM_BOUND_AND_CAP = {"direction_check": False}
# the direction check as fedge runs it by default since #24's third pass: excluded when below
# -0.15 against both the round's median update and the server's previous step
DEFAULT_DIRECTION = {
    "direction_check": True,
    "direction_threshold": -0.15,
    "direction_reference": "both",
}
# name -> [robustness] settings on top of fedge's defaults; the first turns the norm bound and
# the weight cap off: the plain mean. The direction check (#24) is stated explicitly everywhere
# (its reference too), so each column keeps meaning what its cells measured.
# num_malicious (f) is filled in per federation size (F_ASSUMED).
DEFENCES: dict[str, dict] = {
    "mean (no checks)": NO_DEFENCE,
    "norm bound + cap": NORM_BOUND_AND_CAP,
    "direction check": {
        "direction_check": True,
        "direction_threshold": 0.0,
        "direction_reference": "median",
    },
    "direction check -0.1": {
        "direction_check": True,
        "direction_threshold": -0.1,
        "direction_reference": "median",
    },
    "direction check -0.2": {
        "direction_check": True,
        "direction_threshold": -0.2,
        "direction_reference": "median",
    },
    # excluded only if against both the round's median and the server's previous step
    "direction check both": {
        "direction_check": True,
        "direction_threshold": 0.0,
        "direction_reference": "both",
    },
    "direction check both -0.1": {
        "direction_check": True,
        "direction_threshold": -0.1,
        "direction_reference": "both",
    },
    "direction check both -0.15": DEFAULT_DIRECTION,
    "median": {"aggregation": "median"},
    "trimmed mean 0.2": {"aggregation": "trimmed_mean", "trim_beta": 0.2},
    "Krum": {"aggregation": "krum"},
    "MultiKrum": {"aggregation": "multikrum"},
    "geometric median": {"aggregation": "geometric_median"},
    "centered clipping": {"aggregation": "centered_clipping"},
    "bucketing + GM": {"aggregation": "geometric_median", "preaggregation": "bucketing"},
    "bucketing + CC": {"aggregation": "centered_clipping", "preaggregation": "bucketing"},
    "NNM + GM": {"aggregation": "geometric_median", "preaggregation": "nnm"},
    "FLTrust": {"trust_scoring": True},
}
for _name, _settings in DEFENCES.items():
    if not _name.startswith("direction check"):
        _settings.setdefault("direction_check", False)
# the quickstart's columns: the #23 defaults, the median direction check on top of them, and
# fedge's defaults since #24 (the direction check against both references)
QUICKSTART_DEFENCES = {
    "norm bound + cap": NORM_BOUND_AND_CAP,
    "direction check": DEFENCES["direction check"],
    "direction check both -0.15": DEFAULT_DIRECTION,
}
F_ASSUMED = {10: 3, 50: 10}
SETTINGS = {
    "num_rounds": 20,
    "data": {
        "dataset": "digits",
        "partitioner": "dirichlet",
        # the server's clean set for FLTrust; carved out in every run so all compare on the
        # same federation
        "proxy_fraction": 0.05,
    },
    "model": {"name": "mlp", "hidden": [64]},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
    "federation": {"fraction_train": 1.0, "fraction_evaluate": 0.0},
}
# 50 clients of digits hold ~27 examples each: a smaller minimum partition, more local steps
PER_SIZE = {10: {}, 50: {"data": {"min_partition_size": 2}, "train": {"epochs": 3}}}
QUICKSTART = Path("scenarios/quickstart.toml")
QUICKSTART_CASES: dict[str, list[str]] = {
    "clean": [],
    "1 sign-flipper x10 at id 0": [
        "attack.kind=sign_flip",
        "attack.strength=10",
        "attack.clients=[0]",
    ],
    "1 client claiming 1e9 examples": ["attack.kind=inflated_weight", "attack.clients=[0]"],
    "2 sign-flippers at ids 0,1": ["attack.kind=sign_flip", "attack.clients=[0, 1]"],
    "2 ALIE at ids 0,1": ["attack.kind=alie", "attack.clients=[0, 1]"],
    "2 IPM at ids 0,1": ["attack.kind=ipm", "attack.clients=[0, 1]"],
    # no attack: what any defence that excludes the attackers can reach at best. Free riders
    # send a zero update (cosine 0): a direction threshold just above 0 drops them every round
    "floor: ids 0,1 left out": [
        "attack.kind=free_rider",
        "attack.clients=[0, 1]",
        "robustness.direction_threshold=0.01",
    ],
}
ALGORITHMS = {
    "fedld": {"name": "fedld"},
    "fedlaw": {"name": "fedlaw"},
    "clustered": {"name": "clustered"},
}
# Hand-written parts of the page (what the cache holds and how to read it), kept with the script
# so that --table rewrites the whole page.
WHAT_WAS_RUN = """\
Each cell is one run; mean ± std over the seeds it has (n= when fewer than 3). What the cache
holds:

- **10 clients, Dirichlet 0.5 and 0.1, seeds 0-2**: clean rows for every defence; 1, 2 and 3
  attackers of every kind for the nine defences the grid keeps ('mean (no checks)', 'norm bound +
  cap', MultiKrum, geometric median, centered clipping, bucketing + CC, FLTrust, 'direction check'
  and 'direction check -0.1'). Krum, median, trimmed mean, bucketing + GM and NNM + GM have their
  clean rows (3 seeds) and, from the first pass, some seed-0/1 attack cells (n= shown): their
  clean cost (9-60 points at alpha 0.1) put them out of the running. The 'direction check both'
  columns (the reference chosen as fedge's default in issue #24) have clean rows at seeds 0-2 and
  sign_flip / ipm / alie at 2 attackers, seeds 0-1 (a few at seed 2).
- **50 clients, Dirichlet 0.5 and 0.1** (3 local epochs, minimum partition 2): clean rows for
  every defence and 2, 5 and 10 attackers (4-20 %) of every kind for the nine kept defences.
  Seeds 0-2 at alpha 0.5; at alpha 0.1 seeds 1, 3, 4 and 5, because seeds 0 and 2 have no
  Dirichlet(0.1) split of digits' 1,365 training examples into 50 clients of at least 2 each
  (flwr-datasets gives up after 10 draws; fedge stops with a DataError naming the fix).
- **Quickstart** (seeds 0-2) and **FedLD / FedLAW / clustered** (seeds 0-2).
- The choice of `direction_threshold = -0.15` with `direction_reference = "both"` was checked
  on held-out seeds 3-9 at digits alpha 0.1 too (clean; not in this table): +1.9 and -1.4
  points against 'norm bound + cap' on two seeds, identical on the other five.

Missing cells (the grid's remaining seeds, the dropped defences' attack rows, Bulyan) are one
command away: `PYTHONPATH=. nice python benchmarks/robustness.py --grid` runs exactly the missing
cells of the full grid, then `--table` rewrites this page."""
READING = """\
## Reading it

All figures below are means over the seeds in the tables (3 unless n= is shown there).

- **What "clean FedAvg" can be held to: the floor.** The norm bound excludes the x10 scale and
  N(0, 1) gaussian attackers in every round, so those cells are FedAvg *without the attackers'
  data*: 88.4 % at 10 clients, alpha 0.5 (2.0 points below clean 90.4) and 72.0 % at alpha 0.1
  (12.5 below clean 84.5). Under label skew the attackers' partitions hold classes the others
  barely have, so no defence that removes them can come within 3 points of clean FedAvg at alpha
  0.1: the issue's 3-point target is out of reach there by construction, and tight at alpha 0.5.
  The quickstart has the same floor: partitions 0 and 1 left out (the 'floor' row) cost 5.8 /
  3.5 / -1.4 points at seeds 0 / 1 / 2.
- **Clean cost** (points against 'mean (no checks)', 3 seeds, 10 clients, alpha 0.5 / 0.1):
  fedge's defaults since #24 ('direction check both -0.15') 0.0 / 0.3, the same as the norm bound
  and weight cap alone, and 0.0 on the quickstart; the median direction check -0.2 / 11.6 (7.1
  at threshold -0.1); bucketing + CC 0.9 / 5.0; centered clipping 1.1 / 11.8; geometric median
  1.5 / 12.3; MultiKrum 12.6 / 21.0; FLTrust 10.6 / 32.3; median, trimmed mean, Krum and NNM + GM
  10-60. Every robust rule pays for heterogeneity, more as it grows. At 50 clients (alpha 0.5)
  the norm bound and weight cap cost 0.8, the median check 0.3, the robust rules 2.3-55; at 50
  clients, alpha 0.1, the norm bound and cap cost 1.7 (4 seeds: it excludes honest clients with
  long updates), fedge's defaults 1.9 (3 seeds), the median check 3.0: above the 1-point bar.
- **Sign flip (x1)** keeps honest norms, so the norm bound misses it. At 10 clients, alpha 0.5,
  two flippers take FedAvg from 90.4 to 64.2 % with the norm bound and cap; the median direction
  check (80.4; 80.6 at -0.1) and FLTrust (80.3) recover most of it, the default 'both' check
  less (71.3: an attacker that gets into one aggregate agrees with the next step). At
  50 clients (alpha 0.5) ten flippers (20 %) cost the defaults-before-#24 16 points (69.7 %),
  the median check 3.4 (82.4 %). At alpha 0.1 nothing reaches the floor (best ~63 % against a
  floor of 72).
- **IPM** (epsilon 0.1) points exactly against the consensus: the direction checks drop it (10
  clients alpha 0.5: 88.5 % at -0.1, 1.9 points below clean; 50 clients, 10 attackers: 83.2 vs
  79.9 with the norm bound alone); the geometric median falls onto the attackers' tight pair
  (39.1 / 14.3 %), MultiKrum and centered clipping lose 10-29 points at alpha 0.5.
- **ALIE** (z = 0.25 for 2 of 10) sits on the consensus (cosine 0.9-1.0 with the median): no
  direction check sees it, and it moves the mean little (88.1 vs 90.4 at alpha 0.5); bucketing +
  CC is best there (89.5), the distance-based rules do worse than the mean.
- **label_flip and free riders** look like honest skewed clients: the best defence still loses
  9 (label flip: centered clipping 81.5) and 4 points (free riders: bucketing + CC 86.4) at alpha
  0.5; the geometric median collapses onto free riders' zero updates (43.1 %).
- **inflated_weight** (10^9 examples claimed) costs 22 / 41 points without checks; the default
  weight cap brings it to within 1 point of clean.

- **Issue #23's checks (quickstart, fedge's defaults).** One x10 sign-flipper at id 0 costs 0.0 /
  2.6 / -2.1 points at seeds 0-2 (excluded every round; what remains is partition 0's missing
  data); a client claiming 10^9 examples 0.7 / 0.0 / 1.7 (<= 2: met).
- **Issue #24's targets.** (1) Defaults on the quickstart, 2 attackers at ids 0 and 1: IPM 5.8 /
  3.5 / -1.5 points (the floor), ALIE 6.3 / 3.1 / -0.1 (about the floor), sign flip 7.2 / 10.3 /
  19.1: not met, and at seeds 0 and 1 not meetable by an excluding defence (floor 5.8 / 3.5).
  (2) The defaults (direction check 'both', -0.15) cost <= 1 point on clean data: met at 10
  clients (0.0 / 0.3) and on the quickstart (0.0); not at 50 clients, alpha 0.1 (1.9, of which
  the norm bound and cap alone, the defaults before #24, cost 1.7). (3) FedLD, FedLAW, clustered >= clean - 5 under 2 sign-flippers: with the median check
  FedLAW is met (89.3 of 93.2), FedLD just missed (62.1 of 67.7), clustered missed (42.5 of
  60.0); with the defaults none is met (FedLD 45.0, FedLAW 75.3, clustered 37.4 — worse than
  the norm bound alone's 43.3: the clustered strategy offers late-assigned clients every cluster
  model, and those replies belong to no group the check compares). (4) With the best defence
  per row, 2 of 10 attackers cost <= 3 points at alpha 0.5 for scale, gaussian, ALIE, IPM and
  inflated weight; not for sign flip (9.8), label flip (8.9) and free riders (4.0); at alpha
  0.1 for inflated weight only (the floor is 12.5).

**Recommended: fedge's defaults** (relative norm bound 3, weight cap "auto", direction check
against both the median and the server's last step at -0.15): no clean cost at 10 clients and on
the quickstart (1.9 points at 50 clients, alpha 0.1, 1.7 of them the norm bound's), and they
stop boosted, noisy, weight-inflating and IPM clients. **Switch to the median check
(`direction_reference = "median"`, `direction_threshold = 0`) when the label skew is moderate
(Dirichlet 0.5 or closer to IID) and sign-flipping clients are the worry**: there it is within a
point of the best against sign flip at 10 and 50 clients and the best against IPM at 50 (at 10
clients threshold -0.1 does better against IPM: 88.5 vs 84.9 %), for FedAvg, FedLD and FedLAW,
at -0.2 to 0.3 points of clean cost; under strong skew (alpha 0.1) it costs
7-12. FLTrust (`trust_scoring`) holds FedLAW as well but costs 10-32 points on clean skewed data.
For the clustered strategy no defence tried holds against sign flips."""
CACHE = Path("docs/results/robustness.json")
TABLE = Path("docs/results/robustness.md")


def cell_key(*parts: object) -> str:
    return "|".join(str(p) for p in parts)


def defence_settings(defence: str, clients: int) -> dict:
    settings = dict(DEFENCES[defence])
    if defence != "mean (no checks)":
        settings.setdefault("num_malicious", F_ASSUMED[clients])
    return settings


def grid_scenario(
    clients: int, alpha: float, kind: str, attackers: int, defence: str, seed: int, out: Path
):
    raw = json.loads(json.dumps(SETTINGS))
    for table, values in PER_SIZE[clients].items():
        raw[table] = {**raw.get(table, {}), **values}
    raw["data"].update(num_clients=clients, alpha=alpha)
    raw.update(name="robustness", seed=seed, output_dir=str(out))
    raw["robustness"] = {
        "checkpoint": False,
        "max_skipped_share": 1.0,
        **defence_settings(defence, clients),
    }
    if attackers:
        raw["attack"] = {"kind": kind, "clients": list(range(attackers))}
    return validate_scenario(raw)


ENGINE = "packed"  # --engine; both give the same accuracies (tests/test_packed.py)


def run_one(scenario, out: Path) -> dict:
    scenario = scenario.model_copy(
        update={"engine": scenario.engine.model_copy(update={"name": ENGINE})}
    )
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_engine(scenario, Path(tempfile.mkdtemp(dir=out)), show_progress=False)
    return {
        "commit": _commit(),
        "engine": ENGINE,
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


def save(cache: dict) -> None:
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")


def grid_cells(args: argparse.Namespace) -> list[tuple]:
    """Cells in the order they are run: per federation size and alpha, seed by seed, the clean
    row first, so a partial run already gives whole rows for the first seeds."""
    cells = []
    for clients in args.clients:
        for alpha in args.alphas:
            seeds = args.seeds
            if seeds == SEEDS:  # the default: where some have no split, the ones used instead
                seeds = GRID_SEEDS.get((clients, alpha), SEEDS)
            for seed in seeds:
                for defence in args.defences:
                    cells.append((clients, alpha, "none", 0, defence, seed))
                for n in [
                    a for a in ATTACKERS[clients] if not args.attackers or a in args.attackers
                ]:
                    for kind in args.kinds:
                        for defence in args.defences:
                            cells.append((clients, alpha, kind, n, defence, seed))
    return cells


def run_grid(args: argparse.Namespace) -> None:
    cache = load_cache()
    with tempfile.TemporaryDirectory() as tmp:
        for cell in grid_cells(args):
            key = cell_key("grid", *cell)
            if key in cache:
                continue
            cache[key] = run_one(grid_scenario(*cell, Path(tmp)), Path(tmp))
            print(f"{key}: {100 * cache[key]['final_accuracy']:.1f}%", flush=True)
            save(cache)


def run_quickstart(seeds: list[int]) -> None:
    """The quickstart as shipped, fedge's defaults, attackers at partition ids 0 (and 1)."""
    cache = load_cache()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for case, overrides in QUICKSTART_CASES.items():
                # the attacked runs without checks are in issue #23 / #24; clean measures the cost
                # the floor needs the direction check (it drops the free riders)
                labels = ["direction check"] if case.startswith("floor") else [*QUICKSTART_DEFENCES]
                labels += ["no checks"] if case == "clean" else []
                for defaults in labels:
                    key = cell_key("quickstart", case, defaults, seed)
                    if key in cache:
                        continue
                    extra = [f"seed={seed}", "robustness.checkpoint=false", f"output_dir={tmp}"]
                    settings = QUICKSTART_DEFENCES.get(defaults, NO_DEFENCE)
                    extra += [f"robustness.{k}={str(v).lower()}" for k, v in settings.items()]
                    # the case last: its own robustness settings (the floor's threshold) win
                    scenario = load_scenario(QUICKSTART, extra + overrides)
                    cache[key] = run_one(scenario, Path(tmp))
                    print(f"{key}: {100 * cache[key]['final_accuracy']:.1f}%", flush=True)
                    save(cache)


def run_algorithms(seeds: list[int], defence: str, alpha: float = 0.5) -> None:
    """FedLD, FedLAW and clustered on the grid's 10-client setting: clean and 2 of 10
    sign-flippers, with ``defence`` (every one that works with any algorithm) and without."""
    cache = load_cache()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for algo, table in ALGORITHMS.items():
                for kind, attackers in (("none", 0), ("sign_flip", 2)):
                    for name in ("mean (no checks)", "norm bound + cap", defence):
                        key = cell_key("algorithm", algo, alpha, kind, attackers, name, seed)
                        if key in cache:
                            continue
                        base = grid_scenario(10, alpha, kind, attackers, name, seed, Path(tmp))
                        raw = json.loads(base.model_dump_json())
                        raw["algorithm"] = table
                        cache[key] = run_one(validate_scenario(raw), Path(tmp))
                        print(f"{key}: {100 * cache[key]['final_accuracy']:.1f}%", flush=True)
                        save(cache)


# -------------------------------------------------------------------------------- the table
def mean_std(values: list[float]) -> str:
    """A table cell in percent (scenarios/stats.py's sample std); n stated when a seed is missing."""
    cell = format_mean_std(values, scale=100, digits=1)
    return cell + ("" if len(values) in (0, len(SEEDS)) else f" (n={len(values)})")


def _seeds(prefix: tuple) -> list[int]:
    return GRID_SEEDS.get(tuple(prefix[1:3]), SEEDS) if prefix[0] == "grid" else SEEDS


def _accs(cache: dict, prefix: tuple) -> list[float]:
    return [
        cache[cell_key(*prefix, s)]["final_accuracy"]
        for s in _seeds(prefix)
        if cell_key(*prefix, s) in cache
    ]


def _by_seed(cache: dict, prefix: tuple) -> dict[int, float]:
    return {
        s: 100 * cache[cell_key(*prefix, s)]["final_accuracy"]
        for s in _seeds(prefix)
        if cell_key(*prefix, s) in cache
    }


def _paired_cost(clean: dict[int, float], attacked: dict[int, float]) -> tuple[float, float, int]:
    """(clean mean, attacked mean, n) over the seeds both have: costs compare like with like."""
    seeds = sorted(set(clean) & set(attacked))
    if not seeds:
        return float("nan"), float("nan"), 0
    return (
        statistics.mean(clean[s] for s in seeds),
        statistics.mean(attacked[s] for s in seeds),
        len(seeds),
    )


def _mean(values: list[float]) -> float:
    return 100 * statistics.mean(values) if values else float("nan")


def grid_tables(cache: dict) -> tuple[list[str], dict]:
    """One table per (clients, alpha) with cells; and per setting the numbers the targets use."""
    out: list[str] = []
    summary: dict = {}
    for clients in ATTACKERS:
        for alpha in ALPHAS:
            rows = [("none", 0)] + [(k, n) for n in ATTACKERS[clients] for k in KINDS]
            present = [
                (k, n)
                for k, n in rows
                if any(_accs(cache, ("grid", clients, alpha, k, n, d)) for d in DEFENCES)
            ]
            if not present:
                continue
            out += [
                f"### {clients} clients, Dirichlet alpha = {alpha}",
                "",
                "| attack | attackers | " + " | ".join(DEFENCES) + " |",
                "|---|---|" + "---|" * len(DEFENCES),
            ]
            for kind, n in present:
                cells = [_accs(cache, ("grid", clients, alpha, kind, n, d)) for d in DEFENCES]
                out.append(f"| {kind} | {n} | " + " | ".join(mean_std(c) for c in cells) + " |")
                summary[(clients, alpha, kind, n)] = {
                    d: _by_seed(cache, ("grid", clients, alpha, kind, n, d))
                    for d, c in zip(DEFENCES, cells, strict=True)
                    if c
                }
            out.append("")
    return out, summary


def target_lines(summary: dict) -> list[str]:
    """Best defence per attack row; its cost against clean FedAvg (mean, no checks) on the same
    seeds."""
    lines = []
    for (clients, alpha, kind, n), by_defence in sorted(summary.items(), key=str):
        clean = summary.get((clients, alpha, "none", 0), {}).get("mean (no checks)")
        if kind == "none" or clean is None or n != 2 or clients != 10:
            continue
        paired = {d: _paired_cost(clean, accs) for d, accs in by_defence.items()}
        best, (clean_mean, acc, seeds) = max(paired.items(), key=lambda kv: kv[1][1])
        cost = clean_mean - acc
        verdict = "met" if cost <= 3 else "NOT met"
        lines.append(
            f"- alpha {alpha}, {kind}: best {best} {acc:.1f} % vs clean FedAvg {clean_mean:.1f} % "
            f"on the same {seeds} seed(s): {'costs' if cost >= 0 else 'gains'} {abs(cost):.1f} "
            f"points -> {verdict}"
        )
    return lines


def clean_cost_lines(summary: dict) -> list[str]:
    lines = []
    for (clients, alpha, kind, _), by_defence in sorted(summary.items(), key=str):
        if kind != "none" or "mean (no checks)" not in by_defence:
            continue
        clean = by_defence["mean (no checks)"]
        costs = []
        for d, accs in by_defence.items():
            clean_mean, acc, seeds = _paired_cost(clean, accs)
            costs.append(f"{d} {clean_mean - acc:+.1f} (n={seeds})")
        lines.append(f"- {clients} clients, alpha {alpha}: " + ", ".join(costs))
    return lines


def quickstart_table(cache: dict) -> list[str]:
    """Per case and column (QUICKSTART_DEFENCES): accuracy per seed, and its cost against the
    clean run without checks of the same seed."""
    clean = _by_seed(cache, ("quickstart", "clean", "no checks"))
    lines = [
        "| case | defence | " + " | ".join(f"seed {s}: acc (cost)" for s in SEEDS) + " |",
        "|---|---|" + "---|" * len(SEEDS),
    ]
    have = False
    for case in QUICKSTART_CASES:
        for label in QUICKSTART_DEFENCES:
            accs = _by_seed(cache, ("quickstart", case, label))
            if not accs:
                continue
            have = True
            cells = [
                f"{accs[s]:.1f} ({clean[s] - accs[s]:+.1f})" if s in accs and s in clean else "–"
                for s in SEEDS
            ]
            lines.append(f"| {case} | {label} | " + " | ".join(cells) + " |")
    return lines if have else []


def algorithm_table(cache: dict, defence: str, alpha: float = 0.5) -> list[str]:
    names = tuple(
        dict.fromkeys(
            ("mean (no checks)", "norm bound + cap", "FLTrust", "direction check", defence)
        )
    )
    lines = [
        "| algorithm | attack | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    have = False
    for algo in ALGORITHMS:
        for kind, n in (("none", 0), ("sign_flip", 2)):
            cells = [_accs(cache, ("algorithm", algo, alpha, kind, n, d)) for d in names]
            have = have or any(cells)
            label = "clean" if n == 0 else f"{n} sign-flippers"
            lines.append(f"| {algo} | {label} | " + " | ".join(mean_std(c) for c in cells) + " |")
    return lines if have else []


def table(recommended: str) -> str:
    cache = load_cache()
    grid, summary = grid_tables(cache)
    measured = sorted({c.get("commit", "?") for c in cache.values()})
    seconds = [c["seconds"] for c in cache.values()]
    engines = sorted({c.get("engine", "inprocess") for c in cache.values()})
    s = SETTINGS
    return "\n".join(
        [
            "# Robustness to poisoning: accuracy under attack, for every defence",
            "",
            f"Final central test accuracy (%, {std_caption(len(SEEDS))}: "
            f"{', '.join(map(str, SEEDS))}; a cell with fewer seeds says n=) after "
            f"{s['num_rounds']} rounds. Setting: {s['data']['dataset']} (scikit-learn 8x8 "
            f"digits), MLP {s['model']['hidden']}, Dirichlet label skew, "
            f"{s['train']['epochs']} local epoch(s) (3 at 50 clients), batch "
            f"{s['train']['batch_size']}, lr {s['train']['lr']}, momentum "
            f"{s['train']['momentum']}, every client every round, 5 % of train carved out as "
            "the server's proxy set in every run (only FLTrust uses it). Attackers are "
            "partition ids 0..n-1 at their default strengths: sign_flip the update negated "
            "(x1); scale x10; gaussian N(0, 1) instead of the update; label_flip y -> 9 - y; "
            "free_rider returns the model it was sent; inflated_weight trains honestly and "
            "claims 1e9 examples; alie mu - z sigma of the honest updates (Baruch et al.'s z: "
            "0.25 for 2 of 10); ipm -0.1 x the honest mean (alie and ipm are simulated on the "
            "server, which shows them the round's honest updates).",
            "",
            "Defences are `[robustness]` settings on top of the relative norm bound (3 x the "
            "round's median) and the weight cap ('auto' = 1.5 / replies), the defaults before "
            "issue #24 ('norm bound + cap'), except 'mean (no checks)', which turns both off "
            "(the defaults before issue #23). Every column states direction_check explicitly: "
            "off, except the 'direction check' columns, which exclude an update whose cosine "
            "over the model body is below the threshold (0 unless the name says) against the "
            "round's coordinate-wise median update, or, for 'both', against that median and "
            "the server's previous step alike; 'direction check both -0.15' is fedge's default "
            "since issue #24. Robust rules assume "
            "f = 3 attackers at 10 clients (num_malicious; NNM mixes n - f). Bulyan is not in "
            "the grid: Flower 1.42's implementation took 5-9 s per round on a small model here "
            "(its per-coordinate selection is pure Python, 50x the other rules), and it needs "
            "n >= 4f + 3 = 15 replies for f = 3.",
            "",
            f"Machine: 2-core x86_64 CPU ({platform.processor() or platform.machine()}), shared "
            f"with five other engineers' jobs (timings are not comparable); torch "
            f"{torch.__version__}; {' and '.join(engines)} engine (the same accuracies: the packed "
            f"engine trains exactly what the in-process one does, tests/test_packed.py); table "
            f"written at commit {_commit()}, "
            f"cells measured at {', '.join(measured)}; {len(cache)} runs, median "
            f"{statistics.median(seconds) if seconds else 0:.1f} s each "
            f"({sum(seconds) / 60:.0f} min of runs in all).",
            "",
            "## What was run, and what remains",
            "",
            WHAT_WAS_RUN,
            "",
            "## The grid",
            "",
            *grid,
            "## Clean-data cost of each defence (points against 'mean (no checks)')",
            "",
            *clean_cost_lines(summary),
            "",
            "## Target: with the best defence, 2 of 10 attackers cost <= 3 points against "
            "clean FedAvg, every attack kind",
            "",
            *target_lines(summary),
            "",
            "## The quickstart (attackers at partition ids 0 and 1)",
            "",
            "`scenarios/quickstart.toml` as shipped (mnist1d, 10 clients, Dirichlet 0.5, 10 "
            "rounds), seeds 0-2, with the defaults before issue #24 ('norm bound + cap'), the "
            "median direction check on top of them ('direction check'), and fedge's defaults "
            "since #24 ('direction check both -0.15'); cost against the clean run without "
            "checks of the same seed.",
            "",
            *quickstart_table(cache),
            "",
            "## FedLD, FedLAW and clustered with 2 of 10 sign-flippers",
            "",
            "The grid's 10-client setting, Dirichlet 0.5; the defaults before issue #24 "
            "('norm bound + cap'), FLTrust, the median direction check and "
            f"'{recommended}' (fedge's defaults since #24), all of which work with every "
            "algorithm (3 seeds). Target: each keeps >= its clean accuracy - 5 points with the "
            "recommended defence.",
            "",
            *algorithm_table(cache, recommended),
            "",
            READING,
            "",
        ]
    )


def main() -> None:
    global CACHE, ENGINE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,50")
    parser.add_argument("--alphas", default=",".join(map(str, ALPHAS)))
    parser.add_argument("--attackers", default="", help="attacker counts (default: all)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--defences", default=",".join(DEFENCES))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--grid", action="store_true", help="run the (narrowed) grid")
    parser.add_argument("--quickstart", action="store_true", help="fedge's defaults, quickstart")
    parser.add_argument("--algorithms", action="store_true", help="FedLD, FedLAW, clustered")
    parser.add_argument(
        "--recommended",
        default="direction check both -0.15",
        help="the defence --algorithms runs besides the defaults before #24 and FLTrust",
    )
    parser.add_argument("--table", action="store_true", help=f"write {TABLE} from the cache")
    parser.add_argument(
        "--cache",
        default=str(CACHE),
        help="JSON file of measured cells (runs in parallel: one each, then --merge them)",
    )
    parser.add_argument("--merge", default="", help="comma-separated caches to merge into --cache")
    parser.add_argument("--engine", default=ENGINE, choices=["packed", "inprocess"])
    args = parser.parse_args()
    CACHE = Path(args.cache)
    ENGINE = args.engine
    if args.merge:
        cache = load_cache()
        for other in args.merge.split(","):
            cache.update(json.loads(Path(other).read_text()))
        save(cache)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    args.clients = [int(c) for c in args.clients.split(",") if c]
    args.alphas = [float(a) for a in args.alphas.split(",") if a]
    args.attackers = [int(a) for a in args.attackers.split(",") if a]
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.defences = [d for d in args.defences.split(",") if d]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    unknown = sorted(set(args.kinds) - set(KINDS)) + sorted(set(args.defences) - set(DEFENCES))
    if unknown:
        parser.error(
            f"unknown kinds/defences {unknown}; kinds: {KINDS}; defences: {list(DEFENCES)}"
        )
    if args.grid:
        run_grid(args)
    if args.quickstart:
        run_quickstart(args.seeds)
    if args.algorithms:
        run_algorithms(args.seeds, args.recommended)
    if args.table:
        TABLE.write_text(table(args.recommended))
        print(TABLE.read_text())


if __name__ == "__main__":
    main()
