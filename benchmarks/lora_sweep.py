"""LoRA rank × density sweep: accuracy vs uplink bytes, and the bytes ratio to dense LoRA.

A federation of ``--clients`` mnist1d clients (IID) fine-tunes a base MLP that the server
pre-trained on its proxy set. Every round every client runs the real ``lora`` trainer
(``edge/lora.py``: peft adapters, top-k + error feedback in its state) and the server merges
the replies with the real decoder (``server/lora_sparse.lora_weight_deltas``), weighted by examples.
The Flower message round trip is skipped to fit 16 settings into a few minutes on 2 busy cores;
bytes are ``ArrayRecord.count_bytes()`` of each actual reply.

"Bytes to target": the cumulative uplink bytes until central accuracy first reaches (dense LoRA of
the same rank's best accuracy − 1 point). Ratio = dense bytes-to-target / sparse bytes-to-target.

Run: ``PYTHONPATH=. python benchmarks/lora_sweep.py [--rounds 6 --clients 4]``
"""

from __future__ import annotations

import argparse
import time

import torch
from flwr.app import ConfigRecord, RecordDict

from clients.data import dataset_info, load_central_test, load_client_data
from clients.models import build_model
from clients.seeding import derive_seed
from clients.training import TrainJob, evaluate
from edge.lora import initial_factors, linear_names, train_lora
from scenarios.config import validate_scenario
from server.lora_sparse import lora_weight_deltas, pretrain_base
from server.strategies import ServerSetup

RANKS = (2, 4, 8, 16)
DENSITIES = (0.01, 0.05, 0.10, 1.0)
CPU = torch.device("cpu")


def run(rank: int, density: float, rounds: int, clients: int) -> list[tuple[int, float]]:
    """[(cumulative uplink bytes, central accuracy)] after every round."""
    sc = validate_scenario(
        {
            "seed": 0,
            "data": {"dataset": "mnist1d", "num_clients": clients, "proxy_fraction": 0.05},
            "model": {"name": "mlp", "hidden": [128, 128]},
            "algorithm": {
                "name": "lora_sparse",
                "rank": rank,
                "alpha": 2.0 * rank,
                "density": density,
                "pretrain_epochs": 10,
            },
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        }
    )
    info = dataset_info(sc.data)
    torch.manual_seed(0)
    model = build_model(sc.model, info.input_shape, info.num_classes)
    pretrain_base(ServerSetup(sc, info, model, CPU), sc.algorithm)
    start = initial_factors(model, sc.algorithm, sc.seed)
    names = linear_names(model)
    data = [load_client_data(sc.data, sc.seed, pid) for pid in range(clients)]
    states = [RecordDict() for _ in range(clients)]
    x, y = load_central_test(sc.data, sc.seed)
    history, sent = [(0, evaluate(model, x, y, CPU)[1])], 0
    for rnd in range(1, rounds + 1):
        state = model.state_dict()
        total = {k: torch.zeros_like(v) for k, v in state.items()}
        weights = 0.0
        for pid in range(clients):
            local = build_model(sc.model, info.input_shape, info.num_classes)
            local.load_state_dict(state)
            gen = torch.Generator().manual_seed(derive_seed(sc.seed, rnd, pid))
            torch.manual_seed(derive_seed(sc.seed, rnd, pid, 1))
            result = train_lora(
                TrainJob(local, data[pid], sc, ConfigRecord(), states[pid], gen, CPU)
            )
            sent += result.reply_arrays.count_bytes()
            deltas = lora_weight_deltas(
                result.reply_arrays, start, names, sc.algorithm.alpha / rank
            )
            for key, delta in deltas.items():
                total[key] += result.num_examples * delta
            weights += result.num_examples
        model.load_state_dict({k: v + total[k] / weights for k, v in state.items()})
        history.append((sent, evaluate(model, x, y, CPU)[1]))
    return history


def bytes_to(history: list[tuple[int, float]], target: float) -> int | None:
    return next((b for b, acc in history if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    t0 = time.time()
    for rank in RANKS:
        for density in DENSITIES:
            results[rank, density] = run(rank, density, args.rounds, args.clients)
            b, acc = results[rank, density][-1]
            print(
                f"r={rank:2d} rho={density:4.0%}: final acc {acc:.3f}, uplink {b / 1024:.0f} KiB "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
    print(
        "\n| rank | density | base acc | final acc | best acc | uplink KiB (all rounds) | "
        "bytes to dense-1pt target | ratio vs dense |"
    )
    print("|" + "---|" * 8)
    for rank in RANKS:
        dense = results[rank, 1.0]
        target = max(acc for _, acc in dense) - 0.01
        dense_bytes = bytes_to(dense, target)
        for density in DENSITIES:
            h = results[rank, density]
            b = bytes_to(h, target)
            ratio = f"{dense_bytes / b:.1f}x" if b else "never reached"
            print(
                f"| {rank} | {density:.0%} | {h[0][1]:.3f} | {h[-1][1]:.3f} | "
                f"{max(a for _, a in h):.3f} | {h[-1][0] / 1024:.1f} | "
                f"{'-' if b is None else f'{b / 1024:.1f} KiB'} | {ratio} |"
            )
    print(
        f"({args.clients} IID mnist1d clients, {args.rounds} rounds, MLP 128x128, "
        f"target = dense LoRA's best accuracy - 1 point, per rank)"
    )


if __name__ == "__main__":
    main()
