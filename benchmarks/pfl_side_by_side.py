"""fedge's packed engine next to pfl-research (Apple's FL simulator) on the same workload.

    pip install -e ".[bench]"     # pfl==0.6.0, only for this script
    python benchmarks/pfl_side_by_side.py             # the issue's anchor: 500 clients, B=16
    python benchmarks/pfl_side_by_side.py --clients 50 --rounds 2

The same clients (fedge's mnist1d partitions: every client's own train split, as
``clients/data.py::load_client_data`` gives it), the same model (``clients/models.py``), the same
local SGD (learning rate, momentum, weight decay, batch size, epochs), every client every round,
FedAvg with a central evaluation on the same held-out test set after each round; one torch thread
for both. pfl runs its ``SimulatedBackend`` (one client after the other, in this process) with a
central SGD of learning rate 1 (FedAvg's "replace the model by the mean"). Timed: pfl's
``FederatedAveraging.run`` and fedge's round loop (``benchmarks/engines.py::timed_run``), each
after a one-round warm-up of the same size.

Both must do the same number of local steps: pfl's are counted (each training call of the model's
``loss``), fedge's are the ``num_steps`` its clients report in ``clients.jsonl``; the script stops
with an error when they differ. It prints ``pfl / packed: <ratio>x`` (how many times longer pfl
takes) on its own line, and the same ratio in CPU seconds of this process (both sides run here,
on one thread: on a shared machine the steadier of the two); also the bare PyTorch loop's time
(``engine_overhead.bare_fedavg``).
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from engine_overhead import bare_fedavg  # noqa: E402  (same folder)
from engines import scenario_for, timed_run  # noqa: E402

from clients.data import dataset_info, load_central_test, load_client_data  # noqa: E402
from clients.models import build_model  # noqa: E402
from scenarios.results import load_run  # noqa: E402


class CountingModule(torch.nn.Module):
    """fedge's model with what pfl's ``PyTorchModel`` asks for: ``loss`` (counted in training)
    and ``metrics``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
        if eval:
            self.eval()
        else:
            self.train()
            self.train_steps += 1
        return F.cross_entropy(self(x), y.long())

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict:  # noqa: A002
        from pfl.metrics import Weighted

        self.eval()
        logits = self(x)
        loss = F.cross_entropy(logits, y.long(), reduction="sum").item()
        correct = (logits.argmax(1) == y.long()).sum().item()
        return {"loss": Weighted(loss, len(x)), "accuracy": Weighted(correct, len(x))}


