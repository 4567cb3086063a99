"""The round's stack of updates: packed replies whose arrays are rows of one stacked array
(clients/arrays.py), validated (server/validation.py) and averaged (server/stacked_mean.py) over
the stack, with the values, bytes and reasons of the per-reply paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore.task_identity import TaskIdentity

import server.stacked_mean as stacked_mean
from clients.arrays import (
    record_bytes,
    record_from_state_dict,
    records_from_stack,
    stacked_row,
    stacked_values,
    view,
)
from clients.replies import train_reply
from server.fedavg import FedAvg
from server.strategies import CLIENT_ID_KEYS, aggregate_client_metrics
from server.validation import ReplyValidator

SHAPES = {"w1": (16, 8), "b1": (16,), "w2": (3, 16), "b2": (3,)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _stacks(n: int, seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal((n, *s)) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _instructions(n: int, sent: ArrayRecord) -> list[Message]:
    content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})})
    out = []
    for i in range(n):
        msg = Message(content, 100 + i, MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = str(i)
        out.append(msg)
    return out


def _replies(instructions: list[Message], records: list[ArrayRecord], seed: int) -> list[Message]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (msg, record) in enumerate(zip(instructions, records, strict=True)):
        context = Context(
            run_id=1, node_id=100 + i, node_config={}, state=RecordDict(), run_config={}
        )
        loss, examples = float(rng.random()), int(rng.integers(1, 200))
        out.append(train_reply(msg, context, i, "fedavg", record, loss, examples, 3))
    return out


def test_stacked_arrays_are_the_encoded_rows() -> None:
    stacks = _stacks(5, seed=0)
    records = records_from_stack({k: v.copy() for k, v in stacks.items()})
    for row, record in enumerate(records):
        expected = record_from_state_dict({k: torch.from_numpy(v[row]) for k, v in stacks.items()})
        assert list(record) == list(SHAPES)
        assert record_bytes(record) == expected.count_bytes()  # sized before any bytes exist
        for key in SHAPES:
            arr = record[key]
            assert stacked_row(arr)[1] == row
            assert not view(arr).flags.writeable  # the replies share the stack
            assert arr.data == Array.from_numpy_ndarray(stacks[key][row]).data
            np.testing.assert_array_equal(arr.numpy(), stacks[key][row])
        assert record_bytes(record) == record.count_bytes() == expected.count_bytes()
    # New bytes replace the row: the array is what its bytes say, no longer a stacked row.
    arr = records[0]["b1"]
    arr.data = Array.from_numpy_ndarray(stacks["b1"][3]).data
    assert stacked_row(arr) is None
    np.testing.assert_array_equal(arr.numpy(), stacks["b1"][3])
    got = stacked_values([records[1]["b1"], arr, records[2]["b1"]])
    np.testing.assert_array_equal(got, stacks["b1"][[1, 3, 2]])


def test_stacked_values_gathers_rows_of_several_packs() -> None:
    first, second = _stacks(4, seed=1), _stacks(3, seed=2)
    a, b = records_from_stack(first), records_from_stack(second)
    order = [b[2], a[0], a[3], b[0], a[1]]
    expected = np.stack([view(r["w1"]) for r in order])
    np.testing.assert_array_equal(stacked_values([r["w1"] for r in order]), expected)
    np.testing.assert_array_equal(stacked_values([r["w1"] for r in a[1:3]]), first["w1"][1:3])


@pytest.mark.parametrize("block_bytes", [64 * 2**20, 300])  # one block; many (sum carried over)
@pytest.mark.parametrize("stacked", [True, False])
def test_stacked_mean_is_flowers_fedavg_bit_for_bit(
    block_bytes: int, stacked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stacked_mean, "BLOCK_BYTES", block_bytes)
    n = 37
    stacks = _stacks(n, seed=3)
    if stacked:
        records = records_from_stack({k: v.copy() for k, v in stacks.items()})
    else:
        records = [
            record_from_state_dict({k: torch.from_numpy(v[i].copy()) for k, v in stacks.items()})
            for i in range(n)
        ]
    replies = _replies(_instructions(n, records[0]), records, seed=4)
    kwargs = {"train_metrics_aggr_fn": aggregate_client_metrics}
    flower_arrays, flower_metrics = FlowerFedAvg(**kwargs).aggregate_train(1, replies)
    arrays, metrics = FedAvg(**kwargs).aggregate_train(1, replies)
    assert list(arrays) == list(flower_arrays)
    for key in SHAPES:
        assert arrays[key].data == flower_arrays[key].data, key  # same bytes
    assert dict(metrics) == dict(flower_metrics)


def test_client_metrics_average_is_flowers() -> None:
    rng = np.random.default_rng(5)
    records = [
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "train_loss": float(rng.random()),
                        "num-examples": int(rng.integers(1, 500)),
                        "partition-id": i,
                        "per_class": [float(v) for v in rng.random(3)],
                    }
                )
            }
        )
        for i in range(50)
    ]
    expected = aggregate_metricrecords(records, "num-examples")
    for key in CLIENT_ID_KEYS:
        expected.pop(key, None)
    assert dict(aggregate_client_metrics(records, "num-examples")) == dict(expected)


def test_stacked_mean_leaves_inconsistent_replies_to_flower() -> None:
    stacks = _stacks(3, seed=6)
    records = records_from_stack(stacks)
    replies = _replies(_instructions(3, records[0]), records, seed=7)
    odd = ArrayRecord({k: v for k, v in records[2].items() if k != "b2"})
    replies[2].content = RecordDict({"arrays": odd, "metrics": replies[2].content["metrics"]})
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(1, replies)


def test_round_validation_gives_every_reply_its_own_check() -> None:
    """Validating the round over the stack excludes the same replies, for the same reasons and
    details, as checking each reply on its own; kept replies' norms are the same."""
    n = 40
    sent_stack = _stacks(1, seed=8)
    sent = records_from_stack({k: v.copy() for k, v in sent_stack.items()})[0]
    stacks = {k: v + sent_stack[k] for k, v in _stacks(n, seed=9, scale=0.05).items()}
    stacks["w1"][3] *= 50  # too far: norm
    stacks["b2"][5, 0] = np.nan  # nonfinite
    stacks["w2"][7, 1, 2] = np.inf  # nonfinite
    records = records_from_stack(stacks)
    instructions = _instructions(n, sent)
    replies = _replies(instructions, records, seed=10)
    wrong = ArrayRecord({**records[11], "b1": Array(np.zeros(5, np.float32))})
    replies[11].content["arrays"] = wrong  # shape
    replies[12].content["metrics"] = MetricRecord({"num-examples": -1})  # malformed
    replies[13] = Message(
        RecordDict({"arrays": record_from_state_dict({"x": torch.zeros(2)})}),
        reply_to=instructions[13],
    )  # no MetricRecord: malformed
    bound = 2.0

    one_by_one = ReplyValidator(bound, 10.0, 1)
    one_by_one.observe_train_instructions(1, instructions)
    expected = [one_by_one.check(r) for r in replies]

    validator = ReplyValidator(bound, 10.0, 1)
    validator.observe_train_instructions(1, instructions)
    assert validator._check_round(replies) == expected
    kinds = [e[0] if e else None for e in expected]
    assert kinds[3] == "norm" and kinds[5] == kinds[7] == "nonfinite"
    assert kinds[11] == "shape" and kinds[12] == kinds[13] == "malformed"
    assert kinds.count(None) == n - 6
    assert validator._norms == one_by_one._norms  # the norms kept replies are measured by
    kept, metrics = validator.filter_train_replies(1, replies)
    assert len(kept) == n - 6 and metrics["num_invalid_nonfinite"] == 2


def test_train_reply_metrics_with_a_plans_extras_are_flowers() -> None:
    """A plan's extra metrics (e.g. the cluster id IFCA and clustered send) come after the three
    fixed ones, fast-built or Flower-checked alike; a value Flower rejects still raises."""
    sent = record_from_state_dict({k: torch.zeros(s) for k, s in SHAPES.items()})
    msg = _instructions(1, sent)[0]
    context = Context(run_id=1, node_id=100, node_config={}, state=RecordDict(), run_config={})
    record = records_from_stack(_stacks(1, seed=5))[0]
    values = {"train_loss": 0.5, "num-examples": 10, "num-steps": 3}
    for extra in ({"cluster-id": 2}, {"cluster-id": np.float64(2.0)}):  # fast path, checked path
        reply = train_reply(msg, context, 0, "ifca", record, 0.5, 10, 3, extra)
        metrics = reply.content["metrics"]
        assert isinstance(metrics, MetricRecord)
        assert dict(metrics) == dict(MetricRecord({**values, **extra}))
        assert list(metrics) == [*values, "cluster-id"]
    with pytest.raises(TypeError):
        train_reply(msg, context, 0, "ifca", record, 0.5, 10, 3, {"cluster-id": "two"})
