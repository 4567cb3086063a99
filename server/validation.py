"""Reply validation: a :class:`RoundPlugin` that screens every training reply before any strategy
aggregates it, so one broken, malicious or stale client can never corrupt the global model.

A reply is excluded, with a logged reason, when it

- is an error reply (the client raised, dropped out, or the node vanished)        -> ``error``
- carries no ArrayRecord, or not one MetricRecord with a positive ``num-examples``  -> ``malformed``
- has array keys other than the ones it was sent                                  -> ``keys``
- has an array whose shape or dtype differs from the one it was sent              -> ``shape``
- holds NaN or ±Inf anywhere (arrays or ``num-examples``)                          -> ``nonfinite``
- moved the model further than ``robustness.max_update_norm``: ``||w_client - w_sent||_2``  -> ``norm``
- is more than ``robustness.max_reply_factor`` times the size of what it was sent   -> ``oversized``

Each round records ``num_invalid`` and ``num_invalid_<reason>``. If fewer than
``federation.min_train_clients`` valid replies remain, no reply is passed on: the round is skipped
(the global model is unchanged) and ``round_skipped = 1`` is recorded.

Client extras are optional: when valid replies carry different metric keys (e.g. a stock Flower
client next to fedge's own), only the keys common to all are kept, and that is logged once.
Replies are compared with what *that node* was sent, so strategies that send different models to
different clients (clustered, personalized) are checked correctly too.
"""

from __future__ import annotations

import math
from collections import Counter
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from algorithms.lora_sparse import PACKET_KEY, decode_packet, is_sparse_encoded
from server.plugins import Metrics, RoundPlugin
from server.strategies import ServerSetup

REASONS = ("error", "malformed", "keys", "shape", "nonfinite", "norm", "oversized")
WEIGHT_KEY = "num-examples"


