"""Where a round's time goes, per engine, and how fast packed training could be on this CPU.

    python benchmarks/engine_breakdown.py                      # the issue's anchor: 500 clients
    python benchmarks/engine_breakdown.py --clients 200 --samples-per-client 200 --set train.batch_size=32

Part 1 runs the in-process and the packed engine on the same scenario (mnist1d MLP, 1 local
epoch, 3 rounds, one warm-up round first) with timers around the round loop's parts: local
training, the rest of a client update (ClientApp/PackedTrainer: loading the model, building the
reply), reply validation, the strategy's ``aggregate_train`` (fedge's FedAvg: Flower's weighted mean
over the stacked replies, ``server/stacked_mean.py``), central evaluation, and the rest (broadcast,
round records). It prints seconds per round and microseconds per client update.

Part 2 is what Flower itself costs per client update (no fedge code in the way), the floor of
any engine that sends every client its own message and aggregates with Flower's strategy.

Part 3 is the floor of packed training alone: the same 500 clients' steps (the pack's prefix
sizes) as one ``vmap(grad(functional_call))`` per step (what ``clients/packed.py`` does) and as a
hand-written batched MLP (``torch.baddbmm`` forward, autograd backward, SGD), both against the
bare loop's training alone. The hand-written one only exists here, as a bound: it is not a
trainer fedge uses (it knows one model's layers).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp.strategy import FedAvg
from torch.nn import functional as F

import clients.fedavg as client_fedavg
import clients.training as training
import fedge.engines as engines
import fedge.engines.packed as packed_engine
import server.app as server_app
import server.loop as loop
from clients.data import dataset_info, load_client_data
from clients.models import build_model
from fedge.engines import run_engine
from scenarios.config import load_scenario
from server.stacked_mean import StackedMean
from server.validation import ReplyValidator

sys.path.insert(0, str(Path(__file__).parent))
from engine_overhead import bare_local_training  # noqa: E402  (same folder)

ROOT = Path(__file__).resolve().parents[1]
SECONDS: Counter[str] = Counter()
CALLS: Counter[str] = Counter()


def timed(owner: object, name: str, part: str) -> None:
    """Wrap ``owner.name`` so its wall seconds add up under ``part``."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SECONDS[part] += time.perf_counter() - t0
            CALLS[part] += 1

    setattr(owner, name, wrapper)


def instrument() -> None:
    timed(server_app, "run_rounds", "rounds")
    timed(training, "local_sgd", "local training")
    client_fedavg.local_sgd = training.local_sgd  # the FedAvg trainer's own reference
    timed(packed_engine, "train_packed", "packed training")
    timed(packed_engine.PackedTrainer, "__call__", "packed call")
    timed(engines.InProcessGrid, "_deliver", "client app call")
    timed(ReplyValidator, "filter_train_replies", "reply validation")
    timed(FedAvg, "aggregate_train", "aggregation")  # Flower's (robust rules, fallbacks)
    timed(StackedMean, "aggregate_train", "aggregation")  # fedge's FedAvg/FedProx
    timed(loop, "_central", "central evaluation")


def scenario_for(args: argparse.Namespace, engine: str, rounds: int):
    n = args.clients
    return load_scenario(
        ROOT / "scenarios" / "quickstart.toml",
        [
            f"engine.name={engine}",
            f"data.num_clients={n}",
            f"data.num_samples={args.samples_per_client * n}",
            "model.name=mlp",
            "train.epochs=1",
            f"num_rounds={rounds}",
            *args.overrides,
        ],
    )


