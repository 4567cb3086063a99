"""Accuracy at equal virtual time: wait-for-all vs a deadline vs over-selection (first K of N).

    python benchmarks/deadline_policies.py [--scenario scenarios/hetero_gpus.toml] [--seeds 0,1]
        [--rounds 20] [--deadline-s 0.25] [--first-k 6] [--budget-s SECONDS] [--with-partial]
        [--set key=value ...]

Runs the same scenario and seeds once per policy on the in-process engine (same fleet, same
availability and dropout draws: only the policy differs), then reads each run's
``cumulative_virtual_time_s`` and reports the central accuracy of the last round finished within
the virtual-time budget T (default: the shortest total virtual time of all runs, so every policy is
measured over the same span). Also prints rounds done by T, mean updates aggregated per round,
energy spent by T and the accuracy after all rounds, with mean ± sample std (n − 1) over seeds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from fedge.engines import run_engine
from scenarios.config import load_scenario
from scenarios.results import load_run, plot_metric
from scenarios.stats import format_mean_std, std_caption

HERE = Path(__file__).resolve().parents[1]


def policies(deadline_s: float, first_k: int, with_partial: bool) -> dict[str, list[str]]:
    table = {
        "wait_for_all": ["devices.policy=wait_for_all", "devices.partial_work=false"],
        f"deadline {deadline_s:g}s": [
            "devices.policy=deadline",
            f"devices.deadline_s={deadline_s}",
            "devices.partial_work=false",
        ],
        f"first {first_k} of N": [
            "devices.policy=first_k",
            f"devices.first_k={first_k}",
            "devices.partial_work=false",
        ],
    }
    if with_partial:
        table["deadline+partial"] = [
            "devices.policy=deadline",
            f"devices.deadline_s={deadline_s}",
            "devices.partial_work=true",
        ]
    return table


def at_budget(rounds: list[dict], budget_s: float) -> dict[str, float]:
    """Metrics of the last round finished by virtual time ``budget_s`` (round 0 = time 0)."""
    done = [
        r for r in rounds if r["round"] == 0 or r["cumulative_virtual_time_s"] <= budget_s + 1e-12
    ]
    trained = [r for r in done if r["round"] > 0]
    return {
        "accuracy": done[-1]["central_accuracy"],
        "rounds": len(trained),
        "kept": statistics.fmean(r["num_kept"] for r in trained) if trained else 0.0,
        "energy_j": sum(r["round_energy_j"] for r in trained),
    }


def fmt(values: list[float], spec: str) -> str:
    return format_mean_std(values, spec=spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenario", default=str(HERE / "scenarios" / "hetero_gpus.toml"))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--deadline-s", type=float, default=0.25)
    ap.add_argument("--first-k", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=None, help="virtual-time budget T")
    ap.add_argument(
        "--with-partial",
        action="store_true",
        help="add deadline + partial work (FedNova-style steps)",
    )
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # per-round chatter would bury the table
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(tempfile.mkdtemp(prefix="fedge-deadline-bench-"))

    runs: dict[str, list[list[dict]]] = {}
    plotted = []
    for name, policy_overrides in policies(
        args.deadline_s, args.first_k, args.with_partial
    ).items():
        for seed in seeds:
            overrides = [
                *args.overrides,
                *policy_overrides,
                f"seed={seed}",
                f"num_rounds={args.rounds}",
                "engine.name=inprocess",
                f"output_dir={out}",
            ]
            scenario = load_scenario(args.scenario, overrides)
            t0 = time.perf_counter()
            run_dir = out / f"{name.split()[0]}-s{seed}"
            run_engine(scenario, run_dir, show_progress=False)
            run = load_run(run_dir)
            run.rounds[0]["cumulative_virtual_time_s"] = 0.0  # round 0 = the initial model
            runs.setdefault(name, []).append(run.rounds)
            plotted.append(run)
            print(
                f"  {name:>16} seed {seed}: {args.rounds} rounds, "
                f"{run.rounds[-1]['cumulative_virtual_time_s']:.2f} virtual s, "
                f"{time.perf_counter() - t0:.0f} s wall",
                flush=True,
            )

    budget = args.budget_s or min(
        r[-1]["cumulative_virtual_time_s"] for rs in runs.values() for r in rs
    )
    print(
        f"\n{Path(args.scenario).name}, seeds {seeds}, {args.rounds} rounds per run; "
        f"accuracy at equal virtual time T = {budget:.2f} s; {std_caption(len(seeds))}"
    )
    header = (
        f"{'policy':>16} | {'acc @ T':>13} | {'rounds by T':>11} | {'updates/round':>13} | "
        f"{'energy by T (J)':>15} | {'acc after all':>13} | {'virtual s, all':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, per_seed in runs.items():
        stats = [at_budget(r, budget) for r in per_seed]
        print(
            f"{name:>16} | {fmt([s['accuracy'] for s in stats], '.3f'):>13} | "
            f"{fmt([s['rounds'] for s in stats], '.1f'):>11} | "
            f"{fmt([s['kept'] for s in stats], '.1f'):>13} | "
            f"{fmt([s['energy_j'] for s in stats], '.2f'):>15} | "
            f"{fmt([r[-1]['central_accuracy'] for r in per_seed], '.3f'):>13} | "
            f"{fmt([r[-1]['cumulative_virtual_time_s'] for r in per_seed], '.2f'):>14}"
        )
    plot = plot_metric(
        [r for r in plotted if r.name.endswith(f"-s{seeds[0]}")],
        "central_accuracy",
        out / "time_to_accuracy.png",
        x_key="cumulative_virtual_time_s",
        title=f"time to accuracy, seed {seeds[0]}",
    )
    print(f"\nruns kept in {out}; time-to-accuracy plot: {plot}")


if __name__ == "__main__":
    main()
