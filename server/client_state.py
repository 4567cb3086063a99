"""The server's copy of every client's ``Context.state``, so a resume restores it on every engine.

See ``clients/state.py`` for the protocol. :class:`ClientStateKeeper` is a round plugin: it asks
clients for their state in the train config, strips the state record from each training reply
before any other plugin or the strategy sees it, keeps the latest state per partition id, and is
checkpointed with the other plugins. After a resume, :meth:`ClientStateKeeper.send_back` hands
each connected node the state its partition had at the checkpoint.
"""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from clients.identity import reply_partition_id
from clients.state import RETURN_STATE_KEY, STATE_ACTION, STATE_KEY, STATE_RECORD
from server.plugins import Metrics, RoundPlugin

QUERY_TYPE = f"query.{STATE_ACTION}"


class ClientStateKeeper(RoundPlugin):
    """Latest ``Context.state`` (serialized) of every partition that reported one."""

    def __init__(self) -> None:
        self.states: dict[int, bytes] = {}

    def train_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        return {RETURN_STATE_KEY: True}

    def filter_train_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], Metrics]:
        for reply in replies:
            # (RecordDict.config_records builds a synced copy per call: read the record itself)
            record = None if reply.has_error() else reply.content.get(STATE_RECORD)
            if not isinstance(record, ConfigRecord):
                continue
            del reply.content[STATE_RECORD]  # never aggregated, validated or counted as traffic
            pid = reply_partition_id(reply)
            raw = record.get(STATE_KEY)
            if pid is not None and isinstance(raw, bytes):
                self.states[pid] = raw
        return replies, {}

    def state(self) -> dict:
        return {"states": dict(self.states)}

    def load_state(self, state: dict) -> None:
        self.states = {int(pid): bytes(raw) for pid, raw in state.get("states", {}).items()}

    def send_back(self, grid: Grid, timeout: float, node_pid: dict[int, int] | None = None) -> int:
        """Give each connected node its partition's checkpointed state; return how many took it.

        ``node_pid`` (node id -> partition id, from :func:`query_partitions`) says which partition
        each node serves — node ids change when a SuperNode or a simulation restarts; asked here
        when not given. A second ``query.fedge_state`` per node carries that partition's state.
        Nodes that cannot answer (another ClientApp, a failure) are logged and start with an
        empty state, as they would have before this existed.
        """
        if not self.states:
            return 0
        if node_pid is None:
            node_pid = query_partitions(grid, timeout)
        sends = [
            Message(
                RecordDict({STATE_RECORD: ConfigRecord({STATE_KEY: self.states[pid]})}),
                nid,
                QUERY_TYPE,
                group_id="resume",
            )
            for nid, pid in sorted(node_pid.items(), key=lambda item: item[1])
            if pid in self.states
        ]
        done = sum(not r.has_error() for r in grid.send_and_receive(sends, timeout=timeout))
        missing = sorted(set(self.states) - set(node_pid.values()))
        if done < len(self.states):
            log(
                WARNING,
                "fedge: restored the client state of %d of %d partitions (not reached: %s); "
                "the others start from an empty Context.state",
                done,
                len(self.states),
                missing or "errors",
            )
        else:
            log(INFO, "fedge: restored the client state of %d partitions", done)
        return done


def query_partitions(grid: Grid, timeout: float) -> dict[int, int]:
    """node id -> partition id of every connected node that answers an empty
    ``query.fedge_state`` (fedge's ClientApp replies with its identity record and changes
    nothing): how a resumed server finds the partitions behind this run's node ids."""
    asks = [
        Message(RecordDict(), nid, QUERY_TYPE, group_id="resume") for nid in grid.get_node_ids()
    ]
    node_pid: dict[int, int] = {}
    for reply in grid.send_and_receive(asks, timeout=timeout):
        pid = reply_partition_id(reply)
        if pid is not None:
            node_pid[reply.metadata.src_node_id] = pid
    return node_pid
