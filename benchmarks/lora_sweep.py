"""LoRA sweep: accuracy vs uplink + downlink bytes per round, sparse packets vs dense LoRA.

Each setting is a real in-process federation (``fedge.engines.run_engine``): ``--clients`` IID
mnist1d clients fine-tune LoRA adapters on an MLP base the server pre-trained on its proxy set;
every message goes through the Flower loop, the client mods (LoRA downlink, virtual clock) and the
``lora_sparse`` strategy, and the bytes are the loop's ``bytes_up`` / ``bytes_down``
(``ArrayRecord.count_bytes()`` of every instruction and reply).

The baseline is **dense LoRA**: every adapter entry as float32 values, no index array, both
ways (adapter-only downlink). The frozen base reaches each node once (round 1); it is the same
for every setting and is reported apart, not in the per-round figures.

"Bytes to target": cumulative up + down bytes (base excluded) until central accuracy first reaches
dense LoRA's best accuracy (same rank) − 1 point. Ratio = dense / this setting.

Run: ``PYTHONPATH=. python benchmarks/lora_sweep.py [--ranks 4 8 16 --rounds 10 --clients 4]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from clients.data import dataset_info
from clients.models import build_model
from fedge.engines import run_engine
from scenarios.config import validate_scenario
from scenarios.results import load_run

# (label, uplink density, value type, downlink density or None = the uplink's); the first is the
# dense-LoRA baseline.
SETTINGS = (
    ("dense f32", 1.0, "float32", None),
    ("5% f32", 0.05, "float32", None),
    ("5% f16", 0.05, "float16", None),
    ("10% f16", 0.10, "float16", None),
    ("5% int8", 0.05, "int8", None),
    ("10% int8", 0.10, "int8", None),
    ("5% int8 down 20%", 0.05, "int8", 0.20),
    ("10% int8 down 40%", 0.10, "int8", 0.40),
)


def scenario(
    rank: int,
    density: float,
    value_type: str,
    rounds: int,
    clients: int,
    out: Path,
    lr: float = 0.1,
    downlink_density: float | None = None,
):
    return validate_scenario(
        {
            "seed": 0,
            "num_rounds": rounds,
            "output_dir": str(out),
            "data": {"dataset": "mnist1d", "num_clients": clients, "proxy_fraction": 0.05},
            "model": {"name": "mlp", "hidden": [128, 128]},
            "algorithm": {
                "name": "lora_sparse",
                "rank": rank,
                "alpha": 2.0 * rank,
                "density": density,
                "value_type": value_type,
                "downlink_density": downlink_density,
                "pretrain_epochs": 10,
            },
            "train": {"epochs": 1, "batch_size": 32, "lr": lr, "momentum": 0.9},
            "edge": {"export_onnx": False},
        }
    )


def base_bytes(sc) -> int:
    info = dataset_info(sc.data)
    model = build_model(sc.model, info.input_shape, info.num_classes)
    return ArrayRecord(torch_state_dict=model.state_dict()).count_bytes()


def run(sc, run_dir: Path) -> tuple[list[dict], int]:
    """Rounds of one federation and the bytes of the one-time base delivery."""
    run_engine(sc, run_dir, show_progress=False)
    rounds = load_run(run_dir).rounds
    return rounds, base_bytes(sc) * sc.data.num_clients


def history(rounds: list[dict], base: int) -> list[tuple[int, float]]:
    """[(cumulative up + down bytes without the base, central accuracy)] per round."""
    out, total = [(0, rounds[0]["central_accuracy"])], 0
    for r in rounds[1:]:
        total += r["bytes_up"] + r["bytes_down"] - (base if r["round"] == 1 else 0)
        out.append((total, r["central_accuracy"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rounds", type=int, default=10, help="rounds of dense LoRA")
    parser.add_argument(
        "--sparse-rounds", type=int, default=30, help="rounds of each sparse setting (cheaper)"
    )
    parser.add_argument("--only", nargs="+", help="setting labels to run (dense always runs)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    print(
        "| rank | setting | rounds | up B/client/round | down B/client/round | best acc | "
        "final acc | up+down to target | ratio vs dense |"
    )
    print("|" + "---|" * 9)
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks:
            rows = {}
            for label, density, value_type, down in SETTINGS:
                if args.only and label != "dense f32" and label not in args.only:
                    continue
                rounds_here = args.rounds if density >= 1.0 else args.sparse_rounds
                sc = scenario(
                    rank, density, value_type, rounds_here, args.clients, Path(tmp), args.lr, down
                )
                slug = "".join(c if c.isalnum() else "_" for c in label)
                rounds, base = run(sc, Path(tmp) / f"r{rank}-{slug}")
                rows[label] = (rounds, history(rounds, base))
            dense_best = max(a for _, a in rows["dense f32"][1])
            target = dense_best - 0.01
            dense_to = next(b for b, a in rows["dense f32"][1] if a >= target)
            for label, (rounds, hist) in rows.items():
                steady = rounds[2:] or rounds[1:]  # after round 1's base delivery
                per = args.clients * len(steady)  # every client samples every round
                up = sum(r["bytes_up"] for r in steady) / per
                down = sum(r["bytes_down"] for r in steady) / per
                reached = next((b for b, a in hist if a >= target), None)
                ratio = f"{dense_to / reached:.1f}x" if reached else "target not reached"
                print(
                    f"| {rank} | {label} | {len(rounds) - 1} | {up:.0f} | {down:.0f} | "
                    f"{max(a for _, a in hist):.3f} | {hist[-1][1]:.3f} | "
                    f"{'-' if reached is None else f'{reached / 1024:.1f} KiB'} | {ratio} |",
                    flush=True,
                )
    print(
        f"({args.clients} IID mnist1d clients, dense {args.rounds} / sparse {args.sparse_rounds} "
        f"rounds, lr {args.lr}, MLP 128x128 base pre-trained "
        f"on the 5% proxy set; base delivery {base / args.clients / 1024:.1f} KiB per node once; "
        f"target = dense LoRA's best accuracy - 1 point, per rank; {time.time() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
