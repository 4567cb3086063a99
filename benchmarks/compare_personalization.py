"""Personalized accuracy of FedAvg, FedAvg + fine-tune, Per-FedAvg, CFL, IFCA, clustered + meta
and local-only training, on label skew or on a concept-shift federation.

    python benchmarks/compare_personalization.py [--scenario scenarios/clustered_pathological.toml]
        [--seeds 0,1,2] [--shift none|label_permutation|rotation|feature_shift] [--groups 4]
        [--methods fedavg,cfl,...] [--sweep] [--set key=value ...] [--out DIR]

Runs the scenario once per (method, seed) on the in-process engine; every run evaluates every
client at the last round before and after fine-tuning (the scenario's ``[personalization]``).
"FedAvg" is the FedAvg run's accuracy of the received global model on each client's local test
split; "FedAvg + fine-tune" is the same run after fine-tuning. Every other method is reported
after the same fine-tuning. "local-only" trains each client alone from the same initial model for
``num_rounds x train.epochs`` epochs (plain PyTorch, no federation). Per run, the numbers are
unweighted means over clients (and the mean of the worst 10% of clients); the table gives mean ±
sample std (n − 1) over seeds.

``--shift`` builds a concept-shift federation (``data.partitioner = iid``, ``data.concept_shift``,
``data.num_groups = --groups``, 16 clients; IFCA gets ``num_clusters = --groups``) and adds the
ARI of clustered methods' clusters against the planted groups. ``--sweep`` adds clustered runs
over the Reptile ε-step and inner steps (:data:`SWEEP`).

Writes ``personalization.md`` (the table) and, via ``fedge/report.py``, ``comparison.md/png``
for the sample-weighted ``personalized_accuracy`` column of every run.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from benchmarks.engine_overhead import bare_local_training
from clients.data import dataset_info, load_client_data
from clients.models import build_model
from clients.seeding import derive_seed, seed_everything
from clients.training import evaluate
from fedge.engines import run_engine
from fedge.report import compare_runs
from scenarios.config import Scenario, load_scenario
from scenarios.stats import format_mean_std, std_caption
from server.personalization import worst_fraction_mean

DEFAULT_SETS = ["data.num_clients=12", "num_rounds=20", "personalization.evaluate_every=10"]
# Concept shift: digits (mnist1d's own generation translates its signals, so its circular shifts
# are barely a new task, and 4000 samples leave every method near chance in 20 rounds); batch 16
# at lr 0.1 gives each client ~5 SGD steps per round, as Reptile's default 5 inner steps.
SHIFT_SETS = [
    "data.dataset=digits",
    "data.num_clients=16",
    "num_rounds=20",
    "personalization.evaluate_every=10",
    "train.batch_size=16",
    "train.lr=0.1",
]
LOCAL_ONLY = "local-only"
METHODS = {
    "fedavg": [],
    # β = 0.05 (= train.lr): with the spec default β = 0.001 the global model barely moves in 20 rounds.
    "perfedavg": ["algorithm.perfedavg_beta=0.05"],
    "cfl": [],
    # ε1 = 0.1, ε2 = 0.2: on digits with 4 label-permuted groups the mean / largest client update
    # norms settle at ~0.08 / ~0.29 (clusters.jsonl, seed 0): under the default ε2 = 0.6 CFL
    # never splits.
    "cfl eps1=0.1 eps2=0.2": ["algorithm.eps1=0.1", "algorithm.eps2=0.2"],
    "ifca": [],  # num_clusters = --groups on a concept-shift federation
    "clustered": [],  # meta = reptile (the default): ε-step on the server, per cluster
    "clustered meta=none": ["algorithm.meta=none"],  # FedAvg inside clusters (the ε-step's control)
    LOCAL_ONLY: [],
    # global-model methods for feature shift (FedLAW needs data.proxy_fraction > 0: set it for all)
    "fedld": [],
    "fedlaw": [],
}
DEFAULT_METHODS = [m for m in METHODS if m not in ("fedld", "fedlaw")]
# The Reptile ε-step's sweep (clustered's defaults: ε = 0.5, k = 5 inner steps).
SWEEP = {
    f"clustered eps={eps} k={k}": [
        f"algorithm.reptile_epsilon={eps}",
        f"algorithm.reptile_inner_steps={k}",
    ]
    for eps, k in ((0.25, 5), (1.0, 5), (0.5, 10), (1.0, 10))
}


def fmt(values: list[float]) -> str:
    return format_mean_std(values, scale=100, digits=2)


def paired_difference(values: list[float], baseline: list[float]) -> str:
    """``mean [low, high]`` (points) of the per-seed differences, with a 95 % Student-t interval
    over the n seeds (n - 1 degrees of freedom)."""
    diffs = [100 * (v - b) for v, b in zip(values, baseline, strict=True)]
    if not all(math.isfinite(d) for d in diffs):
        return "—"
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.2f}"
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def group_mean(summary: dict, num_groups: int) -> float:
    """The global model's accuracy on the central test set as each group sees it, averaged."""
    keys = [f"central_accuracy_group{g}" for g in range(num_groups)]
    return statistics.fmean(summary[k] for k in keys) if keys[0] in summary else math.nan


