"""The packed engine on each shipped scenario family: time per round against the in-process
engine, and how many client updates it still trained one at a time, measured in one run.

    python benchmarks/packed_families.py                       # 200 clients, 3 rounds
    python benchmarks/packed_families.py --clients 50 --rounds 2 --families fedld hetero_gpus

Each family is a shipped scenario with ``data.num_clients`` set to ``--clients`` (mnist1d ones get
``--samples-per-client`` samples per client; ``data.min_partition_size = 2``, as 200 clients of a
Dirichlet(0.1) split cannot all hold 10 examples) and ``num_rounds = --rounds``; the clustered family
also gets ``algorithm.warmup_rounds = 1`` so that its rounds after the first train cluster models.
Before timing, one tiny run of each engine pays the one-time imports and every client's data split
is loaded (and cached). Both engines run the same scenario in this process; the time per round is the mean of the
ServerApp's per-round wall time (``metrics.jsonl``'s ``wall_time_s``) over rounds 2..R (round 1
pays first-call costs), and the CPU seconds of this process in the whole round loop (every round,
one torch thread: on a shared machine the steadier measure) and in rounds 2..R alone. Printed per family: both times, ``inprocess / packed: <ratio>x``, the
packed report's packed/sequential update counts (and why some were sequential), the share of the
packed run's round time spent in packed training (the rest is the server's and the ClientApp's
work: broadcast, validation, aggregation, clustering), and whether the per-round central
accuracies agree within 1e-3; for a family whose clients evaluate (clustered: the last round, with
personalization's fine-tuning), the packed evaluations, their share of the packed rounds and
whether the per-round client accuracies (``local_accuracy``, ``personalized_accuracy``) agree
within 1e-3.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engines import _ROUNDS  # noqa: E402  (same folder; importing it times the round loop)

from clients.data import load_client_data  # noqa: E402
from fedge.engines import run_engine  # noqa: E402
from scenarios.config import load_scenario  # noqa: E402
from scenarios.results import RunWriter, load_run  # noqa: E402

# This process's CPU seconds when each round's record is written (round 0 first): rounds 2..R's CPU
# seconds leave out round 1, which pays first calls and, in the clustered family, the clustering
# and its dendrogram plot.
_ROUND_CPU: list[float] = []
_log_round = RunWriter.log_round


def _stamped_log_round(self, record):
    _ROUND_CPU.append(time.process_time())
    return _log_round(self, record)


RunWriter.log_round = _stamped_log_round

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"

# family -> (shipped scenario, extra overrides)
FAMILIES: dict[str, tuple[str, list[str]]] = {
    "fedld": ("fedld_mnist1d_dir01.toml", []),
    "fedlaw": ("fedlaw_mnist1d_dir01.toml", []),
    "clustered": ("clustered_dir01.toml", ["algorithm.warmup_rounds=1"]),
    "hetero_gpus": ("hetero_gpus.toml", []),
    "edge_mixed": ("edge_mixed.toml", []),
    # the same federation with forward-forward clients (Adam) on the ff_mlp instead of tpSGD ones
    "edge_mixed_ff": ("edge_mixed.toml", ["model.name=ff_mlp"]),
    "fedavg_attack": ("quickstart.toml", ["attack.kind=sign_flip"]),
}
REPORT = re.compile(
    r"fedge: packed engine: (\d+) client updates packed \((\d+) sequential(.*?)\), ([\d.]+) s of"
)
EVAL_REPORT = re.compile(
    r"; (\d+) client evaluations packed \((\d+) through the ClientApp(.*?)\), ([\d.]+) s"
)
# Client evaluation's per-round aggregates (metrics.jsonl), compared between the engines.
CLIENT_EVAL_KEYS = ("local_accuracy", "personalized_accuracy")


def scenario_for(family: str, engine: str, args: argparse.Namespace):
    toml, extra = FAMILIES[family]
    overrides = [
        f"engine.name={engine}",
        f"data.num_clients={args.clients}",
        f"num_rounds={args.rounds}",
        "edge.export_onnx=false",
        # 200 clients of a Dirichlet(0.1) split (or of digits' 1,437 examples) cannot all hold
        # the default 10 examples
        "data.min_partition_size=2",
        *extra,
    ]
    if family == "fedavg_attack":  # a tenth of the clients attack
        overrides.append(f"attack.clients={list(range(0, args.clients, 10))}")
    if family == "edge_mixed_ff":  # the second half of the clients train forward-forward
        overrides.append(
            f'edge.trainers={{"{args.clients // 2}-{args.clients - 1}" = "forward_forward"}}'
        )
    scenario = load_scenario(SCENARIOS / toml, overrides)
    if scenario.data.dataset == "mnist1d":
        scenario = load_scenario(
            SCENARIOS / toml,
            [*overrides, f"data.num_samples={args.samples_per_client * args.clients}"],
        )
    return scenario


def run(family: str, engine: str, args: argparse.Namespace, tmp: Path):
    """(rounds of metrics.jsonl, the round loop's CPU seconds, rounds 2..R's CPU seconds, the packed
    engine's report matches)."""
    scenario = scenario_for(family, engine, args)
    out = io.StringIO()
    _ROUNDS.clear()
    _ROUND_CPU.clear()
    with contextlib.redirect_stdout(out):
        run_engine(scenario, tmp / f"{family}-{engine}", show_progress=False)
    report = next((m for m in REPORT.finditer(out.getvalue())), None)
    evaluated = next((m for m in EVAL_REPORT.finditer(out.getvalue())), None)
    later = _ROUND_CPU[-1] - _ROUND_CPU[min(1, len(_ROUND_CPU) - 1)]
    return load_run(tmp / f"{family}-{engine}").rounds, _ROUNDS[-1][1], later, (report, evaluated)


def per_round(rounds: list[dict]) -> float:
    times = [r["wall_time_s"] for r in rounds if r["round"] >= 2]
    return statistics.mean(times or [r["wall_time_s"] for r in rounds if r["round"] >= 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples-per-client", type=int, default=100)
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"# {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
        f"{args.clients} clients, {args.rounds} rounds (time per round: mean of rounds 2..R)"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        warm = argparse.Namespace(clients=4, rounds=1, samples_per_client=50)
        for engine in ("inprocess", "packed"):  # one-time imports and first calls
            run("fedavg_attack", engine, warm, tmp / "warm")
        for family in args.families:
            scenario = scenario_for(family, "inprocess", args)
            for pid in range(scenario.data.num_clients):  # the split is made (and cached) here
                load_client_data(scenario.data, scenario.seed, pid)
            seq_rounds, seq_cpu, seq_later, _ = run(family, "inprocess", args, tmp)
            packed = run(family, "packed", args, tmp)
            packed_rounds, packed_cpu, packed_later, (report, evaluated) = packed
            seq_t, packed_t = per_round(seq_rounds), per_round(packed_rounds)
            acc = [
                (s.get("central_accuracy"), p.get("central_accuracy"))
                for s, p in zip(seq_rounds, packed_rounds, strict=True)
            ]
            same = all(s is None or abs(s - p) <= 1e-3 for s, p in acc)
            client_acc = [
                (s[k], p.get(k))
                for s, p in zip(seq_rounds, packed_rounds, strict=True)
                for k in CLIENT_EVAL_KEYS
                if s.get(k) is not None
            ]
            client_same = all(p is not None and abs(s - p) <= 1e-3 for s, p in client_acc)
            packed_n, seq_n, why, train_s = (
                (int(report[1]), int(report[2]), report[3], float(report[4]))
                if report
                else (0, -1, "", float("nan"))
            )
            rounds_s = sum(r["wall_time_s"] for r in packed_rounds)
            eval_line = (
                f"  evaluations: {evaluated[1]} packed, {evaluated[2]} through the ClientApp"
                f"{evaluated[3]}, packed evaluation {float(evaluated[4]) / rounds_s:.0%} of the "
                f"packed rounds; client accuracies within 1e-3: {client_same}"
                if evaluated
                else ""
            )
            print(
                f"{family:14s} in-process {seq_t:7.3f} s/round  packed {packed_t:7.3f} s/round  "
                f"updates: {packed_n} packed, {seq_n} sequential{why}  "
                f"packed training {train_s / rounds_s:.0%} of the packed rounds  "
                f"accuracy within 1e-3: {same}{eval_line}"
            )
            later = max(args.rounds - 1, 1)
            print(
                f"{family:14s} CPU seconds per round (all rounds): in-process "
                f"{seq_cpu / args.rounds:7.3f}  packed {packed_cpu / args.rounds:7.3f}  "
                f"(rounds 2..R: in-process {seq_later / later:7.3f}  packed "
                f"{packed_later / later:7.3f})"
            )
            print(f"{family}: inprocess / packed: {seq_t / packed_t:.2f}x")
            print(f"{family}: inprocess / packed (CPU seconds): {seq_cpu / packed_cpu:.2f}x")
            print(
                f"{family}: inprocess / packed (CPU seconds, rounds 2..R): "
                f"{seq_later / packed_later:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