def update_norm(reply: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> float:
    r"""L2 norm of the update over all floating-point arrays: :math:`\sqrt{\sum_k \|r_k - s_k\|_2^2}`."""
    total = 0.0
    for key, values in reply.items():
        if np.issubdtype(values.dtype, np.inexact):
            diff = (values.astype(np.float64) - sent[key].astype(np.float64)).ravel()
            total += float(np.sum(diff * diff))  # np.dot goes to a threaded BLAS: 30x slower here
    return float(np.sqrt(total))


def all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in arrays.values() if np.issubdtype(v.dtype, np.inexact))


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Deserialize once (``Array.numpy()`` decodes bytes on every call)."""
    return {key: arr.numpy() for key, arr in record.items()}


def _reference_pairs(
    content: RecordDict, sent: RecordDict | None
) -> list[tuple[str, ArrayRecord, ArrayRecord | None]]:
    """Each ArrayRecord of a reply with the one it answers: the sent record of the same name, or
    the only one sent when both sides carry a single record (its name may differ)."""
    sent_records = dict(sent.array_records) if sent is not None else {}
    replies = dict(content.array_records)
    if len(replies) == 1 and len(sent_records) == 1:
        (name, arrays), (ref,) = next(iter(replies.items())), sent_records.values()
        return [(name, arrays, ref)]
    return [(name, arrays, sent_records.get(name)) for name, arrays in replies.items()]


def _sparse_problem(name: str, arrays: ArrayRecord) -> tuple[str, str] | None:
    """Structure of a LoRA packet reply: exactly one packet that decodes (header, sizes, indices)."""
    if set(arrays.keys()) != {PACKET_KEY}:
        return (
            "keys",
            f"{name}: a LoRA reply carries only {PACKET_KEY!r}, got {sorted(arrays.keys())}",
        )
    try:
        values = decode_packet(as_numpy(arrays)[PACKET_KEY])
    except ValueError as err:
        return "shape", f"{name}: {err}"
    if not bool(values.isfinite().all()):  # bytes are always finite; the values they encode not
        return "nonfinite", f"{name}: the LoRA packet's values hold NaN or Inf"
    return None


def _sparse_update_sq(tensors: dict[str, np.ndarray]) -> float:
    """Squared norm of a LoRA packet: its decoded values *are* the (adapter) update entries."""
    return float(decode_packet(tensors[PACKET_KEY]).double().pow(2).sum())


def _content_bytes(content: RecordDict) -> int:
    arrays = sum(r.count_bytes() for r in content.array_records.values())
    others = sum(r.count_bytes() for r in content.metric_records.values())
    return arrays + others + sum(r.count_bytes() for r in content.config_records.values())


class ReplyValidator(RoundPlugin):
    """Excludes invalid training replies (see the module docstring); works with any strategy."""

    def __init__(self, max_update_norm: float, max_reply_factor: float, min_valid: int) -> None:
        self.max_update_norm = max_update_norm
        self.max_reply_factor = max_reply_factor
        self.min_valid = min_valid
        self._sent: dict[int, RecordDict] = {}
        self._sent_numpy: dict[int, dict[str, np.ndarray]] = {}
        self._warned_extras = False
        self.total_invalid: Counter[str] = Counter()

    @classmethod
    def from_setup(cls, setup: ServerSetup) -> ReplyValidator:
        rob = setup.scenario.robustness
        return cls(
            rob.max_update_norm, rob.max_reply_factor, setup.scenario.federation.min_train_clients
        )

    # RoundPlugin -----------------------------------------------------------------------------
    def observe_train_instructions(self, server_round: int, instructions: list[Message]) -> None:
        self._sent = {m.metadata.dst_node_id: m.content for m in instructions}
        self._sent_numpy: dict[
            int, dict[str, np.ndarray]
        ] = {}  # by id(): shared models decode once

    def _numpy_of_sent(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        if id(record) not in self._sent_numpy:
            self._sent_numpy[id(record)] = as_numpy(record)
        return self._sent_numpy[id(record)]

    def filter_train_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], Metrics]:
        kept: list[Message] = []
        invalid: Counter[str] = Counter()
        for reply in replies:
            reason = self.check(reply)
            if reason is None:
                kept.append(reply)
                continue
            kind, detail = reason
            invalid[kind] += 1
            log(
                WARNING,
                "round %d: excluded reply from node %d (%s): %s",
                server_round,
                reply.metadata.src_node_id,
                kind,
                detail,
            )
        self.total_invalid.update(invalid)
        metrics: Metrics = {"num_invalid": sum(invalid.values())}
        metrics.update({f"num_invalid_{k}": invalid[k] for k in REASONS})
        metrics["num_valid"] = len(kept)
        if len(kept) < self.min_valid:
            log(
                WARNING,
                "round %d skipped: %d valid replies < federation.min_train_clients=%d; "
                "the global model is unchanged",
                server_round,
                len(kept),
                self.min_valid,
            )
            metrics["round_skipped"] = 1
            return [], metrics
        metrics["round_skipped"] = 0
        return self._common_metric_keys(kept), metrics

    def state(self) -> dict:
        return {"total_invalid": dict(self.total_invalid)}

    def load_state(self, state: dict) -> None:
        self.total_invalid = Counter(state.get("total_invalid", {}))

    # checks ----------------------------------------------------------------------------------
    def check(self, reply: Message) -> tuple[str, str] | None:
        """``None`` if the reply may be aggregated, else ``(reason, detail)``."""
        if reply.has_error():
            return "error", reply.error.reason
        content = reply.content
        if not content.array_records:
            return "malformed", "the reply carries no ArrayRecord"
        metric_records = list(content.metric_records.values())
        if len(metric_records) != 1 or WEIGHT_KEY not in metric_records[0]:
            return "malformed", f"expected one MetricRecord holding {WEIGHT_KEY!r}"
        weight = metric_records[0][WEIGHT_KEY]
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            return "malformed", f"{WEIGHT_KEY}={weight!r} is not a number"
        if not np.isfinite(weight):
            return "nonfinite", f"{WEIGHT_KEY}={weight!r}"
        if weight <= 0:
            return "malformed", f"{WEIGHT_KEY}={weight!r} must be positive"

        sent_content = self._sent.get(reply.metadata.src_node_id)
        pairs = _reference_pairs(content, sent_content)
        for name, arrays, sent in pairs:
            if is_sparse_encoded(arrays.keys()):
                # A sparse update (values + indices) has its own keys by design and the strategy
                # decodes it; check its structure here, finiteness and size below.
                problem = _sparse_problem(name, arrays)
                if problem is not None:
                    return problem
                continue
            if sent is None:
                continue
            if set(arrays.keys()) != set(sent.keys()):
                missing = sorted(set(sent.keys()) - set(arrays.keys()))
                extra = sorted(set(arrays.keys()) - set(sent.keys()))
                return "keys", f"{name}: missing {missing[:5]}, unexpected {extra[:5]}"
            for key, arr in arrays.items():
                ref = sent[key]
                if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != ref.dtype:
                    return "shape", (
                        f"{key}: got {arr.dtype}{list(arr.shape)}, sent {ref.dtype}{list(ref.shape)}"
                    )
        if sent_content is not None:
            size, sent_size = _content_bytes(content), _content_bytes(sent_content)
            if size > self.max_reply_factor * sent_size:
                return "oversized", (
                    f"{size} bytes > robustness.max_reply_factor={self.max_reply_factor:g} "
                    f"× {sent_size} bytes sent"
                )
        decoded = [(as_numpy(a), ref) for _, a, ref in pairs]
        if not all(all_finite(values) for values, _ in decoded):
            return "nonfinite", "arrays hold NaN or Inf"
        squared = sum(
            _sparse_update_sq(values)
            if is_sparse_encoded(values.keys())
            else update_norm(values, self._numpy_of_sent(ref)) ** 2
            for values, ref in decoded
            if ref is not None or is_sparse_encoded(values.keys())
        )
        if math.sqrt(squared) > self.max_update_norm:
            return "norm", (
                f"||update||={math.sqrt(squared):.3g} > "
                f"robustness.max_update_norm={self.max_update_norm:g}"
            )
        return None

    def _common_metric_keys(self, replies: list[Message]) -> list[Message]:
        """Flower's strategies need identical metric keys in all replies: keep the common ones."""
        key_sets = [set(next(iter(r.content.metric_records.values())).keys()) for r in replies]
        common = set.intersection(*key_sets) if key_sets else set()
        if all(keys == common for keys in key_sets):
            return replies
        if not self._warned_extras:
            dropped = sorted(set.union(*key_sets) - common)
            log(
                WARNING,
                "some clients send metrics others do not (%s): aggregating only the common ones; "
                "client-side extras are ignored for those rounds",
                ", ".join(dropped),
            )
            self._warned_extras = True
        out = []
        for r in replies:
            name, rec = next(iter(r.content.metric_records.items()))
            if set(rec.keys()) == common:
                out.append(r)
                continue
            content = RecordDict(dict(r.content.items()))
            content[name] = MetricRecord({k: v for k, v in rec.items() if k in common})
            r.content = content  # same reply, same metadata; only the metric record is narrowed
            out.append(r)
        return out
