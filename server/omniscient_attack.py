"""Omniscient attackers (``attack.kind = "alie" | "ipm"``), simulated on the server.

SIMULATION ONLY. ALIE and IPM assume colluding attackers that know the honest updates of their
round. A client mod cannot know them (each client trains alone), so fedge gives the attackers
that view here: the attacking clients train honestly (``clients/attacks.py`` lets them through),
and this plugin, before any check or aggregation sees the round, replaces each attacker's reply
by ``w_sent + a`` where ``a`` is computed from the honest updates of the same group (clients sent
the same model) by ``algorithms/attacks.py``. On a real deployment nobody runs this plugin: it is
built only when a scenario's ``[attack]`` asks for an omniscient kind.
"""

from __future__ import annotations

from flwr.app import Message, RecordDict

from algorithms.attacks import IPM_DEFAULT_EPSILON, alie_default_z, alie_update, ipm_update
from clients.identity import reply_partition_id
from scenarios.config import Scenario
from server.plugins import Metrics, RoundPlugin
from server.update_stack import group_updates, set_update

OMNISCIENT_KINDS = ("alie", "ipm")


class OmniscientAttack(RoundPlugin):
    """Rewrites the replies of ``attack.clients`` with ALIE or IPM (see the module docstring)."""

    def __init__(self, kind: str, attackers: set[int], strength: float | None) -> None:
        if kind not in OMNISCIENT_KINDS:
            raise ValueError(f"not an omniscient attack: {kind!r}")
        self.kind = kind
        self.attackers = attackers
        self.strength = strength
        self._sent: dict[int, RecordDict] = {}

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> OmniscientAttack:
        attack = scenario.attack
        return cls(attack.kind, set(attack.clients), attack.strength)

    def observe_train_instructions(self, server_round: int, instructions: list[Message]) -> None:
        self._sent = {m.metadata.dst_node_id: m.content for m in instructions}

    def filter_train_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], Metrics]:
        poisoned = 0
        for group in group_updates(replies, self._sent):
            is_attacker = [reply_partition_id(replies[i]) in self.attackers for i in group.indices]
            honest = group.updates[[not a for a in is_attacker]]
            if not any(is_attacker) or honest.shape[0] == 0:
                continue  # no attacker here, or nothing honest to imitate: they reply honestly
            if self.kind == "alie":
                z = self.strength
                if z is None:
                    z = alie_default_z(len(group.indices), sum(is_attacker))
                malicious = alie_update(honest, z)
            else:
                eps = IPM_DEFAULT_EPSILON if self.strength is None else self.strength
                malicious = ipm_update(honest, eps)
            for i, attacker in zip(group.indices, is_attacker, strict=True):
                if attacker:
                    set_update(replies[i], group, malicious)
                    poisoned += 1
        return replies, {"num_poisoned": poisoned}
