"""In-process engine vs a bare PyTorch FedAvg loop over the same clients, data and model.

    python benchmarks/engine_overhead.py [--scenario scenarios/quickstart.toml] [--set key=value ...]

Prints the wall times of the bare loop, the in-process and the packed engine (whole runs, results
folder included; ``benchmarks/engines.py`` times the round loop alone) and their ratios, measured
in this one run. The bare loop does
the same work with no Flower records, no messages and no results folder: the ratio is what fedge's
machinery costs on top of the training itself.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from clients.data import dataset_info, load_central_test, load_client_data
from clients.models import build_model
from clients.seeding import seed_everything
from fedge.engines import run_engine
from scenarios.config import load_scenario


def bare_local_training(model, global_state, client, tc, generator: torch.Generator) -> None:
    """One client's local epochs in plain PyTorch, from ``global_state``, into ``model``."""
    model.load_state_dict(global_state)
    opt = torch.optim.SGD(
        model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay
    )
    x, y = torch.from_numpy(client.x_train), torch.from_numpy(client.y_train)
    for _ in range(tc.epochs):
        order = torch.randperm(len(x), generator=generator)
        for s in range(0, len(x), tc.batch_size):
            idx = order[s : s + tc.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def bare_fedavg(scenario) -> float:
    """FedAvg in plain PyTorch; returns the final central accuracy."""
    torch.set_num_threads(scenario.engine.client_threads)
    seed_everything(scenario.seed)
    info = dataset_info(scenario.data)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    clients = [
        load_client_data(scenario.data, scenario.seed, i) for i in range(scenario.data.num_clients)
    ]
    x_test, y_test = load_central_test(scenario.data, scenario.seed)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    tc = scenario.train
    for rnd in range(1, scenario.num_rounds + 1):
        states, weights = [], []
        for c in clients:
            gen = torch.Generator().manual_seed(rnd * 1000 + c.partition_id)
            bare_local_training(model, global_state, c, tc, gen)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(c.x_train))
        total = sum(weights)
        global_state = {
            k: sum(w / total * s[k] for w, s in zip(weights, states, strict=True))
            for k in global_state
        }
        model.load_state_dict(global_state)
        with torch.no_grad():
            acc = (
                (model(torch.from_numpy(x_test)).argmax(1) == torch.from_numpy(y_test))
                .float()
                .mean()
                .item()
            )
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", default=str(Path(__file__).parents[1] / "scenarios" / "quickstart.toml")
    )
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario, ["engine.name=inprocess", *args.overrides])
    # Warm the data caches and torch's lazy imports (the first optimizer pulls in torch._dynamo,
    # seconds) so that neither side pays one-time costs.
    for i in range(scenario.data.num_clients):
        load_client_data(scenario.data, scenario.seed, i)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    t0 = time.perf_counter()
    bare_acc = bare_fedavg(scenario)
    bare_s = time.perf_counter() - t0
    packed = scenario.model_copy(
        update={"engine": scenario.engine.model_copy(update={"name": "packed"})}
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_engine(scenario, Path(tmp) / "run", show_progress=False)
        engine_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        packed_summary = run_engine(packed, Path(tmp) / "packed", show_progress=False)
        packed_s = time.perf_counter() - t0
    print(
        f"scenario: {scenario.name} ({scenario.data.num_clients} clients x {scenario.num_rounds} rounds, {scenario.model.name})"
    )
    print(f"bare PyTorch loop : {bare_s:7.2f} s   final accuracy {bare_acc:.4f}")
    print(f"in-process engine : {engine_s:7.2f} s   final accuracy {summary['final_accuracy']:.4f}")
    print(
        f"packed engine     : {packed_s:7.2f} s   final accuracy {packed_summary['final_accuracy']:.4f}"
    )
    print(f"overhead ratio (engine / bare): {engine_s / bare_s:.2f}x")
    print(f"packed speedup vs bare: {bare_s / packed_s:.2f}x")


if __name__ == "__main__":
    main()
