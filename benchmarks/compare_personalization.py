"""Personalized accuracy of FedAvg, FedAvg + fine-tune, Per-FedAvg, CFL, IFCA and clustered + meta.

    python benchmarks/compare_personalization.py [--scenario scenarios/clustered_pathological.toml]
        [--seeds 0,1,2] [--set key=value ...] [--out results/personalization-<time>]

Runs the scenario once per (algorithm, seed) on the in-process engine; every run evaluates every
client at the last round before and after fine-tuning (the scenario's ``[personalization]``).
"FedAvg" is the FedAvg run's accuracy of the received global model on each client's local test
split; "FedAvg + fine-tune" is the same run after fine-tuning. Every other method is reported
after the same fine-tuning. Per run, the numbers are unweighted means over clients (and the mean
of the worst 10% of clients); the table gives mean ± sample std (n − 1) over seeds.

Writes ``personalization.md`` (the table) and, via ``scenarios/report.py``, ``comparison.md/png``
for the sample-weighted ``personalized_accuracy`` column of every run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from fedge.engines import run_engine
from fedge.report import compare_runs
from scenarios.config import load_scenario
from scenarios.stats import format_mean_std, std_caption

DEFAULT_SETS = ["data.num_clients=12", "num_rounds=20", "personalization.evaluate_every=10"]
ALGORITHMS = {
    "fedavg": [],
    # β = 0.05 (= train.lr): with the spec default β = 0.001 the global model barely moves in 20 rounds.
    "perfedavg": ["algorithm.perfedavg_beta=0.05"],
    "cfl": [],
    "ifca": [],
    "clustered": [],  # meta = reptile (the default): ε-step on the server, per cluster
    "clustered meta=none": ["algorithm.meta=none"],  # FedAvg inside clusters (the ε-step's control)
}


def fmt(values: list[float]) -> str:
    return format_mean_std(values, scale=100, digits=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="scenarios/clustered_pathological.toml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument(
        "--set", dest="sets", action="append", default=None, help="override (key=value)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    sets = DEFAULT_SETS + (args.sets or [])
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    algorithms = [a for a in args.algorithms.split(",") if a]
    base = load_scenario(args.scenario, sets)
    out = (
        args.out
        or base.resolved_output_dir()
        / f"personalization-{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    print(
        f"{base.name}: {base.data.num_clients} clients ({base.data.partitioner}), "
        f"{base.num_rounds} rounds, seeds {seeds}, fine-tune {base.personalization.finetune_epochs} "
        f"epoch(s) / {base.personalization.finetune_steps} steps -> {out}",
        flush=True,
    )
    rows: dict[str, dict[str, list[float]]] = {}
    run_dirs = []
    start = time.perf_counter()
    total = len(algorithms) * len(seeds)
    for i, (algo, seed) in enumerate(((a, s) for a in algorithms for s in seeds), 1):
        scenario = load_scenario(
            args.scenario,
            [
                *sets,
                f"algorithm.name={algo.split()[0]}",
                *ALGORITHMS.get(algo, []),
                f"seed={seed}",
                f"name={algo.replace(' ', '_').replace('=', '-')}",
            ],
        )
        run_dir = out / f"{algo.replace(' ', '_').replace('=', '-')}-s{seed}"
        t0 = time.perf_counter()
        summary = run_engine(scenario, run_dir, show_progress=False)
        run_dirs.append(run_dir)
        labels = (
            {"FedAvg": "local", "FedAvg + fine-tune": "personalized"}
            if algo == "fedavg"
            else {f"{algo} + fine-tune": "personalized"}
        )
        for label, which in labels.items():
            row = rows.setdefault(label, {"mean": [], "worst10": [], "before": [], "wall": []})
            row["mean"].append(summary[f"{which}_accuracy_mean"])
            row["worst10"].append(summary[f"{which}_accuracy_worst10"])
            row["before"].append(summary["local_accuracy_mean"])
            row["wall"].append(summary["total_wall_time_s"])
        print(
            f"[{i}/{total}] {algo} seed={seed}: personalized "
            f"{100 * summary.get('personalized_accuracy_mean', float('nan')):.2f}% "
            f"(before fine-tune {100 * summary['local_accuracy_mean']:.2f}%), "
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )
    pers = base.personalization
    finetune = (
        f"{pers.finetune_steps} SGD step(s)"
        if pers.finetune_steps > 0
        else f"{pers.finetune_epochs} epoch(s)"
    )
    lines = [
        f"# Personalized accuracy: {base.name}",
        "",
        f"{base.data.num_clients} clients, {base.data.dataset} {base.data.partitioner}, "
        f"{base.num_rounds} rounds, model {base.model.name} {base.model.hidden}, seeds {seeds}; "
        f"fine-tune: {finetune} at lr {base.train.lr}. "
        "Accuracy (%) on each client's local test split at the last round, unweighted mean over "
        f"clients; {std_caption(len(seeds))}.",
        "",
        "| method | accuracy (%) | worst-10% clients (%) | before fine-tune (%) | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        lines.append(
            f"| {label} | {fmt(row['mean'])} | {fmt(row['worst10'])} | {fmt(row['before'])} "
            f"| {statistics.fmean(row['wall']):.0f} |"
        )
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "personalization.md").write_text(table)
    compare_runs(run_dirs, out, metric="personalized_accuracy")
    print()
    print(table)
    print(f"total {time.perf_counter() - start:.0f}s; wrote {out / 'personalization.md'}")


if __name__ == "__main__":
    main()
