"""The comparison suite: every algorithm family on four data settings, mean ± std over seeds.

Settings (small, to fit a 2-core CPU): mnist1d Dirichlet α = 0.1 and 0.5, digits pathological (2
classes per client), LEAF Synthetic(1, 1); 10 clients, ``--rounds`` rounds, MLP 64×64, 1 local
epoch. Algorithms: FedAvg, FedProx, FedLD, FedLAW, clustered (+ Reptile on the server), CFL, IFCA,
Per-FedAvg, each with its defaults (FedLAW's proxy: ``data.proxy_fraction = 0.02`` for every run so
all runs hold the same client data). Every run also fine-tunes the received model 1 epoch on each
client at the last round: "personalized" is that local-test accuracy (unweighted mean over clients).

Each invocation runs the settings it is given and merges them into ``<out>.json``; the markdown
table ``<out>.md`` is rebuilt from everything recorded, with the machine and commit. Edge trainers
vs backprop and LoRA bytes have their own benchmarks (``edge_trainers.py``, ``lora_sweep.py``).

Run (each line stays within a few minutes on the shared box):
    PYTHONPATH=. python benchmarks/suite.py --settings mnist1d-dir0.1 --seeds 0,1,2
    PYTHONPATH=. python benchmarks/suite.py --settings mnist1d-dir0.5 digits-pathological synthetic-1-1
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from fedge.engines import run_engine
from scenarios.config import validate_scenario
from scenarios.stats import format_mean_std, std_caption

SETTINGS = {
    "mnist1d-dir0.1": {"dataset": "mnist1d", "partitioner": "dirichlet", "alpha": 0.1},
    "mnist1d-dir0.5": {"dataset": "mnist1d", "partitioner": "dirichlet", "alpha": 0.5},
    "digits-pathological": {
        "dataset": "digits",
        "partitioner": "pathological",
        "classes_per_client": 2,
    },
    "synthetic-1-1": {"dataset": "synthetic", "synthetic_alpha": 1.0, "synthetic_beta": 1.0},
}
ALGORITHMS = {  # label -> [algorithm] table
    "FedAvg": {"name": "fedavg"},
    "FedProx": {"name": "fedprox"},
    "FedLD": {"name": "fedld"},
    "FedLAW": {"name": "fedlaw"},
    "clustered": {"name": "clustered"},
    "CFL": {"name": "cfl"},
    "IFCA": {"name": "ifca"},
    "Per-FedAvg": {"name": "perfedavg", "perfedavg_beta": 0.05},
}


def scenario(setting: str, algorithm: dict, seed: int, rounds: int, out: Path):
    return validate_scenario(
        {
            "name": f"{setting}-{algorithm['name']}",
            "seed": seed,
            "num_rounds": rounds,
            "output_dir": str(out),
            "data": {"num_clients": 10, "proxy_fraction": 0.02, **SETTINGS[setting]},
            "model": {"name": "mlp", "hidden": [64, 64]},
            "algorithm": algorithm,
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            "federation": {"fraction_train": 1.0, "fraction_evaluate": 1.0},
            "personalization": {"finetune_epochs": 1, "evaluate_every": rounds},
        }
    )


def fmt(values: list[float]) -> str:
    return format_mean_std(values, scale=100, digits=1)


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(  # the suite's own output files do not count
            ["git", "status", "--porcelain", "--", ".", ":!docs/results/comparison-suite.*"],
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_markdown(records: dict, path: Path) -> None:
    seed_counts = sorted({len(r["meta"]["seeds"]) for r in records["settings"].values()})
    lines = [
        "# Comparison suite (issue #14)",
        "",
        "`benchmarks/suite.py` (see its docstring for the settings). Accuracy in %, "
        f"{std_caption(' or '.join(map(str, seed_counts)))}; *central* = the global model on the central test set at the last "
        "round (for clustered/CFL/IFCA the sample-weighted mean of the cluster models); "
        "*personalized* = each client's local test accuracy after 1 epoch of fine-tuning, "
        "unweighted mean over clients.",
        "",
    ]
    for setting, runs in records["settings"].items():
        meta = runs["meta"]
        lines += [
            f"## {setting}",
            "",
            f"{meta['rounds']} rounds, seeds {meta['seeds']}; machine: {meta['machine']}; "
            f"commit {meta['commit']}; {meta['wall_s']:.0f} s.",
            "",
            "| algorithm | central acc | personalized acc | wall s / run |",
            "|---|---|---|---|",
        ]
        for label, row in runs["rows"].items():
            lines.append(
                f"| {label} | {fmt(row['central'])} | {fmt(row['personalized'])} | "
                f"{statistics.fmean(row['wall']):.1f} |"
            )
        lines.append("")
    lines += [
        "Reproduce: the `Run` lines of `benchmarks/suite.py`'s docstring. Where the papers' claims",
        "hold and where not: FedLD/FedLAW in [fedld-fedlaw-comparison.md](fedld-fedlaw-comparison.md),",
        "clustered in [personalization-comparison.md](personalization-comparison.md), edge trainers",
        "and ONNX in [edge-trainers-lora-onnx.md](edge-trainers-lora-onnx.md), LoRA bytes in",
        "[lora-bytes.md](lora-bytes.md).",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS)
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/results/comparison-suite"))
    parser.add_argument("--machine", default=f"{platform.machine()} CPU, shared 2-core box")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    store = args.out.with_suffix(".json")
    records = json.loads(store.read_text()) if store.exists() else {"settings": {}}
    for setting in args.settings:
        t0 = time.perf_counter()
        rows: dict[str, dict[str, list[float]]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for label in args.algorithms:
                row = rows.setdefault(label, {"central": [], "personalized": [], "wall": []})
                for seed in seeds:
                    sc = scenario(setting, ALGORITHMS[label], seed, args.rounds, Path(tmp))
                    start = time.perf_counter()
                    summary = run_engine(sc, Path(tmp) / f"{label}-{seed}", show_progress=False)
                    row["wall"].append(time.perf_counter() - start)
                    row["central"].append(summary["final_accuracy"])
                    if summary.get("personalized_accuracy_mean") is not None:
                        row["personalized"].append(summary["personalized_accuracy_mean"])
                print(
                    f"{setting} {label}: central {fmt(row['central'])}, personalized "
                    f"{fmt(row['personalized'])}",
                    flush=True,
                )
        records["settings"][setting] = {
            "meta": {
                "rounds": args.rounds,
                "seeds": seeds,
                "machine": args.machine,
                "commit": commit(),
                "wall_s": time.perf_counter() - t0,
            },
            "rows": rows,
        }
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        write_markdown(records, args.out.with_suffix(".md"))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
