"""Where FedLD's aggregate departs from FedAvg's mean: step length and direction, step by step.

From the same K client updates (10 mnist1d clients, Dirichlet α, a FedAvg trajectory: every round
the clients train 1 epoch from the current mean model), per state-dict tensor as
``fedld_aggregate_state`` does, compare with the plain mean update:

* ``eigen filter``: the mean projected on the top k = ⌊K·k_prop⌋ principal directions (what the
  eigen filtering alone would keep);
* ``norm-weighted signs``: Σ_j [mean_i sign(C_ij)·||Δ_i||] w_j/||w_j|| over the kept directions —
  FedLD's coefficients before the s_j/Σs rescale (each client votes with its whole norm, whatever
  its alignment with w_j);
* ``FedLD``: the same × s_j/Σs (:func:`algorithms.fedld.principal_gradient_aggregate`).

Columns: ||·|| / ||mean|| and cosine to the mean (all tensors concatenated), averaged over rounds
2..R (round 1 of FedLD is the plain mean). The majority sign flip is left out: it cannot change
any of these (tests/test_methods_notice.py).

Run: ``PYTHONPATH=. python benchmarks/fedld_step_length.py [--rounds 8 --alphas 0.1 0.5]``
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from flwr.app import ConfigRecord, RecordDict

from algorithms.fedld import num_directions, principal_gradient_aggregate
from clients.data import dataset_info, load_client_data
from clients.models import build_model
from clients.seeding import derive_seed
from clients.trainers import get_trainer
from clients.training import TrainJob
from scenarios.config import validate_scenario

CPU = torch.device("cpu")


def variants(updates: torch.Tensor, k_prop: float) -> dict[str, torch.Tensor]:
    g = updates.double()
    k_all = len(g)
    evals, evecs = torch.linalg.eigh(g @ g.T / k_all)
    evals, evecs = evals.flip(0), evecs.flip(1)
    k = num_directions(k_all, k_prop)
    keep = evals[:k] > 1e-6 * evals[0].clamp_min(0)
    e = evecs[:, :k][:, keep]
    w = e.T @ g
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    coeffs = g @ w.T
    mean = g.mean(0)
    signs = (torch.sign(coeffs) * g.norm(dim=1)[:, None]).mean(0)
    return {
        "mean": mean,
        "eigen filter": (mean @ unit.T) @ unit,
        "norm-weighted signs": signs @ unit,
        "FedLD": principal_gradient_aggregate(updates, k_prop).double(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--k-prop", type=float, default=0.8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    print("| α | variant | ‖·‖ / ‖mean‖ | cos to mean |")
    print("|---|---|---|---|")
    for alpha in args.alphas:
        sc = validate_scenario(
            {
                "seed": 0,
                "data": {
                    "dataset": "mnist1d",
                    "num_clients": args.clients,
                    "partitioner": "dirichlet",
                    "alpha": alpha,
                },
                "model": {"name": "mlp", "hidden": [128, 128]},
                "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            }
        )
        info = dataset_info(sc.data)
        torch.manual_seed(0)
        model = build_model(sc.model, info.input_shape, info.num_classes)
        data = [load_client_data(sc.data, sc.seed, p) for p in range(args.clients)]
        stats: dict[str, list[tuple[float, float]]] = {}
        for rnd in range(1, args.rounds + 1):
            base = {k: v.clone() for k, v in model.state_dict().items()}
            states = []
            for pid in range(args.clients):
                local = copy.deepcopy(model)
                gen = torch.Generator().manual_seed(derive_seed(sc.seed, rnd, pid))
                job = TrainJob(local, data[pid], sc, ConfigRecord(), RecordDict(), gen, CPU)
                get_trainer("fedavg")(job)
                states.append(local.state_dict())
            per_variant: dict[str, list[torch.Tensor]] = {}
            for key, ref in base.items():
                updates = torch.stack([(s[key] - ref).reshape(-1) for s in states])
                for name, vec in variants(updates, args.k_prop).items():
                    per_variant.setdefault(name, []).append(vec)
            flat = {name: torch.cat(parts) for name, parts in per_variant.items()}
            mean = flat["mean"]
            if rnd >= 2:
                for name, vec in flat.items():
                    cos = float(vec @ mean / (vec.norm() * mean.norm()))
                    stats.setdefault(name, []).append((float(vec.norm() / mean.norm()), cos))
            # follow FedAvg's trajectory
            model.load_state_dict(
                {
                    k: v + mean_k.reshape(v.shape).to(v.dtype)
                    for (k, v), mean_k in zip(base.items(), per_variant["mean"], strict=True)
                }
            )
        for name, rows in stats.items():
            ratio = sum(r for r, _ in rows) / len(rows)
            cos = sum(c for _, c in rows) / len(rows)
            print(f"| {alpha} | {name} | {ratio:.3f} | {cos:.3f} |", flush=True)
    print(
        f"({args.clients} clients, rounds 2..{args.rounds}, k_prop {args.k_prop}, MLP 128x128, "
        f"1 local epoch lr 0.05 momentum 0.9; {time.time() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
