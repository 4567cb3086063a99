"""clients/arrays.py: the fast Array codec must be Flower's, byte for byte, and its caches exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from clients import arrays
from clients.arrays import encode, received_state_dict, record_from_state_dict, view

SAMPLES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(5),
    np.array(3, dtype=np.int64),  # 0-d, like BatchNorm's num_batches_tracked
    np.zeros((0, 4), dtype=np.float32),
    np.linspace(0, 1, 40, dtype=np.float16).reshape(8, 5),
    np.array([True, False]),
    np.arange(6, dtype=">f8"),  # big-endian
    np.arange(20, dtype=np.float32).reshape(4, 5).T,  # Fortran order: Flower's own path
]


@pytest.mark.parametrize("values", SAMPLES, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_encode_is_flowers_array_byte_for_byte(values: np.ndarray) -> None:
    ours, flowers = encode(values), Array.from_numpy_ndarray(values)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
        flowers.dtype,
        flowers.shape,
        flowers.stype,
        flowers.data,
    )
    assert ours == flowers and flowers == ours
    assert ours.object_id == flowers.object_id  # same on the wire (deflated with the same type)
    np.testing.assert_array_equal(view(ours), values)
    decoded = ours.numpy()
    np.testing.assert_array_equal(decoded, values)
    assert decoded.flags.writeable  # np.load's contract: callers may modify their copy
    if values.size:
        decoded.flat[0] = 99
        np.testing.assert_array_equal(view(ours), values)  # ...without touching the array


def test_record_survives_protobuf_round_trip() -> None:
    state = torch.nn.Linear(3, 2).state_dict()
    record = record_from_state_dict(state)
    assert record.object_id == ArrayRecord(state).object_id
    back = recorddict_from_proto(recorddict_to_proto(RecordDict({"arrays": record})))["arrays"]
    for key, tensor in state.items():
        np.testing.assert_array_equal(back[key].numpy(), tensor.numpy())


def test_view_follows_replaced_bytes() -> None:
    arr = encode(np.zeros(3, dtype=np.float32))
    arr.data = Array.from_numpy_ndarray(np.ones(3, dtype=np.float32)).data
    np.testing.assert_array_equal(view(arr), np.ones(3))
    np.testing.assert_array_equal(arr.numpy(), np.ones(3))


def test_received_state_dict_decodes_each_content_once(monkeypatch) -> None:
    calls = []
    real = Array.numpy

    def counting(self: Array) -> np.ndarray:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(Array, "numpy", counting)
    monkeypatch.setattr(arrays, "_RECEIVED", type(arrays._RECEIVED)())
    first = ArrayRecord({"w": Array.from_numpy_ndarray(np.ones((2, 2), dtype=np.float32))})
    a = received_state_dict(first)
    b = received_state_dict(first)  # same record (the broadcast): no second decode
    assert len(calls) == 1 and a is b
    other = ArrayRecord({"w": Array.from_numpy_ndarray(np.full((2, 2), 2.0, dtype=np.float32))})
    c = received_state_dict(other)  # new content: decoded, and different
    assert len(calls) == 2
    assert torch.equal(c["w"], torch.full((2, 2), 2.0))
    first["w"] = Array.from_numpy_ndarray(np.zeros((2, 2), dtype=np.float32))
    d = received_state_dict(first)  # the same record object with new bytes is decoded afresh
    assert torch.equal(d["w"], torch.zeros(2, 2))
    for i in range(arrays.RECEIVED_CACHE_SIZE + 2):  # bounded
        received_state_dict(ArrayRecord({"w": Array.from_numpy_ndarray(np.full(2, float(i)))}))
    assert len(arrays._RECEIVED) == arrays.RECEIVED_CACHE_SIZE
