"""Server side of the virtual clock: the round's deadline policy over the clients' virtual times.

Every training reply carries its client's virtual time (``clients/clock.py``). The plugin sends the
deadline (and the partial-work switch) with each round, then applies the scenario's policy before
the strategy aggregates:

* ``wait_for_all``: keep every update; round time = the slowest client's time.
* ``deadline``: drop updates later than D, as a Flower ``timeout`` would; round time = D when anyone
  was late or failed (the server cannot know before D that they will not come), else the slowest.
* ``first_k`` (over-selection): sample N, keep the K fastest; round time = the K-th fastest time.

Failed clients (error replies: offline, out of memory, dropped out) never extend the round in
``wait_for_all``/``first_k``: Flower sees the node fail, so the server stops waiting for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import Message

from clients.clock import DEADLINE_KEY, DROPOUT, OUT_OF_MEMORY, PARTIAL_WORK_KEY, UNAVAILABLE
from scenarios.config import Scenario
from server.plugins import Metrics, RoundPlugin


@dataclass(frozen=True)
class PolicyDecision:
    kept: list[int]  # indices into the times given, in their original order
    late: list[int]  # indices dropped by the policy
    round_time_s: float


def apply_deadline_policy(
    times: Sequence[float],
    policy: str,
    deadline_s: float | None = None,
    first_k: int | None = None,
    num_failed: int = 0,
) -> PolicyDecision:
    """Which of the successful clients (virtual ``times``) count, and how long the round took.

    Ties in ``first_k`` go to the earlier index (replies arrive sorted by partition id).
    """
    idx = list(range(len(times)))
    slowest = max(times, default=0.0)
    if policy == "wait_for_all":
        return PolicyDecision(idx, [], slowest)
    if policy == "deadline":
        if deadline_s is None:
            raise ValueError("policy 'deadline' needs deadline_s")
        kept = [i for i in idx if times[i] <= deadline_s]
        late = [i for i in idx if times[i] > deadline_s]
        waited = bool(late) or num_failed > 0
        return PolicyDecision(kept, late, deadline_s if waited else slowest)
    if policy == "first_k":
        if first_k is None:
            raise ValueError("policy 'first_k' needs first_k")
        order = sorted(idx, key=lambda i: (times[i], i))
        kept, late = sorted(order[:first_k]), sorted(order[first_k:])
        round_time = times[order[first_k - 1]] if len(order) >= first_k else slowest
        return PolicyDecision(kept, late, round_time)
    raise ValueError(f"unknown deadline policy {policy!r}; use wait_for_all, deadline or first_k")


def failure_kind(reply: Message) -> str | None:
    """'unavailable' | 'dropout' | 'out_of_memory' | 'other' for an error reply, None otherwise."""
    if not reply.has_error():
        return None
    reason = reply.error.reason or ""
    for prefix, kind in (
        (UNAVAILABLE, "unavailable"),
        (DROPOUT, "dropout"),
        (OUT_OF_MEMORY, "out_of_memory"),
    ):
        if prefix in reason:
            return kind
    return "other"


def _metric(reply: Message, key: str, default: float = 0.0) -> float:
    for rec in reply.content.metric_records.values():
        if key in rec:
            return float(rec[key])
    return default


class DeviceClockPlugin(RoundPlugin):
    """Sends the deadline each round, applies the policy, records the virtual clock's metrics."""

    def __init__(self, scenario: Scenario) -> None:
        if scenario.devices is None:
            raise ValueError("DeviceClockPlugin needs a scenario with a [devices] section")
        self.cfg = scenario.devices
        self.cumulative_s = 0.0

    def train_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        if self.cfg.policy != "deadline":
            return {}
        return {DEADLINE_KEY: float(self.cfg.deadline_s), PARTIAL_WORK_KEY: self.cfg.partial_work}

    def filter_train_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], Metrics]:
        ok = [r for r in replies if not r.has_error()]
        failures = [failure_kind(r) for r in replies if r.has_error()]
        times = [_metric(r, "virtual-time-s") for r in ok]
        decision = apply_deadline_policy(
            times, self.cfg.policy, self.cfg.deadline_s, self.cfg.first_k, len(failures)
        )
        kept = [ok[i] for i in decision.kept]
        self.cumulative_s += decision.round_time_s
        energies = [_metric(r, "energy-j", math.nan) for r in ok]
        metrics: Metrics = {
            "virtual_round_time_s": decision.round_time_s,
            "cumulative_virtual_time_s": self.cumulative_s,
            "num_kept": len(kept),
            "num_late": len(decision.late),
            "num_unavailable": failures.count("unavailable"),
            "num_dropped_out": failures.count("dropout"),
            "num_out_of_memory": failures.count("out_of_memory"),
            "round_train_flops": sum(_metric(r, "train-flops") for r in ok),
            # Every client that trained spent the energy, late or not.
            "round_energy_j": sum(e for e in energies if not math.isnan(e)),
            "kept_bytes_up": sum(int(_metric(r, "sent-bytes")) for r in kept),
            "mean_work_fraction": (
                sum(_metric(r, "work-fraction", 1.0) for r in kept) / len(kept)
                if kept
                else math.nan
            ),
        }
        return kept + [r for r in replies if r.has_error()], metrics

    def state(self) -> dict:
        return {"cumulative_virtual_time_s": self.cumulative_s}

    def load_state(self, state: dict) -> None:
        self.cumulative_s = float(state.get("cumulative_virtual_time_s", 0.0))


TIME_TO_ACCURACY_PLOT = "time_to_accuracy.png"


def finalize_virtual_clock(writer, summary: dict) -> dict:
    """Add the virtual clock to a finished run: ``time_to_accuracy.png`` (central accuracy vs
    cumulative virtual seconds) and ``total_virtual_time_s`` in ``summary.json``."""
    from scenarios.results import SUMMARY_FILE, load_run, plot_metric

    run = load_run(writer.run_dir)
    for r in run.rounds:  # round 0 happens at virtual time 0
        r.setdefault("cumulative_virtual_time_s", 0.0 if r["round"] == 0 else None)
    plot_metric(
        [run],
        "central_accuracy",
        writer.run_dir / TIME_TO_ACCURACY_PLOT,
        x_key="cumulative_virtual_time_s",
        title="time to accuracy (virtual seconds)",
    )
    times = [r["cumulative_virtual_time_s"] for r in run.rounds if r.get("round", 0) > 0]
    summary = {**summary, "total_virtual_time_s": float(times[-1]) if times else 0.0}
    writer.write_json(SUMMARY_FILE, summary)
    return summary
