"""Stop a Ray run cleanly when a Ray node dies, so it can be resumed from its checkpoint.

Flower's simulation runtime gives each Ray node's CPUs a fixed pool of client actors and never
replaces one that died: after a worker node is lost, every message handed to its dead actors comes
back at once as an error, and since a dead actor is free again immediately it takes most of the
following messages. The run would limp on with most clients "failing" for no reason of their own
and rounds skipped. fedge stops it instead, with a message that says what happened and how to go
on: ``fedge run --resume RUN_DIR`` starts a fresh actor pool on the nodes the cluster has then, and
continues from the last checkpoint (clients' state included), giving the numbers of an
uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Message

from server.plugins import Metrics, RoundPlugin

# What Flower's simulation puts in an error reply when the actor or its node is gone:
# "<class 'ray.exceptions.ActorDiedError'>:<'...'>" (flwr/server/superlink/fleet/vce/vce_api.py)
LOST_NODE_ERRORS = (
    "ray.exceptions.ActorDiedError",
    "ray.exceptions.RayActorError",
    "ray.exceptions.ActorUnavailableError",
    "ray.exceptions.NodeDiedError",
)
STOP_PREFIX = "Ray node lost"  # fedge/engines/submit.py finds the message in the flwr log by this


class RayNodeLostError(RuntimeError):
    """A Ray node running client actors died; the run stops and can be resumed."""


def lost_node_reason(reply: Message) -> str | None:
    """The error reason when ``reply`` says its Ray actor (or the actor's node) died."""
    if not reply.has_error():
        return None
    reason = reply.error.reason or ""
    return reason if any(name in reason for name in LOST_NODE_ERRORS) else None


class RayNodeGuard(RoundPlugin):
    """Raises :class:`RayNodeLostError` on the first training round with a dead-actor reply."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir

    def filter_train_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], Metrics]:
        lost = [r for r in (lost_node_reason(m) for m in replies) if r is not None]
        if lost:
            where = self.run_dir or "RUN_DIR"
            first = " ".join(lost[0].split())[:300]
            raise RayNodeLostError(
                f"{STOP_PREFIX} in round {server_round}: {len(lost)} of {len(replies)} clients' "
                f"Ray actors died ({first}). Flower's simulation does not replace dead actors, so "
                f"fedge stopped rather than count every client sent to them as failed. Its last "
                f"checkpoint (round {server_round - 1} at most) is in {where}: `fedge run --resume "
                f"{where}` continues on the nodes the Ray cluster has now (rejoin a machine first "
                "with `ray start --address HEAD:PORT` if you want it back)"
            )
        return replies, {}
