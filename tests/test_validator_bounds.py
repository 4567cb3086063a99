"""Every bound of the reply validator (server/validation.py) pinned on both sides: a reply exactly
at the bound passes, one just past it is refused with its reason. Each of these fails when its
bound moves or its comparison turns strict/non-strict (checked by breaking each one)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedge.engines import SERVER_NODE_ID
from server.validation import ReplyValidator

SENT = np.zeros(4, dtype=np.float32)


def exchange(reply_w: np.ndarray, metrics: dict, node: int = 5) -> tuple[Message, Message]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    sent = Message(RecordDict({"arrays": ArrayRecord({"w": Array(SENT)})}), node, MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = f"m{node}"
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(reply_w)}), "metrics": MetricRecord(metrics)}
    )
    reply = Message(content, reply_to=sent)
    return sent, reply


def reason(reply_w: np.ndarray, metrics: dict, **validator) -> str | None:
    args = {"max_update_norm": 10.0, "max_reply_factor": 4.0, "min_valid": 1, **validator}
    check = ReplyValidator(**args)
    sent, reply = exchange(reply_w, metrics)
    check.observe_train_instructions(1, [sent])
    got = check.check(reply)
    return got[0] if got else None


def update_of_norm(norm: float) -> np.ndarray:
    """A float32 update whose float64 norm is exactly ``norm`` (one non-zero entry)."""
    w = SENT.copy()
    w[0] = np.float32(norm)
    assert float(np.float64(w[0])) == norm  # representable: the bound is hit exactly
    return w


@pytest.mark.parametrize(
    ("num_examples", "expected"),
    [
        (10**9, None),  # the documented limit, literally: the constant moving must fail here
        (10**9 + 1, "malformed"),
        (1e9 * (1 + 1e-12), "malformed"),
        (1, None),
        (5e-324, None),  # smallest positive float: positive is enough
        (0, "malformed"),
        (-1e-300, "malformed"),
    ],
)
def test_num_examples_bounds(num_examples: float, expected: str | None) -> None:
    assert reason(SENT.copy(), {"num-examples": num_examples}) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2**63 - 1, None),  # the largest int64: an identity may be any node-id-sized integer
        (-(2**63) + 1, None),
        (2.0**62, None),  # an integral float is an integer
        (2.0**63, "malformed"),  # just past int64
        (-(2.0**63), "malformed"),
        (1.5, "malformed"),
    ],
)
@pytest.mark.parametrize("key", ["partition-id", "device-index", "cluster-id"])
def test_identity_metric_bounds(key: str, value: float, expected: str | None) -> None:
    assert reason(SENT.copy(), {"num-examples": 3, key: value}) == expected


def test_update_norm_bound_is_inclusive() -> None:
    assert reason(update_of_norm(8.0), {"num-examples": 3}, max_update_norm=8.0) is None
    past = np.nextafter(np.float32(8.0), np.float32(9.0))
    assert reason(update_of_norm(float(past)), {"num-examples": 3}, max_update_norm=8.0) == "norm"


def test_reply_size_bound_is_inclusive() -> None:
    """size > factor x sent is refused; size == factor x sent passes."""
    from server.validation import _content_bytes

    sent, reply = exchange(SENT.copy(), {"num-examples": 3, "pad": [0.0] * 50})
    ratio = _content_bytes(reply.content) / _content_bytes(sent.content)
    assert ratio > 1  # the padded reply is larger than what was sent
    metrics = {"num-examples": 3, "pad": [0.0] * 50}
    assert reason(SENT.copy(), metrics, max_reply_factor=ratio) is None
    assert reason(SENT.copy(), metrics, max_reply_factor=ratio * (1 - 1e-9)) == "oversized"


def filtered(norms: list[float], bound: float, min_valid: int = 1) -> tuple[list[int], dict]:
    """Node ids kept by ``filter_train_replies`` for one reply per norm (node i has norm i)."""
    check = ReplyValidator(1e6, 4.0, min_valid, relative_norm_bound=bound)
    pairs = [exchange(update_of_norm(n), {"num-examples": 3}, node=i) for i, n in enumerate(norms)]
    check.observe_train_instructions(1, [sent for sent, _ in pairs])
    kept, metrics = check.filter_train_replies(1, [reply for _, reply in pairs])
    return [r.metadata.src_node_id for r in kept], metrics


def test_relative_norm_bound_is_inclusive() -> None:
    # median of (1, 2, 6) is 2: with c = 3 the limit is 6, which is kept ...
    assert filtered([1.0, 2.0, 6.0], bound=3.0)[0] == [0, 1, 2]
    # ... and anything past it is not
    past = float(np.nextafter(np.float32(6.0), np.float32(7.0)))
    kept, metrics = filtered([1.0, 2.0, past], bound=3.0)
    assert kept == [0, 1] and metrics["num_invalid_norm"] == 1


def test_relative_norm_bound_needs_three_replies() -> None:
    """A median of two is no majority: with 2 replies the bound does not apply, with 3 it does.
    (c = 1.5: with c >= 2 the larger of two norms can never exceed c x their mean.)"""
    assert filtered([1.0, 100.0], bound=1.5)[0] == [0, 1]
    assert filtered([1.0, 1.0, 100.0], bound=1.5)[0] == [0, 1]


@pytest.mark.parametrize(("min_valid", "skipped"), [(3, 0), (4, 1)])
def test_min_valid_bound(min_valid: int, skipped: int) -> None:
    """Exactly ``federation.min_train_clients`` valid replies aggregate; one fewer skips."""
    kept, metrics = filtered([1.0, 1.0, 1.0], bound=0.0, min_valid=min_valid)
    assert metrics["round_skipped"] == skipped
    assert len(kept) == (0 if skipped else 3)
