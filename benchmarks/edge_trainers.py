"""tpSGD and forward-forward vs backprop on mnist1d and digits: accuracy, peak memory, time/epoch.

* ``alone``: one client holding the whole train split, ``--epochs`` epochs of each trainer.
* ``federated``: the real in-process Flower federation (``run_engine``) with ``--clients`` IID
  clients and ``--rounds`` FedAvg rounds, every client on the same trainer, plus a mixed federation
  (half backprop, half tpSGD). FF runs use the ``ff_mlp`` model (features + one-hot label input).

Peak memory is ``edge.memory.measure_training_memory`` for one step at the training batch
size (CPU: params + grads + peak saved-for-backward tensors). Model: 2-hidden-layer MLP 128×128.

Run: ``PYTHONPATH=. python benchmarks/edge_trainers.py --part alone`` (then ``--part federated``).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from clients.data import dataset_info, load_central_test, load_client_data
from clients.models import build_model
from clients.trainers import get_trainer
from clients.training import TrainJob, evaluate
from edge import tpsgd
from edge.memory import measure_training_memory
from scenarios.config import validate_scenario

CPU = torch.device("cpu")
TRAINERS = {  # label -> (trainer, model)
    "backprop": ("fedavg", "mlp"),
    "tpsgd": ("tpsgd", "mlp"),
    "forward_forward": ("forward_forward", "ff_mlp"),
}
# Rows of the "alone" part only: tpSGD variants and the control every tpSGD row must beat.
ALONE_EXTRA = {  # label -> (trainer, model, edge keys, hidden layers trained)
    "tpsgd (mse)": ("tpsgd", "mlp", {"tpsgd_loss": "mse"}, True),
    "control: hidden layers untrained": ("tpsgd", "mlp", {}, False),
}
MEMORY_NAME = {"fedavg": "backprop", "tpsgd": "tpsgd", "forward_forward": "forward_forward"}


def base_raw(dataset: str, model: str, clients: int) -> dict:
    return {
        "seed": 0,
        "data": {"dataset": dataset, "num_clients": clients},
        "model": {"name": model, "hidden": [128, 128]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    }


@contextlib.contextmanager
def untrained_hidden_layers(active: bool):
    """The control: tpSGD with every hidden-layer loss × 0 (only the output layer learns)."""
    if not active:
        yield
        return
    original = tpsgd.local_loss
    tpsgd.local_loss = lambda *args: 0.0 * original(*args)
    try:
        yield
    finally:
        tpsgd.local_loss = original


def alone(epochs: int) -> None:
    print("| data | trainer | test acc | sec/epoch | peak train mem KiB (batch 32) | vs BP |")
    print("|---|---|---|---|---|---|")
    rows = {label: (t, m, {}, True) for label, (t, m) in TRAINERS.items()} | ALONE_EXTRA
    for dataset in ("mnist1d", "digits"):
        bp_peak = None
        for label, (trainer, model_name, edge, hidden_trained) in rows.items():
            sc = validate_scenario({**base_raw(dataset, model_name, 1), "edge": edge})
            info = dataset_info(sc.data)
            torch.manual_seed(0)
            model = build_model(sc.model, info.input_shape, info.num_classes)
            data = load_client_data(sc.data, 0, 0)
            x, y = load_central_test(sc.data, 0)
            times = []
            for epoch in range(epochs):
                gen = torch.Generator().manual_seed(epoch)
                start = time.perf_counter()
                with untrained_hidden_layers(not hidden_trained):
                    get_trainer(trainer)(
                        TrainJob(model, data, sc, ConfigRecord(), RecordDict(), gen, CPU)
                    )
                times.append(time.perf_counter() - start)
            acc = evaluate(model, x, y, CPU)[1]
            xb = torch.from_numpy(data.x_train[:32])
            yb = torch.from_numpy(data.y_train[:32])
            fresh = build_model(sc.model, info.input_shape, info.num_classes)
            peak = measure_training_memory(MEMORY_NAME[trainer], fresh, xb, yb).peak_bytes
            bp_peak = bp_peak or peak
            print(
                f"| {dataset} | {label} | {acc:.3f} | {np.mean(times):.3f} | {peak / 1024:.0f} | "
                f"{peak / bp_peak:.2f} |",
                flush=True,
            )
    print(f"(one client with the whole train split, {epochs} epochs, 1 torch thread)")


def federated(rounds: int, clients: int) -> None:
    from fedge.engines import run_engine
    from scenarios.results import load_run

    runs = {label: ({"*": trainer}, model) for label, (trainer, model) in TRAINERS.items()}
    runs["mixed bp+tpsgd"] = ({f"{clients // 2}-{clients - 1}": "tpsgd"}, "mlp")
    print("| data | clients' trainers | round-by-round central acc | final acc | wall s |")
    print("|---|---|---|---|---|")
    for dataset in ("mnist1d", "digits"):
        for label, (trainers, model_name) in runs.items():
            raw = base_raw(dataset, model_name, clients)
            raw.update(
                num_rounds=rounds,
                output_dir=tempfile.mkdtemp(),
                edge={"trainers": trainers, "export_onnx": False},
            )
            sc = validate_scenario(raw)
            run_dir = Path(raw["output_dir"]) / "run"
            start = time.perf_counter()
            run_engine(sc, run_dir, show_progress=False)
            wall = time.perf_counter() - start
            accs = [r["central_accuracy"] for r in load_run(run_dir).rounds]
            print(
                f"| {dataset} | {label} | {' '.join(f'{a:.2f}' for a in accs)} | {accs[-1]:.3f} | "
                f"{wall:.0f} |",
                flush=True,
            )
    print(f"({clients} IID clients, {rounds} FedAvg rounds, 1 local epoch, in-process engine)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["alone", "federated"], default="alone")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part == "alone":
        alone(args.epochs)
    else:
        federated(args.rounds, args.clients)


if __name__ == "__main__":
    main()