def local_only(scenario: Scenario) -> dict[str, float]:
    """Every client trained alone from the run's initial model for ``num_rounds x epochs`` epochs;
    the same summary keys as a run (``personalized_*`` = ``local_*``: nothing to fine-tune)."""
    start = time.perf_counter()
    seed_everything(scenario.seed)
    info = dataset_info(scenario.data)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train = scenario.train.model_copy(
        update={"epochs": scenario.num_rounds * scenario.train.epochs}
    )
    accs = []
    for pid in range(scenario.data.num_clients):
        data = load_client_data(scenario.data, scenario.seed, pid)
        gen = torch.Generator().manual_seed(derive_seed(scenario.seed, pid))
        bare_local_training(model, initial, data, train, gen)
        accs.append(evaluate(model, data.x_test, data.y_test, torch.device("cpu"))[1])
    mean, worst = float(np.mean(accs)), worst_fraction_mean(accs)
    return {
        "local_accuracy_mean": mean,
        "local_accuracy_worst10": worst,
        "personalized_accuracy_mean": mean,
        "personalized_accuracy_worst10": worst,
        "total_wall_time_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="scenarios/clustered_pathological.toml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", "--algorithms", dest="methods", default=None)
    parser.add_argument(
        "--shift",
        default="none",
        choices=["none", "label_permutation", "rotation", "feature_shift"],
    )
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--sweep", action="store_true", help="add the Reptile ε / k sweep")
    parser.add_argument(
        "--set", dest="sets", action="append", default=None, help="override (key=value)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    shifted = args.shift != "none"
    sets = list(SHIFT_SETS if shifted else DEFAULT_SETS)
    if shifted:
        sets += [
            "data.partitioner=iid",
            f"data.concept_shift={args.shift}",
            f"data.num_groups={args.groups}",
        ]
    sets += args.sets or []
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = METHODS | SWEEP  # --methods may name sweep entries too
    chosen = [m for m in (args.methods.split(",") if args.methods else DEFAULT_METHODS) if m]
    chosen += list(SWEEP) if args.sweep and not args.methods else []
    base = load_scenario(args.scenario, sets)
    out = (
        args.out
        or base.resolved_output_dir()
        / f"personalization-{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    print(
        f"{base.name}: {base.data.num_clients} clients ({base.data.partitioner}, concept shift "
        f"{base.data.concept_shift} x {base.data.num_groups}), {base.num_rounds} rounds, seeds "
        f"{seeds}, fine-tune {base.personalization.finetune_epochs} "
        f"epoch(s) / {base.personalization.finetune_steps} steps -> {out}",
        flush=True,
    )
    runs = []
    for method, seed in ((m, s) for m in chosen for s in seeds):  # every scenario valid up front
        if method not in methods:
            parser.error(f"unknown method {method!r}; known: {', '.join(methods)}")
        extra = list(methods[method])
        if method == "ifca" and shifted:
            extra.append(f"algorithm.num_clusters={args.groups}")
        algo = "fedavg" if method == LOCAL_ONLY else method.split()[0]
        tag = method.replace(" ", "_").replace("=", "-")
        scenario = load_scenario(
            args.scenario,
            [*sets, f"algorithm.name={algo}", *extra, f"seed={seed}", f"name={tag}"],
        )
        runs.append((method, seed, tag, scenario))
    rows: dict[str, dict[str, list[float]]] = {}
    run_dirs = []
    start = time.perf_counter()
    total = len(chosen) * len(seeds)
    for i, (method, seed, tag, scenario) in enumerate(runs, 1):
        t0 = time.perf_counter()
        if method == LOCAL_ONLY:
            summary = local_only(scenario)
        else:
            run_dir = out / f"{tag}-s{seed}"
            summary = run_engine(scenario, run_dir, show_progress=False)
            run_dirs.append(run_dir)
        labels = (
            {"FedAvg": "local", "FedAvg + fine-tune": "personalized"}
            if method == "fedavg"
            else {method if method == LOCAL_ONLY else f"{method} + fine-tune": "personalized"}
        )
        for label, which in labels.items():
            row = rows.setdefault(
                label,
                {"mean": [], "worst10": [], "before": [], "ari": [], "global": [], "wall": []},
            )
            row["mean"].append(summary[f"{which}_accuracy_mean"])
            row["worst10"].append(summary[f"{which}_accuracy_worst10"])
            row["before"].append(summary["local_accuracy_mean"])
            row["ari"].append(summary.get("planted_ari", math.nan))
            row["global"].append(group_mean(summary, base.data.num_groups))
            row["wall"].append(summary["total_wall_time_s"])
        ari = summary.get("planted_ari")
        print(
            f"[{i}/{total}] {method} seed={seed}: personalized "
            f"{100 * summary.get('personalized_accuracy_mean', float('nan')):.2f}% "
            f"(before fine-tune {100 * summary['local_accuracy_mean']:.2f}%)"
            + (f", ARI {ari:.3f}" if ari is not None else "")
            + f", {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
    pers = base.personalization
    finetune = (
        f"{pers.finetune_steps} SGD step(s)"
        if pers.finetune_steps > 0
        else f"{pers.finetune_epochs} epoch(s)"
    )
    shift = (
        f", concept shift {base.data.concept_shift} in {base.data.num_groups} groups"
        if shifted
        else ""
    )
    lines = [
        f"# Personalized accuracy: {base.name}{shift}",
        "",
        f"{base.data.num_clients} clients, {base.data.dataset} {base.data.partitioner}{shift}, "
        f"{base.num_rounds} rounds, model {base.model.name} {base.model.hidden}, seeds {seeds}; "
        f"fine-tune: {finetune} at lr {base.train.lr}. "
        "Accuracy (%) on each client's local test split at the last round, unweighted mean over "
        f"clients; {std_caption(len(seeds))}. ARI: clusters found vs planted groups at the "
        "last round. Global model: the run's global arrays on the central test set as each group "
        "sees it, mean over groups.",
        "",
        "| method | accuracy (%) | worst-10% clients (%) | before fine-tune (%) | ARI "
        "| global model (%) | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        aris = [a for a in row["ari"] if math.isfinite(a)]
        ari = f"{statistics.fmean(aris):.3f} (min {min(aris):.3f})" if aris else "—"
        lines.append(
            f"| {label} | {fmt(row['mean'])} | {fmt(row['worst10'])} | {fmt(row['before'])} "
            f"| {ari} | {fmt(row['global'])} | {statistics.fmean(row['wall']):.0f} |"
        )
    baseline = rows.get("FedAvg + fine-tune")
    if baseline and len(rows) > 2:
        lines += [
            "",
            "Difference from FedAvg + fine-tune (percentage points, paired by seed): mean "
            f"[95 % Student-t interval, n = {len(seeds)}].",
            "",
            "| method | accuracy | before fine-tune | global model |",
            "|---|---|---|---|",
        ]
        for label, row in rows.items():
            if label in ("FedAvg", "FedAvg + fine-tune") or len(row["mean"]) != len(seeds):
                continue
            lines.append(
                f"| {label} | {paired_difference(row['mean'], baseline['mean'])} "
                f"| {paired_difference(row['before'], baseline['before'])} "
                f"| {paired_difference(row['global'], baseline['global'])} |"
            )
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "personalization.md").write_text(table)
    if run_dirs:
        compare_runs(run_dirs, out, metric="personalized_accuracy")
    print()
    print(table)
    print(f"total {time.perf_counter() - start:.0f}s; wrote {out / 'personalization.md'}")


if __name__ == "__main__":
    main()
