"""Did the run train at all? A run whose rounds aggregated nothing must not end as "done".

Every round record carries ``aggregated`` (1: the global model was replaced by an aggregate, 0: the
round was skipped — too few valid replies, no replies, or a non-finite aggregate). After the last
round, :func:`judge_run` adds to the summary how many rounds aggregated and, when more than
``robustness.max_skipped_share`` of them (or all of them) were skipped, ``status = "failed"`` with
the reason; ``fedge run`` then exits 1 and prints it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

STATUS_OK, STATUS_FAILED = "ok", "failed"


def judge_run(rounds: Sequence[dict[str, Any]], max_skipped_share: float) -> dict[str, Any]:
    """``{"status", "num_rounds_aggregated", "num_rounds_skipped", "skipped_share"[, "failure"]}``
    from a run's round records (round 0, the initial evaluation, is not a training round)."""
    training = [r for r in rounds if int(r.get("round", 0)) >= 1]
    # runs written before rounds carried `aggregated` count as aggregated: nothing to judge
    skipped = [r for r in training if r.get("aggregated", 1) == 0]
    share = len(skipped) / len(training) if training else 0.0
    out: dict[str, Any] = {
        "status": STATUS_OK,
        "num_rounds_aggregated": len(training) - len(skipped),
        "num_rounds_skipped": len(skipped),
        "skipped_share": share,
    }
    if training and (len(skipped) == len(training) or share > max_skipped_share):
        out["status"] = STATUS_FAILED
        out["failure"] = (
            f"{len(skipped)} of {len(training)} rounds aggregated nothing "
            f"(robustness.max_skipped_share={max_skipped_share:g}); {_why(skipped)}"
        )
    return out


def _why(skipped: Sequence[dict[str, Any]]) -> str:
    """The most common cause among skipped rounds, in words, with what to look at."""
    causes: Counter[str] = Counter()
    for r in skipped:
        if r.get("aggregate_nonfinite"):
            causes["the aggregate was NaN/Inf (lower train.lr, or use a robust aggregation)"] += 1
        elif r.get("round_skipped"):
            invalid = {
                k.removeprefix("num_invalid_"): v
                for k, v in r.items()
                if k.startswith("num_invalid_") and v
            }
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(invalid.items())) or "none"
            causes[
                "too few valid replies (excluded by reason: "
                f"{detail}; see the warnings in the log and clients.jsonl)"
            ] += 1
        else:
            causes["no client replied in time (federation.round_timeout_s, dropouts)"] += 1
    cause, count = causes.most_common(1)[0] if causes else ("unknown", 0)
    return f"most skipped rounds: {cause} [{count}]"
