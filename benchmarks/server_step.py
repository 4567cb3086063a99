"""Server aggregation step time vs number of clients K and model size: FedAvg, FedLD, FedLAW.

    python benchmarks/server_step.py [--ks 10,100,1000] [--fedlaw-epochs 20] [--big-epochs-k1000 2]

Client models are random perturbations of one global model (the aggregation cost does not depend
on what the clients learned). FedAvg is Flower's own ``aggregate_arrayrecords`` (the reference);
FedLD is ``fedld_aggregate_state`` (principal-gradient aggregation of every tensor); FedLAW is
``learn_aggregation`` on an 80-sample proxy set (2% of mnist1d's 4,000 train rows). For K = 1000
FedLAW runs fewer server epochs (printed) so the script stays within a few minutes; its time per
epoch is printed too, so the full 20-epoch cost is epochs x that. One timed call per cell, after a
warm-up call on the smallest K.
"""

from __future__ import annotations

import argparse
import time

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

from algorithms.fedlaw import FedLAWConfig, learn_aggregation
from algorithms.fedld import fedld_aggregate_state

MODELS = {"small MLP 40-64-10": [64], "large MLP 40-256-256-10": [256, 256]}
PROXY_SIZE = 80


def mlp(hidden: list[int]) -> nn.Module:
    layers, width = [], 40
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 10))


def timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="10,100,1000")
    parser.add_argument("--fedlaw-epochs", type=int, default=20)
    parser.add_argument("--fedlaw-epochs-k1000", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    proxy_x, proxy_y = torch.randn(PROXY_SIZE, 40), torch.randint(0, 10, (PROXY_SIZE,))
    print(f"torch threads: 1, proxy set: {PROXY_SIZE} samples, FedLAW batch 128")
    header = f"| {'model':24} | {'params':>7} | {'K':>5} | {'FedAvg s':>9} | {'FedLD s':>9} | {'FedLD/FedAvg':>12} | {'FedLAW s':>9} | {'FedLAW epochs':>13} | {'FedLAW s/epoch':>14} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for label, hidden in MODELS.items():
        model = mlp(hidden)
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params = sum(v.numel() for v in global_state.values())
        for i, k in enumerate(ks):
            clients = [
                {n: v + 0.01 * torch.randn_like(v) for n, v in global_state.items()}
                for _ in range(k)
            ]
            counts = torch.randint(20, 400, (k,)).tolist()
            records = [
                RecordDict({"arrays": ArrayRecord(c), "metrics": MetricRecord({"num-examples": n})})
                for c, n in zip(clients, counts, strict=True)
            ]
            epochs = args.fedlaw_epochs if k < 1000 else args.fedlaw_epochs_k1000
            cfg = FedLAWConfig(server_epochs=epochs, gamma_warn_below=0.0)

            if i == 0:  # warm-up (first calls pay for lazy initialisation)
                fedld_aggregate_state(global_state, clients, first_round=False)
                learn_aggregation(
                    model, clients, counts, proxy_x, proxy_y, FedLAWConfig(server_epochs=1)
                )
            t_avg = timed(aggregate_arrayrecords, records, "num-examples")
            t_ld = timed(fedld_aggregate_state, global_state, clients, first_round=False)
            t_law = timed(learn_aggregation, model, clients, counts, proxy_x, proxy_y, cfg)
            print(
                f"| {label:24} | {params:>7} | {k:>5} | {t_avg:>9.4f} | {t_ld:>9.4f} | "
                f"{t_ld / t_avg:>12.1f} | {t_law:>9.3f} | {epochs:>13} | {t_law / epochs:>14.4f} |",
                flush=True,
            )
            del clients, records


if __name__ == "__main__":
    main()
