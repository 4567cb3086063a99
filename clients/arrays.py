"""The one place that turns model tensors into Flower ``Array``s and back, without repeated parsing.

Flower's ``Array`` stores ``np.save`` bytes, and ``Array.numpy()`` runs ``np.load`` on every call
(~50 µs per array, more than a small model's training step). In-process, the same bytes used to be
parsed by every client (the broadcast model), by reply validation and again by the aggregation.
Here:

- :func:`encode` / :func:`record_from_state_dict` build the *same bytes* as
  ``Array.from_numpy_ndarray`` (the npy header is cached per dtype and shape) in a
  :class:`DecodedArray` that also keeps a read-only view of its own bytes: ``numpy()`` is then a
  copy, not a parse, and :func:`view` reads it for free;
- :func:`received_state_dict` decodes a received ``ArrayRecord`` once per process and caches the
  result by the identity of its (immutable) ``bytes`` objects, so a round's broadcast model is
  decoded once, not once per client;
- :func:`records_from_stack` gives many clients' replies at once (the packed engine's): each
  ``Array`` is a row of one read-only stacked ndarray per key and writes its ``np.save`` bytes
  only when something reads ``Array.data`` (serialization, equality); :func:`record_bytes` sizes a
  record without writing them and :func:`stacked_row` lets the server read a round's rows as one
  stack (validation norms, aggregation).

Across processes (Ray, deployment) arrays arrive as plain ``Array``s rebuilt from protobuf: every
function here then falls back to Flower's own decoding, so all engines see the same numbers.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from io import BytesIO
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

R = TypeVar("R", ArrayRecord, MetricRecord, ConfigRecord)
RD = TypeVar("RD", ArrayRecord, MetricRecord, ConfigRecord, RecordDict)

# Decoded received models kept per process: a clustered/personalized round sends a few different
# models; each entry holds one decoded copy of a model.
RECEIVED_CACHE_SIZE = 4


class DecodedArray(Array):
    """An ``Array`` (same fields, same bytes) that also holds the ndarray its bytes encode."""

    # Flower writes the class's qualified name into every deflated object and inflates by that
    # name: on the wire this *is* an Array (same bytes, same object id).
    __qualname__ = "Array"

    def numpy(self) -> np.ndarray:
        """A fresh writable copy, as ``np.load`` would return; parsed only if ``data`` changed."""
        decoded = _own_view(self)
        return decoded.copy() if decoded is not None else super().numpy()

    def __eq__(self, other: object) -> bool:
        # Array's dataclass __eq__ only compares objects of the very same class.
        if not isinstance(other, Array):
            return NotImplemented
        return (self.dtype, tuple(self.shape), self.stype, self.data) == (
            other.dtype,
            tuple(other.shape),
            other.stype,
            other.data,
        )

    __hash__ = None  # type: ignore[assignment]  (mutable, like Array)


class StackedArray(DecodedArray):
    """A :class:`DecodedArray` that is row ``row`` of a read-only stacked ndarray and writes its
    ``np.save`` bytes on first use of ``data`` (an in-process reply that is never serialized never
    pays for them)."""

    __qualname__ = "Array"

    @property  # type: ignore[override]
    def data(self) -> bytes:
        held = self.__dict__["_fedge_decoded"]
        if held[0] is None:  # first read: the bytes np.save would write for the row
            header = _layout(held[1].dtype, held[1].shape)[0]
            data = header + held[1].tobytes()
            self.__dict__["_fedge_data"] = data
            self.__dict__["_fedge_decoded"] = (data, held[1])
        return self.__dict__["_fedge_data"]

    @data.setter
    def data(self, value: bytes) -> None:  # new bytes: the row no longer describes them
        self.__dict__["_fedge_data"] = value
        self.__dict__.pop("_fedge_stack", None)


def _own_view(arr: Array) -> np.ndarray | None:
    held = arr.__dict__.get("_fedge_decoded")
    if held is None:
        return None
    # The view is only valid for the bytes object it was made from (Array.data may be replaced);
    # a StackedArray's bytes are written from the view (None: not yet).
    raw = arr.__dict__.get("_fedge_data") if type(arr) is StackedArray else arr.__dict__["data"]
    return held[1] if held[0] is raw else None


@lru_cache(maxsize=512)
def _layout(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, str, tuple[int, ...]]:
    """The header ``np.save`` writes for a C-contiguous array of this dtype and shape, and the
    ``Array`` fields for them (``str(dtype)`` alone costs microseconds: numpy builds it in Python)."""
    fmt = np.lib.format
    header = {"descr": fmt.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buf = BytesIO()
    try:
        fmt.write_array_header_1_0(buf, header)  # what np.save picks first
    except ValueError:  # header over 64 KiB (a very long shape): np.save moves to version 2.0
        buf = BytesIO()
        fmt.write_array_header_2_0(buf, header)
    return buf.getvalue(), str(dtype), tuple(int(d) for d in shape)


def encode(ndarray: np.ndarray) -> Array:
    """``Array.from_numpy_ndarray(ndarray)`` (byte for byte), keeping a view of the bytes."""
    if ndarray.dtype.hasobject or ndarray.dtype.names or not ndarray.flags.c_contiguous:
        return Array.from_numpy_ndarray(ndarray)  # unusual dtypes and layouts: Flower's own path
    header, dtype_name, shape = _layout(ndarray.dtype, ndarray.shape)
    data = header + ndarray.tobytes()
    decoded = np.frombuffer(data, dtype=ndarray.dtype, count=ndarray.size, offset=len(header))
    decoded = decoded.reshape(shape)  # a read-only view of data
    return _new_array(DecodedArray, dtype_name, shape, data=data, _fedge_decoded=(data, decoded))


def _new_array(kind: type[Array], dtype_name: str, shape: tuple[int, ...], **fields: Any) -> Any:
    """A ``kind`` with the fields ``Array(dtype=, shape=, stype=, data=)`` sets, without its
    argument dispatch (a third of a small reply's encoding time; tests/test_arrays.py checks the
    object id matches), plus fedge's own ``fields``."""
    out = kind.__new__(kind)
    out.__dict__.update(dtype=dtype_name, shape=shape, stype=SType.NUMPY, **fields)
    return out


