"""Engines side by side: a bare PyTorch FedAvg loop vs the in-process engine vs the packed engine
(vs Ray with ``--ray``), on the same clients, data and model, measured in one run.

    python benchmarks/engines.py --clients 10 200 1000            # mnist1d MLP, 1 local epoch
    python benchmarks/engines.py --clients 500 --model cnn1d
    python benchmarks/engines.py --clients 10 --ray
    python benchmarks/engines.py --quickstart [--ray]                 # the quickstart as shipped
    python benchmarks/engines.py --pool 10000 --per-round 100     # peak RSS of a large pool

Each client holds ``--samples-per-client`` mnist1d samples (80% train); 1 local epoch, batch 32,
``--rounds`` rounds. Before timing, every client's data split is loaded (the bare loop needs it
too), one tiny run of each engine pays the one-time imports, and one round of the very scenario
measured warms each in-process engine up (first-call costs of kernels at that size). Two times
per engine:

- ``run``: ``run_engine`` end to end (rounds + writing the results folder and its plot);
- ``rounds``: the ServerApp's round loop alone (broadcast, training, reply validation,
  aggregation, central evaluation), wall and CPU seconds of this process.

Ratios are against the bare loop's time (which also includes its per-round central evaluation).
On a shared machine the CPU-second ratios are the steadier ones (both sides use one thread).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_overhead import bare_fedavg  # noqa: E402  (same folder)

import server.app as server_app  # noqa: E402
from clients.data import load_client_data  # noqa: E402
from fedge.engines import run_engine  # noqa: E402
from scenarios.config import load_scenario  # noqa: E402
from scenarios.results import load_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_ROUNDS: list[tuple[float, float]] = []  # (wall, CPU) seconds of each run's round loop
_run_rounds = server_app.run_rounds


def _timed_run_rounds(*args, **kwargs):
    """The ServerApp's round loop, timed: wall and this process's CPU seconds (on a shared
    machine CPU seconds are the steadier measure; Ray's clients run in other processes)."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        return _run_rounds(*args, **kwargs)
    finally:
        _ROUNDS.append((time.perf_counter() - t0, time.process_time() - c0))


server_app.run_rounds = _timed_run_rounds
QUICKSTART = ROOT / "scenarios" / "quickstart.toml"


def scenario_for(args: argparse.Namespace, clients: int, engine: str, extra: list[str] = ()):
    if args.quickstart:  # the quickstart as shipped (cnn1d, 10 clients, 10 rounds, 2 epochs)
        return load_scenario(QUICKSTART, [f"engine.name={engine}", *args.overrides, *extra])
    return load_scenario(
        QUICKSTART,
        [
            f"engine.name={engine}",
            f"data.num_clients={clients}",
            f"data.num_samples={args.samples_per_client * clients}",
            f"model.name={args.model}",
            "train.epochs=1",
            f"num_rounds={args.rounds}",
            # Plain FedAvg, what the bare loop (and pfl) compute: fedge's default norm bound and
            # weight cap exclude or cap ~2 % of these clients' replies a round at 500 clients,
            # and the default direction check takes a median over the round's stack.
            "robustness.relative_norm_bound=0",
            "robustness.max_weight_share=1.0",
            "robustness.direction_check=false",
            *args.overrides,
            *extra,
        ],
    )


def timed_run(scenario, tmp: Path) -> tuple[float, float, float | None, float]:
    """(end-to-end seconds, rounds seconds, rounds CPU seconds, final accuracy) of one run."""
    run_dir = tmp / f"{scenario.engine.name}-{scenario.data.num_clients}"
    _ROUNDS.clear()
    t0 = time.perf_counter()
    summary = run_engine(scenario, run_dir, show_progress=False)
    total = time.perf_counter() - t0
    if _ROUNDS:  # in this process (in-process, packed)
        rounds, cpu = _ROUNDS[-1]
    else:  # Ray: the ServerApp ran elsewhere; its recorded round times
        rounds = sum(r.get("wall_time_s") or 0.0 for r in load_run(run_dir).rounds)
        cpu = None
    return total, rounds, cpu, float(summary["final_accuracy"])


def compare(args: argparse.Namespace) -> None:
    engines = args.engines + (["ray"] if args.ray else [])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for engine in args.engines:  # one-time imports (torch.func, peft, matplotlib, ...)
            run_engine(
                load_scenario(
                    QUICKSTART,
                    [
                        f"engine.name={engine}",
                        "data.num_clients=2",
                        "num_rounds=1",
                        "data.num_samples=400",
                        f"model.name={args.model}",
                    ],
                ),
                tmp / f"warmup-{engine}",
                show_progress=False,
            )
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        for clients in [10] if args.quickstart else args.clients:
            base = scenario_for(args, clients, "inprocess")
            t0 = time.perf_counter()
            for i in range(clients):
                load_client_data(base.data, base.seed, i)
            data_s = time.perf_counter() - t0
            t0, c0 = time.perf_counter(), time.process_time()
            bare_acc = bare_fedavg(base)
            bare_s, bare_cpu = time.perf_counter() - t0, time.process_time() - c0
            print(
                f"\n== {base.name}: {clients} clients x {base.num_rounds} rounds, "
                f"{base.data.dataset} {base.model.name}, {base.data.num_samples} samples, "
                f"{base.train.epochs} epoch(s), batch {base.train.batch_size}, "
                f"{base.engine.client_threads} torch thread(s) "
                f"(data split once: {data_s:.1f} s, excluded)",
                flush=True,
            )
            print(
                f"bare PyTorch loop : {bare_s:8.2f} s run                    "
                f"acc {bare_acc:.4f}   cpu {bare_cpu:6.2f} s"
            )
            runs = [(engine, []) for engine in engines]
            if args.pack_threads > 1:  # the pack on every core (the bare loop is best on one)
                runs.append(("packed", [f"engine.client_threads={args.pack_threads}"]))
            for engine, extra in runs:
                if engine == "ray" and clients > args.ray_max_clients:
                    continue
                scenario = scenario_for(args, clients, engine, extra)
                label = engine + (f" x{args.pack_threads} thr" if extra else "")
                folder = tmp / label.replace(" ", "-")
                if engine != "ray":  # warm-up: one round at this very size (first-call costs)
                    timed_run(scenario.model_copy(update={"num_rounds": 1}), folder / "warmup")
                total, rounds, cpu, acc = timed_run(scenario, folder)
                cpu_part = (
                    f"cpu {cpu:6.2f} s   rounds/bare cpu {cpu / bare_cpu:5.2f}x"
                    if cpu is not None
                    else "cpu (other processes)"
                )
                print(
                    f"{label:<18}: {total:8.2f} s run, {rounds:7.2f} s rounds   acc {acc:.4f}   "
                    f"{cpu_part}   rounds/bare {rounds / bare_s:5.2f}x, run/bare "
                    f"{total / bare_s:5.2f}x",
                    flush=True,
                )
                if engine == "packed" and not extra:  # whole rounds: broadcast, training,
                    # validation, aggregation; one thread like the bare loop
                    print(f"packed speedup vs bare: {bare_s / rounds:.2f}x")
                    print(f"packed speedup vs bare (CPU seconds): {bare_cpu / cpu:.2f}x")
                elif engine == "packed":
                    print(
                        f"packed speedup vs bare, pack on {args.pack_threads} threads, bare on 1: "
                        f"{bare_s / rounds:.2f}x"
                    )


def pool_child(engine: str, clients: int, per_round: int, rounds: int) -> None:
    scenario = load_scenario(
        QUICKSTART,
        [
            f"engine.name={engine}",
            f"data.num_clients={clients}",
            f"data.num_samples={20 * clients}",
            "data.partitioner=iid",
            "model.name=mlp",
            "train.epochs=1",
            f"num_rounds={rounds}",
            f"federation.fraction_train={per_round / clients}",
            f"federation.min_train_clients={per_round}",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_engine(scenario, Path(tmp) / "run", show_progress=False)
        seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": engine, "peak_rss_mib": rss, "seconds": seconds}))


def pool(args: argparse.Namespace) -> None:
    print(
        f"\n== pool of {args.pool} clients, {args.per_round} per round, {args.rounds} rounds, "
        "mnist1d MLP, 20 samples/client (fresh process per engine)"
    )
    for engine in ("inprocess", "packed"):
        out = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--pool-child",
                    engine,
                    str(args.pool),
                    str(args.per_round),
                    str(args.rounds),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        res = json.loads(out)
        print(f"{engine:<10}: peak RSS {res['peak_rss_mib']:.0f} MiB, {res['seconds']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 200])
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn1d"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples-per-client", type=int, default=200)
    parser.add_argument("--engines", nargs="+", default=["inprocess", "packed"])
    parser.add_argument("--quickstart", action="store_true", help="scenarios/quickstart.toml as is")
    parser.add_argument("--ray", action="store_true", help="also the Ray engine (slow)")
    parser.add_argument("--ray-max-clients", type=int, default=10)
    parser.add_argument(
        "--pack-threads", type=int, default=0, help="also the packed engine on this many threads"
    )
    parser.add_argument("--pool", type=int, default=0, help="peak RSS of a pool this large")
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--pool-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    if args.pool_child:
        engine, clients, per_round, rounds = args.pool_child
        pool_child(engine, int(clients), int(per_round), int(rounds))
        return
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads available, torch {torch.__version__}"
    )
    if args.pool:
        pool(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
