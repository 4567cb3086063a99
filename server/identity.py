"""Partition ids bound to nodes: a client's identity is not whatever it claims.

A reply names its partition in its identity record (``clients/identity.py``), and nothing stops
two SuperNodes from being started with the same ``partition-id``, or a plain ``flower-supernode``
from claiming 999. :class:`IdentityGuard` is the first round plugin, so a refused reply reaches
neither the client-state keeper, nor validation, nor the strategy:

* an id outside ``[0, data.num_clients)`` (or not an integer) is refused;
* the first node to claim an id in a run owns it; a claim from another node is refused while the
  owner is still connected, and taken over (logged) once it is gone: a SuperNode that restarts
  comes back under a new node id without authentication and under the same one with ``--auth``
  (Flower derives the node id from the registered public key, so there the claim is bound to
  the key);
* replies that name no partition (stock Flower clients) are not checked: they claim nothing.

Each refusal is logged with the node id and counted in the round's record
(``num_identity_refused``); the owners are checkpointed with the other plugins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import Message
from flwr.common.logger import log

from clients.identity import PARTITION_ID, as_partition_id, reply_identity
from server.plugins import Metrics, RoundPlugin


def claimed_partition(reply: Message) -> int | str | None:
    """The partition id ``reply`` claims; None when it claims none; a string saying what is wrong
    when the claim is not an integer."""
    raw = reply_identity(reply).get(PARTITION_ID)
    if raw is None:
        return None
    pid = as_partition_id(raw)
    return f"{PARTITION_ID} {raw!r} is not an integer" if pid is None else pid


class IdentityGuard(RoundPlugin):
    """Refuses training replies whose partition id is out of range or held by another node."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self.owners: dict[int, int] = {}  # partition id -> node id that holds it in this run
        # node ids connected now (the grid's get_node_ids); None: an owner is never "gone"
        self.connected_nodes: Callable[[], Iterable[int]] | None = None
        self.total_refused = 0

    def refusal(self, reply: Message, connected: set[int] | None) -> str | None:
        """Why ``reply`` is refused, or None; takes ownership for a first or returning claim."""
        if reply.has_error():
            return None
        pid = claimed_partition(reply)
        if pid is None:
            return None
        if isinstance(pid, str):
            return pid
        if not 0 <= pid < self.num_clients:
            return f"{PARTITION_ID} {pid} is outside [0, data.num_clients={self.num_clients})"
        node = reply.metadata.src_node_id
        owner = self.owners.setdefault(pid, node)
        if owner == node:
            return None
        if connected is not None and owner not in connected:
            log(
                INFO,
                "fedge: partition %d moves from node %d (gone) to node %d",
                pid,
                owner,
                node,
            )
            self.owners[pid] = node
            return None
        return f"{PARTITION_ID} {pid} is held by node {owner}, which claimed it first"

    def filter_train_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], Metrics]:
        kept: list[Message] = []
        connected: set[int] | None = None
        for reply in replies:
            pid = None if reply.has_error() else claimed_partition(reply)
            owner = self.owners.get(pid) if isinstance(pid, int) else None
            if (
                connected is None
                and self.connected_nodes is not None
                and owner not in (None, reply.metadata.src_node_id)
            ):
                connected = set(self.connected_nodes())  # asked only when a claim is contested
            reason = self.refusal(reply, connected)
            if reason is None:
                kept.append(reply)
                continue
            log(
                WARNING,
                "round %d: excluded reply from node %d (identity): %s",
                server_round,
                reply.metadata.src_node_id,
                reason,
            )
        refused = len(replies) - len(kept)
        self.total_refused += refused
        return kept, {"num_identity_refused": refused}

    def state(self) -> dict:
        return {"owners": dict(self.owners), "total_refused": self.total_refused}

    def load_state(self, state: dict) -> None:
        self.owners = {int(pid): int(node) for pid, node in state.get("owners", {}).items()}
        self.total_refused = int(state.get("total_refused", 0))