def record_from_state_dict(state_dict: dict[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(state_dict)`` with :func:`encode`d arrays (same keys, order and bytes)."""
    record = ArrayRecord()
    for key, tensor in state_dict.items():
        record[key] = encode(tensor.detach().cpu().numpy())
    return record


def records_from_stack(stacks: dict[str, np.ndarray]) -> list[ArrayRecord]:
    """One ``ArrayRecord`` per row of ``stacks`` (key -> ``(clients, *shape)`` ndarray, C-contiguous),
    equal to ``record_from_state_dict`` of that row's arrays (same keys, order, bytes once read).
    The stacks are made read-only: the replies share them."""
    layouts = {}
    for key, stack in stacks.items():
        if not stack.flags.c_contiguous or stack.dtype.hasobject or stack.dtype.names:
            raise ValueError(f"{key}: a stack must be a C-contiguous array of plain numbers")
        stack.flags.writeable = False
        header, dtype_name, shape = _layout(stack.dtype, stack.shape[1:])
        size = len(header) + stack[0].nbytes if len(stack) else 0  # len(Array.data), once read
        layouts[key] = (stack, dtype_name, shape, size)
    num_rows = {len(stack) for stack in stacks.values()}
    if len(num_rows) > 1:
        raise ValueError(f"stacks of different lengths: {sorted(num_rows)}")
    records = []
    for row in range(num_rows.pop() if num_rows else 0):
        items = {}
        for key, (stack, dtype_name, shape, size) in layouts.items():
            items[key] = _new_array(
                StackedArray,
                dtype_name,
                shape,
                _fedge_data=None,
                _fedge_decoded=(None, stack[row]),
                _fedge_stack=(stack, row),
                _fedge_size=size,
            )
        records.append(fast_record(ArrayRecord, items))
    return records


_EMPTY: dict[type, Any] = {}  # one empty record of each kind, copied by fast_record


def fast_record(kind: type[RD], items: dict) -> RD:
    """``kind(items)`` (an ArrayRecord, MetricRecord, ConfigRecord or RecordDict) without Flower
    re-checking every entry (a few µs per record): only for values whose types its check accepts
    (e.g. :class:`StackedArray`s, plain ints, floats and strings). ``items`` becomes the record's
    storage. Same class, same fields as ``kind(items)``."""
    empty = _EMPTY.get(kind)
    if empty is None:
        empty = _EMPTY[kind] = kind()
    record = empty.copy()  # TypedDict.copy: a new object sharing the type checks
    record.__dict__["_data"] = items
    return record


def stacked_row(arr: Array) -> tuple[np.ndarray, int] | None:
    """``(stack, row)`` when ``arr`` is row ``row`` of ``stack`` (see :func:`records_from_stack`)
    and its bytes were not replaced since; else None."""
    fields = arr.__dict__
    held = fields.get("_fedge_stack")
    # a StackedArray whose bytes, if written, are still the ones written from its row
    if held is not None and fields["_fedge_decoded"][0] is fields["_fedge_data"]:
        return held
    return None


def stacked_values(arrays: list[Array], decoded: list[np.ndarray] | None = None) -> np.ndarray:
    """The values of ``arrays`` (same shape and dtype) as one ``(len(arrays), *shape)`` ndarray:
    a slice of the packed engine's stack, unchanged, when they are its consecutive rows, else a
    new array (do not modify the result in place). ``decoded``: their values, if already read."""
    rows = [stacked_row(arr) for arr in arrays]
    if rows and all(r is not None for r in rows):
        stacks = {id(r[0]): r[0] for r in rows}  # type: ignore[index]
        if len(stacks) == 1:
            stack = rows[0][0]  # type: ignore[index]
            index = [r[1] for r in rows]  # type: ignore[index]
            if index == list(range(index[0], index[0] + len(index))):
                return stack[index[0] : index[0] + len(index)]
            return stack[index]
        first = rows[0][0]  # type: ignore[index]
        if all(s.dtype == first.dtype and s.shape[1:] == first.shape[1:] for s in stacks.values()):
            out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
            where: dict[int, tuple[list[int], list[int]]] = {key: ([], []) for key in stacks}
            for i, (stack, row) in enumerate(rows):  # type: ignore[misc]
                positions, stack_rows = where[id(stack)]
                positions.append(i)
                stack_rows.append(row)
            for key, (positions, stack_rows) in where.items():  # one gather per pack
                out[positions] = stacks[key][stack_rows]
            return out
    return np.stack(decoded if decoded is not None else [view(arr) for arr in arrays])


def record_bytes(record: ArrayRecord | MetricRecord | ConfigRecord) -> int:
    """``record.count_bytes()``; for an ArrayRecord without writing unwritten bytes."""
    if not isinstance(record, ArrayRecord):
        return record.count_bytes()
    total = 0
    for key, arr in record.__dict__.get("_data", record).items():  # (items() adds a view layer)
        held = arr.__dict__
        if held.get("_fedge_data", b"") is None:  # a StackedArray, bytes not yet written
            total += held["_fedge_size"] + len(key)
        else:
            total += len(arr.data) + len(key)
    return total


def view(arr: Array) -> np.ndarray:
    """The values of ``arr``; read-only and unparsed when it came from :func:`encode`."""
    decoded = _own_view(arr)
    return decoded if decoded is not None else arr.numpy()


def records_of(content: RecordDict, kind: type[R]) -> dict[str, R]:
    """The records of one type in ``content``, read-only: ``RecordDict.array_records`` & co. build
    a synced view that writes every entry back into the RecordDict (~50 µs per call)."""
    # Flower's TypedDict keeps its entries in a plain dict; reading it skips a view per call.
    items = content.__dict__.get("_data", content) if type(content) is RecordDict else content
    return {key: rec for key, rec in items.items() if isinstance(rec, kind)}


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of ``record`` via :func:`view` (do not modify the results in place)."""
    return {key: view(arr) for key, arr in record.items()}


_RECEIVED: OrderedDict[tuple, tuple[list[Any], OrderedDict[str, torch.Tensor]]] = OrderedDict()


def received_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``, decoded once per distinct record content in this process.

    The cache key is the identity of each array's ``bytes`` object plus its name, dtype and shape;
    the entry keeps those ``bytes`` alive, so an identity cannot be reused by different content
    while it is cached. The tensors are shared between callers: load them into a model
    (``load_state_dict`` copies), never modify them in place.
    """
    arrays = list(record.items())
    key = tuple((name, id(a.data), a.dtype, tuple(a.shape)) for name, a in arrays)
    hit = _RECEIVED.get(key)
    if hit is not None and all(ref is a.data for ref, (_, a) in zip(hit[0], arrays, strict=True)):
        _RECEIVED.move_to_end(key)
        return hit[1]
    state = OrderedDict((name, torch.from_numpy(a.numpy())) for name, a in arrays)
    _RECEIVED[key] = ([a.data for _, a in arrays], state)
    while len(_RECEIVED) > RECEIVED_CACHE_SIZE:
        _RECEIVED.popitem(last=False)
    return state