def run_pfl(scenario, rounds: int) -> tuple[float, float, int, float]:
    """(wall and CPU seconds of ``FederatedAveraging.run``, local steps, final central
    accuracy)."""
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel

    n = scenario.data.num_clients
    tc = scenario.train
    info = dataset_info(scenario.data)
    torch.manual_seed(scenario.seed)
    np.random.seed(scenario.seed % 2**32)
    module = CountingModule(build_model(scenario.model, info.input_shape, info.num_classes))
    slices = {}
    for pid in range(n):
        data = load_client_data(scenario.data, scenario.seed, pid)
        slices[pid] = [data.x_train, data.y_train.astype(np.int64)]
    train = FederatedDataset.from_slices(slices, get_user_sampler("minimize_reuse", list(range(n))))
    x_test, y_test = load_central_test(scenario.data, scenario.seed)
    central = Dataset([x_test, y_test.astype(np.int64)])
    model = PyTorchModel(
        model=module,
        local_optimizer_create=functools.partial(
            torch.optim.SGD, momentum=tc.momentum, weight_decay=tc.weight_decay
        ),
        central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
    )
    accuracy: list[float] = []

    class KeepAccuracy(CentralEvaluationCallback):  # pfl's central evaluation, accuracy kept
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            stop, metrics = super().after_central_iteration(
                aggregate_metrics, model, central_iteration=central_iteration
            )
            for name, value in metrics:
                if "accuracy" in str(name):
                    accuracy.append(float(value.overall_value))
            return stop, metrics

    evaluation = KeepAccuracy(
        central, model_eval_params=NNEvalHyperParams(local_batch_size=None), frequency=1
    )
    t0, c0 = time.perf_counter(), time.process_time()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=rounds,
            evaluation_frequency=1,
            train_cohort_size=n,
            val_cohort_size=0,
        ),
        backend=SimulatedBackend(training_data=train, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=tc.epochs,
            local_learning_rate=tc.lr,
            local_batch_size=tc.batch_size,
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=None),
        callbacks=[evaluation],
        send_metrics_to_platform=False,
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, module.train_steps, accuracy[-1] if accuracy else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--samples-per-client", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    overrides = args.overrides or ["train.batch_size=16"]
    try:
        import pfl
    except ImportError:
        sys.exit("pfl is not installed: pip install -e '.[bench]' (pfl==0.6.0)")
    torch.set_num_threads(1)
    cfg = SimpleNamespace(
        quickstart=False,
        model="mlp",
        samples_per_client=args.samples_per_client,
        rounds=args.rounds,
        overrides=overrides,
    )
    scenario = scenario_for(cfg, args.clients, "packed")
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, pfl {pfl.__version__}, 1 "
        f"torch thread; {args.clients} clients x {args.rounds} rounds, mnist1d "
        f"{scenario.model.name}, {args.samples_per_client} samples/client, batch "
        f"{scenario.train.batch_size}, {scenario.train.epochs} epoch(s)"
    )
    for pid in range(args.clients):  # split and cached once, outside every timing
        load_client_data(scenario.data, scenario.seed, pid)
    expected = args.rounds * sum(
        scenario.train.epochs
        * math.ceil(
            len(load_client_data(scenario.data, scenario.seed, p).x_train)
            / scenario.train.batch_size
        )
        for p in range(args.clients)
    )

    run_pfl(scenario, 1)  # warm-up: pfl's imports and first calls
    pfl_s, pfl_cpu, pfl_steps, pfl_acc = run_pfl(scenario, args.rounds)

    with tempfile.TemporaryDirectory() as tmp:
        timed_run(scenario.model_copy(update={"num_rounds": 1}), Path(tmp) / "warmup")
        _, packed_s, packed_cpu, packed_acc = timed_run(scenario, Path(tmp) / "packed")
        rows = load_run(Path(tmp) / "packed" / f"packed-{args.clients}").clients
        packed_steps = int(sum(row.get("num_steps", 0) for row in rows))

    t0, c0 = time.perf_counter(), time.process_time()
    bare_acc = bare_fedavg(scenario)
    bare_s, bare_cpu = time.perf_counter() - t0, time.process_time() - c0

    for name, wall, cpu, acc, steps in (
        ("bare PyTorch loop", bare_s, bare_cpu, bare_acc, None),
        ("pfl 0.6.0", pfl_s, pfl_cpu, pfl_acc, pfl_steps),
        ("fedge packed", packed_s, packed_cpu, packed_acc, packed_steps),
    ):
        counted = f"   {steps} local steps" if steps is not None else ""
        print(f"{name:<18}: {wall:7.2f} s  cpu {cpu:7.2f} s   acc {acc:.4f}{counted}")
    if not pfl_steps == packed_steps == expected:
        sys.exit(
            f"local steps differ: pfl {pfl_steps}, fedge packed {packed_steps}, expected {expected}"
        )
    print(f"local steps: both {packed_steps} (= {expected} expected)")
    print(f"pfl / bare: {pfl_s / bare_s:.2f}x")
    print(f"pfl / packed (CPU seconds; steadier on a shared machine): {pfl_cpu / packed_cpu:.2f}x")
    print(f"pfl / packed: {pfl_s / packed_s:.2f}x")


if __name__ == "__main__":
    main()
