"""The round's training replies as stacks of flattened updates, and back.

Plugins that transform or replace updates (``server/preaggregation.py``,
``server/omniscient_attack.py``) and the update-space robust rules (``server/robust.py``) read a
reply as Δ = w_reply − w_sent over its floating-point arrays, flattened in the sent record's key
order; integer buffers are left as the reply has them. Replies are grouped by the model their node
was sent (one group in FedAvg-like strategies, one per cluster in the clustered ones): updates
against different models are not comparable. A node sent several records (an IFCA candidate set)
belongs to no group; its reply passes through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from clients.arrays import as_numpy, encode, records_of


def float_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items() if v.dtype.kind == "f"]


def flatten(arrays: dict[str, np.ndarray], keys: list[str]) -> torch.Tensor:
    return torch.from_numpy(
        np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])
    )


def unflatten(
    vector: torch.Tensor, like: dict[str, np.ndarray], keys: list[str]
) -> dict[str, np.ndarray]:
    """Split ``vector`` into ``like``'s float arrays (shapes and dtypes of ``like``)."""
    out, start = {}, 0
    flat = vector.numpy()
    for k in keys:
        size = like[k].size
        out[k] = flat[start : start + size].reshape(like[k].shape).astype(like[k].dtype)
        start += size
    return out


@dataclass
class UpdateGroup:
    """Replies answering one sent model: their indices in the round's list and their updates."""

    sent: dict[str, np.ndarray]
    keys: list[str]  # floating-point keys, in the sent record's order
    indices: list[int]
    updates: torch.Tensor  # (len(indices), d) float64


def single_record(content: RecordDict) -> tuple[str, ArrayRecord] | None:
    records = records_of(content, ArrayRecord)
    return next(iter(records.items())) if len(records) == 1 else None


def group_updates(replies: list[Message], sent_by_node: dict[int, RecordDict]) -> list[UpdateGroup]:
    """Replies grouped by the ArrayRecord their node was sent (by identity: strategies share one
    record among the nodes they send the same model). Error replies and nodes that were sent
    several records are left out."""
    by_record: dict[int, tuple[ArrayRecord, list[int]]] = {}
    for i, reply in enumerate(replies):
        if reply.has_error():
            continue
        sent = sent_by_node.get(reply.metadata.src_node_id)
        sent_single = single_record(sent) if sent is not None else None
        if sent_single is None or single_record(reply.content) is None:
            continue
        record = sent_single[1]
        by_record.setdefault(id(record), (record, []))[1].append(i)
    groups = []
    for record, indices in by_record.values():
        sent_np = as_numpy(record)
        keys = float_keys(sent_np)
        sent_flat = flatten(sent_np, keys)
        rows = []
        for i in indices:
            reply_np = as_numpy(single_record(replies[i].content)[1])
            rows.append(flatten(reply_np, keys) - sent_flat)
        groups.append(UpdateGroup(sent_np, keys, indices, torch.stack(rows)))
    return groups


def set_update(reply: Message, group: UpdateGroup, update: torch.Tensor) -> None:
    """Make ``reply`` carry w_sent + ``update`` (float arrays; others as the reply had them)."""
    name, record = single_record(reply.content)
    values = dict(as_numpy(record))
    sent_flat = flatten(group.sent, group.keys)
    values.update(unflatten(sent_flat + update, group.sent, group.keys))
    content = RecordDict(dict(reply.content.items()))
    arrays = ArrayRecord()
    for key, value in values.items():
        arrays[key] = encode(np.ascontiguousarray(value))
    content[name] = arrays
    reply.content = content  # same reply and metadata; only the arrays change
