r"""FedAvg's weighted mean over a round's stack of updates, bit for bit what Flower computes.

Flower's ``FedAvg.aggregate_train`` reads every reply through ``RecordDict.array_records`` /
``metric_records`` (each call builds a synced copy of the record dict), parses or copies each
array (``Array.numpy()``) and adds ``w_k x_k`` one reply and one array at a time: ~50-60 µs per
reply for a small MLP, a fifth of a packed round. :class:`StackedMean` is the same method for
FedAvg-family strategies (``FedAvg``, ``FedProx``): it checks what Flower's
``validate_message_reply_consistency`` checks (any doubt: Flower's own method runs and raises as
it does), logs what Flower logs, and computes, for each array name,

.. math:: \bar x = \sum_k \frac{w_k}{\sum_j w_j} x_k

over the replies' arrays stacked as one ``(clients, *shape)`` array (the packed engine's replies
already are rows of one: ``clients/arrays.py::stacked_values``), with the products in the arrays'
dtype and the sum taken in reply order, as Flower does: same bits (tests/test_stacked_mean.py).
The metrics go through the strategy's ``train_metrics_aggr_fn`` as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from clients.arrays import encode, stacked_values

# Rows of products held at once per array name (bounds memory for large models and rounds).
BLOCK_BYTES = 64 * 2**20


class StackedMean:
    """Mixin for a Flower ``FedAvg`` subclass: ``aggregate_train`` over the stacked replies."""

    weighted_by_key: str
    train_metrics_aggr_fn: object

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [r for r in replies if not r.has_error()]
        contents = [r.content for r in valid]
        arrays = _single_array_records(contents, self.weighted_by_key)
        if not valid or arrays is None:  # Flower's own method: its checks, errors and results
            return super().aggregate_train(server_round, replies)  # type: ignore[misc]
        weights = [_metrics(c)[self.weighted_by_key] for c in contents]
        total = sum(weights)
        factors = [w / total for w in weights]
        mean = ArrayRecord()
        try:
            for key in arrays[0]:
                mean[key] = encode(weighted_sum([rec[key] for rec in arrays], factors))
        except ValueError:  # arrays whose bytes disagree with their declared shape: Flower's way
            return super().aggregate_train(server_round, replies)  # type: ignore[misc]
        failures = [r for r in replies if r.has_error()]
        log(INFO, "aggregate_train: Received %s results and %s failures", len(valid), len(failures))
        for msg in failures:
            reason = msg.error.reason
            log(
                INFO,
                "\t> Received error in reply from node %d: %s",
                msg.metadata.src_node_id,
                reason,
            )
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)  # type: ignore[operator]
        return mean, metrics


def weighted_sum(arrays: list, factors: list[float]) -> np.ndarray:
    """``sum_k factors[k] * arrays[k]`` as Flower's ``aggregate_arrayrecords`` computes it: each
    product in the array's dtype (a Python float is cast to it), summed in order."""
    first = stacked_values(arrays[:1])
    dtype = first.dtype
    row_bytes = max(1, first.nbytes)
    block = max(1, BLOCK_BYTES // row_bytes)
    out: np.ndarray | None = None
    for start in range(0, len(arrays), block):
        rows = stacked_values(arrays[start : start + block])
        scale = np.asarray(factors[start : start + block], dtype=np.float64).astype(dtype)
        products = rows * scale.reshape(-1, *([1] * (rows.ndim - 1)))
        if out is not None:  # the running sum first, then this block's rows, in order
            products = np.concatenate([out[None], products])
        # Reducing the leading axis adds the rows one after the other (no pairwise summation
        # across rows), as Flower's `aggregated += value * weight` does.
        out = np.add.reduce(products, axis=0)
    assert out is not None
    return np.ascontiguousarray(out)


def _metrics(content: RecordDict) -> MetricRecord:
    return next(r for r in content.values() if isinstance(r, MetricRecord))


def _single_array_records(contents: list[RecordDict], weight_key: str) -> list[ArrayRecord] | None:
    """Each reply's one ArrayRecord when the replies pass Flower's consistency checks (one
    ArrayRecord with the same keys, one MetricRecord with the same keys holding a scalar
    ``weight_key``) and hold float32/float64 arrays of equal shapes; else None."""
    if not contents:
        return None
    arrays: list[ArrayRecord] = []
    first_name = first_keys = first_metric_name = metric_keys = None
    for content in contents:
        array_records = [(n, r) for n, r in content.items() if isinstance(r, ArrayRecord)]
        metric_records = [(n, r) for n, r in content.items() if isinstance(r, MetricRecord)]
        if len(array_records) != 1 or len(metric_records) != 1:
            return None
        (name, record), (metric_name, metrics) = array_records[0], metric_records[0]
        if first_name is None:
            first_name, first_keys = name, record.keys()
            first_metric_name, metric_keys = metric_name, metrics.keys()
            if weight_key not in metrics:
                return None
        # Flower looks each reply's records up by the first reply's names
        if name != first_name or record.keys() != first_keys:
            return None
        if metric_name != first_metric_name or metrics.keys() != metric_keys:
            return None
        weight = metrics[weight_key]
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            return None
        arrays.append(record)
    entries = [rec.__dict__["_data"] for rec in arrays]  # (TypedDict lookups cost µs here)
    for key, arr in entries[0].items():
        if arr.dtype not in ("float32", "float64"):
            return None
        dtype, shape = arr.dtype, tuple(arr.shape)
        if any(e[key].dtype != dtype or tuple(e[key].shape) != shape for e in entries):
            return None
    return arrays
