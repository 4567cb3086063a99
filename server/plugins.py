"""Round plugins: cross-cutting server behaviour that every strategy gets for free.

A plugin may add entries to the config sent with each training round (e.g. a deadline), filter the
training replies before the strategy aggregates them (e.g. drop late or invalid updates), and
report metrics for the round. Plugins never change a strategy's math.
"""

from __future__ import annotations

from flwr.app import Message

Metrics = dict[str, float | int]


class RoundPlugin:
    """No-op base: override what you need."""

    def train_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        """Extra entries for the ConfigRecord sent with this round's training instructions."""
        return {}

    def observe_train_instructions(self, server_round: int, instructions: list[Message]) -> None:
        """See what each node was sent this round (e.g. to compare replies against it)."""

    def filter_train_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], Metrics]:
        """Replies the strategy should aggregate, and metrics about what was dropped."""
        return replies, {}

    def state(self) -> dict:
        """JSON-able state to checkpoint."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""