def breakdown(args: argparse.Namespace) -> None:
    base = scenario_for(args, "inprocess", args.rounds)
    for i in range(args.clients):
        load_client_data(base.data, base.seed, i)
    updates = args.clients * args.rounds
    print(
        f"== {args.clients} clients x {args.rounds} rounds, mnist1d MLP, batch "
        f"{base.train.batch_size}, 1 thread; seconds per round (microseconds per client update)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("inprocess", "packed"):
            warm_up = scenario_for(args, engine, 1)
            run_engine(warm_up, Path(tmp) / f"warm-{engine}", show_progress=False)
            SECONDS.clear()
            measured = scenario_for(args, engine, args.rounds)
            run_engine(measured, Path(tmp) / engine, show_progress=False)
            s = dict(SECONDS)
            train = s.get("local training", 0.0) + s.get("packed training", 0.0)
            client_rest = (
                s.get("client app call", 0.0) - s.get("local training", 0.0)
                if engine == "inprocess"
                else s.get("packed call", 0.0) - s.get("packed training", 0.0)
            )
            parts = {
                "training": train,
                "rest of the client update": client_rest,
                "reply validation (fedge)": s.get("reply validation", 0.0),
                "aggregation (FedAvg.aggregate_train)": s.get("aggregation", 0.0),
                "central evaluation": s.get("central evaluation", 0.0),
            }
            parts["everything else"] = s["rounds"] - sum(parts.values())
            print(f"-- {engine}: rounds {s['rounds'] / args.rounds:.3f} s per round")
            for name, sec in parts.items():
                print(
                    f"   {name:<34} {sec / args.rounds:7.3f} s  ({sec / updates * 1e6:6.0f} µs/update)"
                )


def floor(args: argparse.Namespace, cores: int) -> None:
    scenario = scenario_for(args, "inprocess", 1)
    tc = scenario.train
    batch = tc.batch_size
    info = dataset_info(scenario.data)
    data = [load_client_data(scenario.data, scenario.seed, i) for i in range(args.clients)]
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def bare() -> None:  # the bare loop's training alone (no averaging, no evaluation)
        for c in data:
            bare_local_training(model, state, c, tc, torch.Generator().manual_seed(1))

    from clients.packed import PackedClient, train_packed
    from clients.training import LocalPlan

    def packed() -> None:
        clients = [PackedClient(c, state, torch.Generator().manual_seed(1)) for c in data]
        for start in range(0, len(clients), scenario.engine.pack_size):
            train_packed(
                model,
                clients[start : start + scenario.engine.pack_size],
                LocalPlan(cfg=tc),
                torch.device("cpu"),
            )

    # The hand-written bound: the same number of clients per step (a prefix of the pack sorted
    # by step count), layer by layer with baddbmm; batches are random rows (no gather cost).
    steps = sorted((math.ceil(len(c.x_train) / batch) for c in data), reverse=True)
    widths = [math.prod(info.input_shape), *scenario.model.hidden, info.num_classes]
    pack = scenario.engine.pack_size

    def bound() -> None:
        for start in range(0, len(steps), pack):
            chunk = steps[start : start + pack]
            k0 = len(chunk)
            ws = [torch.randn(k0, o, i) * 0.1 for i, o in zip(widths[:-1], widths[1:], strict=True)]
            bs = [torch.zeros(k0, 1, o) for o in widths[1:]]
            bufs = [torch.zeros_like(t) for t in ws + bs]
            x_all = torch.randn(k0, chunk[0], batch, widths[0])
            y_all = torch.randint(0, info.num_classes, (k0, chunk[0], batch))
            for s in range(chunk[0]):
                k = sum(1 for n in chunk if n > s)
                params = [t[:k].detach().requires_grad_() for t in ws + bs]
                h = x_all[:k, s]
                for layer in range(len(ws)):
                    h = torch.baddbmm(params[len(ws) + layer], h, params[layer].transpose(1, 2))
                    if layer < len(ws) - 1:
                        h = h.relu()
                loss = F.cross_entropy(h.reshape(-1, widths[-1]), y_all[:k, s].reshape(-1))
                grads = torch.autograd.grad(loss * k, params)
                with torch.no_grad():
                    for t, buf, g in zip(ws + bs, bufs, grads, strict=True):
                        buf[:k].mul_(tc.momentum).add_(g)
                        t[:k].add_(buf[:k], alpha=-tc.lr)

    print(
        f"\n== training alone, {args.clients} clients, 1 epoch, batch {batch} "
        f"({sum(steps)} client steps), best of 3"
    )
    results = {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        for name, fn in (("bare loop", bare), ("packed (vmap)", packed), ("bound (bmm)", bound)):
            if name == "bare loop" and threads > 1:
                continue  # one thread is the bare loop's best here (tiny ops)
            fn()  # warm-up
            best = min(_seconds(fn) for _ in range(3))
            results[(name, threads)] = best
            ratio = results[("bare loop", 1)] / best
            print(
                f"{name:<14} {threads} thread(s): {best:6.3f} s   {best / sum(steps) * 1e6:6.1f} "
                f"µs per client step   {ratio:5.2f}x the bare loop"
            )


def flower_floor(args: argparse.Namespace) -> None:
    """What Flower itself costs per client update, with nothing of fedge's in the way: a ClientApp
    whose train handler returns a ready reply, the Message per node FedAvg builds, and
    ``FedAvg.aggregate_train`` per reply (fedge's encoded arrays: no parsing)."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common import MessageType

    from clients.arrays import record_from_state_dict

    scenario = scenario_for(args, "inprocess", 1)
    info = dataset_info(scenario.data)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    arrays = record_from_state_dict(model.state_dict())
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    app = ClientApp()

    metrics = MetricRecord({"train_loss": 1.0, "num-examples": 64, "num-steps": 4})
    reply = RecordDict({"arrays": record_from_state_dict(model.state_dict()), "metrics": metrics})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(reply, reply_to=msg)  # a ready reply: only Flower's own work is timed

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    n = args.clients

    def build_messages() -> list[Message]:
        out = []
        for i in range(n):
            msg = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=i + 1)
            msg.metadata.__dict__["_message_id"] = str(i)  # what the grid assigns on push
            out.append(msg)
        return out

    messages = build_messages()
    replies = [app(m, context) for m in messages]
    strategy = FedAvg()
    timings = {
        "Message per node (configure_train)": min(_seconds(build_messages) for _ in range(3)),
        "ClientApp call + reply Message": min(
            _seconds(lambda: [app(m, context) for m in messages]) for _ in range(3)
        ),
        "FedAvg.aggregate_train": min(
            _seconds(lambda: strategy.aggregate_train(1, replies)) for _ in range(3)
        ),
    }
    print(f"\n== Flower's own cost per client update ({n} clients, MLP arrays, best of 3)")
    for name, sec in timings.items():
        print(f"{name:<42} {sec / n * 1e6:6.1f} µs")
    print(f"{'total':<42} {sum(timings.values()) / n * 1e6:6.1f} µs")
    from server.fedavg import FedAvg as StackedFedAvg

    stacked = StackedFedAvg()
    sec = min(_seconds(lambda: stacked.aggregate_train(1, replies)) for _ in range(3))
    print(f"{'fedge FedAvg.aggregate_train (same bits)':<42} {sec / n * 1e6:6.1f} µs")


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--samples-per-client", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=["train.batch_size=16"], dest="overrides")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    torch.set_num_threads(1)
    np.random.seed(0)
    torch.manual_seed(0)
    print(
        f"machine: {platform.machine()}, {cores} torch threads available, torch {torch.__version__}"
    )
    instrument()
    breakdown(args)
    flower_floor(args)
    floor(args, cores)


if __name__ == "__main__":
    main()
