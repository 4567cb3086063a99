"""The ``inprocess`` engine: :class:`InProcessGrid`, a ``flwr.serverapp.Grid`` that calls the
ClientApp directly (no Ray, no sockets). Exceptions become Flower error replies, as on a real
SuperNode. ``packed`` is the same grid handing a round's training and evaluate messages to one
batched trainer and evaluator (:mod:`fedge.engines.packed`); everything else still goes through the
ClientApp.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedge.engines.errors import exception_reply
from scenarios.config import Scenario

SERVER_NODE_ID = 1

# messages, node contexts -> {position in messages: (reply, seconds)} for those it answered
BatchTrainer = Callable[[list[Message], dict[int, Context]], dict[int, tuple[Message, float]]]


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one persistent Context per node."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict,
        seed: int = 0,
        run_id: int = 1,
        node_configs: list[dict] | None = None,
        latency_fn: Callable[[Context, Message], float] | None = None,
        batch_trainer: BatchTrainer | None = None,
    ) -> None:
        """``latency_fn(context, reply)`` adds simulated seconds to a node's measured reply time;
        replies that arrive after ``send_and_receive``'s timeout are dropped, as on a real grid.
        ``batch_trainer(messages, contexts)`` (the packed engine) may answer some of the pushed
        messages at once: {position: (reply, seconds)}; the ClientApp answers the rest."""
        rng = random.Random(seed)
        ids: list[int] = []
        while len(ids) < num_nodes:  # random 63-bit ids like a SuperLink's, but reproducible
            nid = rng.getrandbits(63)
            if nid not in ids and nid != SERVER_NODE_ID:
                ids.append(nid)
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config)
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config={
                    "partition-id": i,
                    "num-partitions": num_nodes,
                    **((node_configs or [{}] * num_nodes)[i]),
                },
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nid in enumerate(ids)
        }
        self.latency_fn = latency_fn
        self.batch_trainer = batch_trainer
        self._replies: dict[str, tuple[Message, float]] = {}  # message id -> (reply, seconds)

    # Grid API -------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = [self._assign_id(msg) for msg in messages]
        batched = self.batch_trainer(messages, self.contexts) if self.batch_trainer else {}
        for pos, (msg_id, msg) in enumerate(zip(ids, messages, strict=True)):
            if pos in batched:
                self._store(msg_id, msg, *batched[pos])
                continue
            t0 = time.perf_counter()
            reply = self._deliver(msg)
            self._store(msg_id, msg, reply, time.perf_counter() - t0)
        return ids

    @staticmethod
    def _assign_id(msg: Message) -> str:
        msg_id = str(uuid.uuid4())
        msg.metadata.__dict__["_message_id"] = msg_id  # what a SuperLink assigns on push
        return msg_id

    def _store(self, msg_id: str, msg: Message, reply: Message, seconds: float) -> None:
        """Keep ``reply`` to ``msg`` (its node took ``seconds``) for ``pull_messages``."""
        if self.latency_fn is not None and msg.metadata.dst_node_id in self.contexts:
            seconds += self.latency_fn(self.contexts[msg.metadata.dst_node_id], reply)
        self._replies[msg_id] = (reply, seconds)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i)[0] for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver and collect; nodes run "in parallel", so a reply is late when its own time
        exceeds ``timeout`` — late replies are dropped (stragglers), like Flower's Grid does."""
        ids = list(self.push_messages(messages))
        if timeout is not None:
            for msg_id in ids:
                reply, seconds = self._replies[msg_id]
                if seconds > timeout:
                    del self._replies[msg_id]
                    logging.getLogger("flwr").warning(
                        "node %d replied after %.1fs > timeout %.1fs: dropped as a straggler",
                        reply.metadata.src_node_id,
                        seconds,
                        timeout,
                    )
        return self.pull_messages(ids)

    # ------------------------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        dst = msg.metadata.dst_node_id
        if dst not in self.contexts:
            return Message(
                Error(ErrorCode.NODE_UNAVAILABLE, f"node {dst} does not exist"), reply_to=msg
            )
        try:
            return self.client_app(msg, self.contexts[dst])
        except Exception as ex:  # a failing client is an error reply, never a crashed server
            return exception_reply(msg, ex)


def run_inprocess(
    scenario: Scenario, run_dir: Path, show_progress: bool = True, resume: bool = False
) -> dict:
    """Run the scenario with :class:`InProcessGrid`; return the run summary. With
    ``engine.name = "packed"`` the grid hands training messages to :mod:`fedge.engines.packed`."""
    from clients.app import MODS
    from clients.app import app as client_app
    from clients.node import resolve_device
    from server.app import run_server

    # Per-round news goes to the progress line and the results folder; keep Flower's INFO chatter out.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_config = {**scenario.to_run_config(), "run-dir": str(run_dir)}
    packer = None
    if scenario.engine.name == "packed":
        from fedge.engines.packed import PackedTrainer

        packer = PackedTrainer(scenario, resolve_device(scenario.engine.device), MODS)
    grid = InProcessGrid(
        client_app,
        scenario.data.num_clients,
        run_config,
        seed=scenario.seed,
        batch_trainer=packer,
    )
    TaskIdentity.run_id = grid.run.run_id
    TaskIdentity.node_id = SERVER_NODE_ID
    TaskIdentity.task_id = 1
    # The in-process clients set torch's (process-wide) thread count to engine.client_threads;
    # restored, so the next run's server-side work before its clients (e.g. LoRA's pre-training)
    # runs as this one's did, and the caller's process is left as it was found.
    threads = torch.get_num_threads()
    try:
        summary = run_server(grid, scenario, run_dir, show_progress=show_progress, resume=resume)
    finally:
        torch.set_num_threads(threads)
    if packer is not None:
        print(packer.report(), flush=True)
    return summary
