"""The federated round loop and what it records.

fedge drives a Flower ``Strategy`` through its four public methods (configure/aggregate for train and
evaluate) exactly as ``Strategy.start`` does, but owns the loop so that every round can be recorded
(bytes, per-client metrics, wall time) and, later, checkpointed and resumed. Any
``flwr.serverapp.strategy.Strategy`` works here, including Flower's DP wrappers.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clients.arrays import record_bytes, records_of, view
from clients.identity import reply_identity, reply_partition_id
from scenarios.results import RunWriter
from server.plugins import RoundPlugin

CentralEval = Callable[[int, ArrayRecord], MetricRecord | None]


class NotEnoughNodesError(RuntimeError):
    """Fewer nodes connected than the scenario needs, within ``federation.wait_for_nodes_s``."""


def wait_for_nodes(grid: Grid, needed: int, timeout_s: float, poll_s: float = 0.5) -> int:
    """Wait until ``needed`` nodes are connected; return how many are.

    Flower's strategies sample only once ``min_available_nodes`` (= ``data.num_clients``) nodes are
    connected and otherwise poll forever; this stops the run with a message saying what to change.
    """
    deadline = time.monotonic() + timeout_s
    logged: tuple[int, float] = (-1, 0.0)  # (count, when): log changes, and every 10 s
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= needed:
            return connected
        if time.monotonic() >= deadline:
            raise NotEnoughNodesError(
                f"only {connected} of the {needed} nodes the scenario needs (data.num_clients="
                f"{needed}) connected within federation.wait_for_nodes_s={timeout_s:g}s. Start "
                f"{needed} SuperNodes (`fedge deploy supernode ... --num-partitions {needed}`); "
                f"for `flwr run .` give the federation {needed} SuperNodes (`flwr run . "
                f"--federation-config num-supernodes={needed}`, or num-supernodes in the "
                "connection of $FLWR_HOME/config.toml); or lower data.num_clients"
            )
        if connected != logged[0] or time.monotonic() - logged[1] >= 10:
            log(INFO, "fedge: %d of %d nodes connected; waiting", connected, needed)
            logged = (connected, time.monotonic())
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def arrays_finite(arrays: ArrayRecord) -> bool:
    """True when every floating-point value in ``arrays`` is finite."""
    for arr in arrays.values():
        values = view(arr)
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            return False
    return True


def message_bytes(msg: Message) -> int:
    """Serialized size of the arrays a message carries (what crosses the network for the model)."""
    if msg.has_error():
        return 0
    return sum(record_bytes(rec) for rec in msg.content.values() if isinstance(rec, ArrayRecord))


def _client_metrics(msg: Message) -> dict[str, float]:
    out: dict[str, float] = {}
    for rec in records_of(msg.content, MetricRecord).values():
        for k, v in rec.items():
            if isinstance(v, int | float):
                out[k.replace("-", "_")] = v
    return out


def sort_replies(replies: Iterable[Message]) -> list[Message]:
    """Replies in a fixed order (partition id, else node id): aggregation sums floats in this order,
    so engines that deliver replies in different orders still give bit-identical models."""

    def key(msg: Message) -> tuple[int, int]:
        if msg.has_error():
            return (1, msg.metadata.src_node_id)
        pid = reply_partition_id(msg)
        return (0, pid) if pid is not None else (0, msg.metadata.src_node_id)

    return sorted(replies, key=key)


@dataclass
class RoundProgress:
    """One line (or a live bar on a terminal) per round with the current metrics."""

    num_rounds: int
    _bar: object = field(default=None, init=False)
    _task: object = field(default=None, init=False)

    def __post_init__(self) -> None:
        if sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self._task = self._bar.add_task("rounds", total=self.num_rounds, status="")
            self._bar.start()

    def update(self, server_round: int, record: dict[str, float | int | None]) -> None:
        parts = []
        for key, label in (
            ("central_accuracy", "acc"),
            ("central_loss", "loss"),
            ("train_loss", "train_loss"),
        ):
            value = record.get(key)
            if isinstance(value, float) and not math.isnan(value):
                parts.append(f"{label}={value:.4f}")
        status = " ".join(parts)
        if self._bar is not None:
            self._bar.update(self._task, completed=server_round, status=status)
        else:
            print(f"round {server_round}/{self.num_rounds} {status}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    num_rounds: int,
    writer: RunWriter,
    central_eval: CentralEval,
    timeout: float,
    show_progress: bool = True,
    plugins: list[RoundPlugin] | None = None,
    evaluate_config: Callable[[int], ConfigRecord | None] | None = None,
    start_round: int = 1,
    on_round_end: Callable[[int, ArrayRecord], None] | None = None,
    wall_time_before: float = 0.0,
) -> ArrayRecord:
    """Run rounds ``start_round..num_rounds`` of ``strategy``; write one record per round; return
    the final arrays. ``on_round_end(round, arrays)`` runs after each round is logged (checkpoints).
    A round whose replies are all filtered out, or whose aggregate is not finite, keeps the arrays.

    ``evaluate_config(round)`` gives the config sent with that round's evaluate instructions (e.g.
    personalization's fine-tuning settings); None from it skips client evaluation that round.
    ``wall_time_before``: seconds a resumed run already spent (``cumulative_wall_time_s`` goes on
    from there rather than restarting at 0).
    """
    log(INFO, "fedge: starting %s for %d rounds", type(strategy).__name__, num_rounds)
    # Everything built so far (torch, Flower, the data, the model) lives for the whole run. Frozen,
    # the cyclic garbage collector's full passes skip it: they used to land in random places of
    # every round (e.g. ~0.35 ms per client update with 500 clients in-process).
    gc.freeze()
    progress = RoundProgress(num_rounds) if show_progress else None
    start = time.perf_counter() - wall_time_before
    if start_round == 1:
        record = _central(central_eval, 0, arrays)
        record.update(round=0, wall_time_s=0.0, cumulative_wall_time_s=0.0)
        writer.log_round(record)
    try:
        for server_round in range(start_round, num_rounds + 1):
            t0 = time.perf_counter()
            record = {"round": server_round}

            train_config = ConfigRecord(
                {k: v for p in plugins or [] for k, v in p.train_config(server_round).items()}
            )
            instructions = list(strategy.configure_train(server_round, arrays, train_config, grid))
            for plugin in plugins or []:
                plugin.observe_train_instructions(server_round, instructions)
            replies = sort_replies(grid.send_and_receive(instructions, timeout=timeout))
            # Each reply's size, once: the round's traffic and its clients.jsonl row (plugins may
            # drop replies or rename their records, never change their arrays).
            sizes = {id(r): (r, message_bytes(r)) for r in replies}
            record.update(_round_traffic(instructions, replies, sizes))
            for plugin in plugins or []:
                replies, plugin_metrics = plugin.filter_train_replies(server_round, replies)
                record.update(plugin_metrics)
            new_arrays, train_metrics = (
                strategy.aggregate_train(server_round, replies) if replies else (None, None)
            )
            record["aggregated"] = int(new_arrays is not None and arrays_finite(new_arrays))
            if record["aggregated"]:
                arrays = new_arrays
            elif new_arrays is not None:
                log(WARNING, "round %d: aggregate is not finite; keeping the model", server_round)
                record["aggregate_nonfinite"] = 1
            record.update(_flat(train_metrics))
            rows = {
                r.metadata.src_node_id: _client_row(r, sizes) for r in replies if not r.has_error()
            }

            eval_config = (
                ConfigRecord() if evaluate_config is None else evaluate_config(server_round)
            )
            eval_instructions = (
                []
                if eval_config is None
                else list(strategy.configure_evaluate(server_round, arrays, eval_config, grid))
            )
            if eval_instructions:
                eval_replies = sort_replies(
                    grid.send_and_receive(eval_instructions, timeout=timeout)
                )
                record.update(_flat(strategy.aggregate_evaluate(server_round, eval_replies)))
                for r in eval_replies:
                    if not r.has_error():
                        row = rows.setdefault(r.metadata.src_node_id, _identity_row(r))
                        row.update(_client_metrics(r))

            record.update(_central(central_eval, server_round, arrays))
            record["wall_time_s"] = time.perf_counter() - t0
            record["cumulative_wall_time_s"] = time.perf_counter() - start
            writer.log_round(record)
            writer.log_clients(server_round, list(rows.values()))
            if on_round_end is not None:
                on_round_end(server_round, arrays)
            if progress:
                progress.update(server_round, record)
    except BaseException:
        writer.close(None)  # observers (experiment trackers) record that the run broke off
        raise
    finally:
        gc.unfreeze()  # a process running several runs (tests, notebooks) frees them as usual
        if progress:
            progress.close()
    return arrays


def _central(
    central_eval: CentralEval, server_round: int, arrays: ArrayRecord
) -> dict[str, float | int | None]:
    return _flat(central_eval(server_round, arrays))


def _flat(metrics: MetricRecord | None) -> dict[str, float | int | None]:
    if metrics is None:
        return {}
    return {k.replace("-", "_"): v for k, v in metrics.items() if isinstance(v, int | float)}


def _identity_row(reply: Message) -> dict[str, float | int | str | bool]:
    """The reply's identifiers (partition id, trainer, device profile ...) for clients.jsonl, and
    the node that sent it (any client, stock ones too: a bad reply can be traced to its sender)."""
    row = {k.replace("-", "_"): v for k, v in reply_identity(reply).items()}
    row["node_id"] = reply.metadata.src_node_id
    return row


def _client_row(
    reply: Message, sizes: dict[int, tuple[Message, int]]
) -> dict[str, float | int | str | bool]:
    """The reply's clients.jsonl row; ``sizes``: id(reply) -> (reply, message_bytes) known so far."""
    row = {**_identity_row(reply), **_client_metrics(reply)}
    known = sizes.get(id(reply))
    row["bytes_up"] = known[1] if known is not None and known[0] is reply else message_bytes(reply)
    return row


def _round_traffic(
    instructions: list[Message], replies: list[Message], sizes: dict[int, tuple[Message, int]]
) -> dict[str, int]:
    """The round's message counts and bytes; ``sizes``: id(reply) -> (reply, message_bytes)."""
    failures = sum(r.has_error() for r in replies)
    sent: dict[int, int] = {}  # strategies send one RecordDict to many nodes: size it once
    for m in instructions:
        if id(m.content) not in sent:
            sent[id(m.content)] = message_bytes(m)
    return {
        "num_sampled": len(instructions),
        "num_replies": len(replies) - failures,
        "num_failures": failures + len(instructions) - len(replies),
        "bytes_down": sum(sent[id(m.content)] for m in instructions),
        "bytes_up": sum(sizes[id(r)][1] for r in replies),
    }
