"""FedAvg / FedProx / FedLD / FedLAW and their ablations over seeds, on mnist1d label skew.

    python benchmarks/compare_fedld_fedlaw.py [--alphas 0.1,0.5] [--seeds 0,1,2] [--rounds 15]
                                              [--variants fedavg,fedld,...] [--fedld-server-lr 1.0]
                                              [--train short|authors]
                                              [--out results/compare_fedld_fedlaw]

Every run shares the same data, model, local training and proxy carve-out (data.proxy_fraction =
0.02 for all, so every algorithm's clients hold exactly the same rows); only ``[algorithm]`` differs.
Writes, per alpha, ``<out>/dir<alpha>/comparison.md`` (per-run table + mean ± std over seeds) and
``comparison.png`` (central accuracy vs round), via ``fedge.report.compare_runs``, and prints
the mean final accuracy and FedLAW's mean gamma* per variant.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from fedge.engines import run_engine
from fedge.report import compare_runs
from scenarios.config import validate_scenario
from scenarios.results import load_run
from scenarios.stats import format_mean_std

VARIANTS: dict[str, dict] = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "fedld": {"name": "fedld"},
    "fedld_margin_only": {"name": "fedld", "aggregation": "mean"},
    "fedld_aggregation_only": {"name": "fedld", "margin_lambda": 0.0},
    "fedlaw": {"name": "fedlaw"},
    "fedlaw_lambda_only": {"name": "fedlaw", "learn_gamma": False},
    "fedlaw_gamma_only": {"name": "fedlaw", "learn_lambda": False},
}

# Local training presets: "short" keeps 3 seeds x 8 variants to minutes; "authors" is FedLD's
# reference optimizer (SGD lr 0.01, momentum 0.5, weight decay 5e-4, batch 50, 5 local epochs).
TRAIN_PRESETS: dict[str, dict] = {
    "short": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "authors": {"epochs": 5, "batch_size": 50, "lr": 0.01, "momentum": 0.5, "weight_decay": 5e-4},
}


def scenario(
    label: str,
    alpha: float,
    seed: int,
    rounds: int,
    out: Path,
    fedld_server_lr: float = 1.0,
    train: str = "short",
):
    algorithm = dict(VARIANTS[label])
    if algorithm["name"] == "fedld":
        algorithm["server_lr"] = fedld_server_lr
    return validate_scenario(
        {
            "name": label,
            "seed": seed,
            "num_rounds": rounds,
            "output_dir": str(out),
            "data": {
                "dataset": "mnist1d",
                "num_clients": 10,
                "partitioner": "dirichlet",
                "alpha": alpha,
                "proxy_fraction": 0.02,
            },
            "model": {"name": "mlp", "hidden": [64, 64]},
            "algorithm": algorithm,
            "train": TRAIN_PRESETS[train],
            "engine": {"name": "inprocess"},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alphas", default="0.1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--fedld-server-lr", type=float, default=1.0, help="FedLD variants only")
    parser.add_argument("--train", choices=sorted(TRAIN_PRESETS), default="short")
    parser.add_argument("--out", type=Path, default=Path("results/compare_fedld_fedlaw"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    labels = args.variants.split(",")
    total = len(labels) * len(seeds) * len(args.alphas.split(","))
    done, t0 = 0, time.perf_counter()
    for alpha in (float(a) for a in args.alphas.split(",")):
        out = args.out / f"dir{alpha:g}"
        run_dirs = []
        for label in labels:
            for seed in seeds:
                run_dir = out / f"{label}-s{seed}"
                if not (run_dir / "summary.json").exists():  # rerunning resumes a cut-off sweep
                    run_engine(
                        scenario(
                            label, alpha, seed, args.rounds, out, args.fedld_server_lr, args.train
                        ),
                        run_dir,
                        False,
                    )
                run_dirs.append(run_dir)
                done += 1
                acc = load_run(run_dir).summary["final_accuracy"]
                print(
                    f"[{done}/{total} {time.perf_counter() - t0:6.0f}s] alpha={alpha:g} "
                    f"{label} seed={seed}: final accuracy {acc:.4f}",
                    flush=True,
                )
        png, md = compare_runs(run_dirs, out)
        print(f"\nalpha={alpha:g}: {md} and {png}")
        for label in labels:
            runs = [load_run(out / f"{label}-s{s}") for s in seeds]
            accs = [r.summary["final_accuracy"] for r in runs]
            line = f"  {label:24} final acc {format_mean_std(accs, digits=4)}"
            gammas = [r["fedlaw_gamma"] for run in runs for r in run.rounds if "fedlaw_gamma" in r]
            if gammas:
                line += f"   mean gamma* {statistics.mean(gammas):.3f} (min {min(gammas):.3f})"
            print(line)


if __name__ == "__main__":
    main()
