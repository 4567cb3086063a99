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
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from algorithms.lora_sparse import is_sparse_encoded
from clients.arrays import as_numpy, records_of  # in-process replies are read without parsing
from server.plugins import Metrics, RoundPlugin
from server.strategies import ServerSetup

REASONS = ("error", "malformed", "keys", "shape", "nonfinite", "norm", "oversized")
WEIGHT_KEY = "num-examples"


def update_norm(reply: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> float:
    r"""L2 norm of the update over all floating-point arrays: :math:`\sqrt{\sum_k \|r_k - s_k\|_2^2}`."""
    total = 0.0
    for key, values in reply.items():
        if values.dtype.kind == "f":  # cast-and-subtract in one ufunc call: same float64 values
            diff = np.subtract(values, sent[key], dtype=np.float64).ravel()
        elif values.dtype.kind == "c":
            diff = (values.astype(np.float64) - sent[key].astype(np.float64)).ravel()
        else:
            continue
        total += float(np.sum(diff * diff))  # np.dot goes to a threaded BLAS: 30x slower here
    return float(np.sqrt(total))


def all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in arrays.values() if np.issubdtype(v.dtype, np.inexact))


def _reference_pairs(
    content: RecordDict, sent: RecordDict | None
) -> list[tuple[str, ArrayRecord, ArrayRecord | None]]:
    """Each ArrayRecord of a reply with the one it answers: the sent record of the same name, or
    the only one sent when both sides carry a single record (its name may differ)."""
    sent_records = records_of(sent, ArrayRecord) if sent is not None else {}
    replies = records_of(content, ArrayRecord)
    if len(replies) == 1 and len(sent_records) == 1:
        (name, arrays), (ref,) = next(iter(replies.items())), sent_records.values()
        return [(name, arrays, ref)]
    return [(name, arrays, sent_records.get(name)) for name, arrays in replies.items()]


def _sparse_problem(name: str, arrays: ArrayRecord) -> tuple[str, str] | None:
    """Structure of a sparse reply: every ``k.indices`` has a ``k.values`` of the same 1-D length,
    indices are integers, values are floats."""
    tensors = as_numpy(arrays)
    stems = {k.removesuffix(".indices") for k in tensors if k.endswith(".indices")}
    stems |= {k.removesuffix(".values") for k in tensors if k.endswith(".values")}
    for stem in sorted(stems):
        values, indices = tensors.get(f"{stem}.values"), tensors.get(f"{stem}.indices")
        if values is None or indices is None:
            return "keys", f"{name}: sparse tensor {stem!r} lacks its values or indices"
        if values.ndim != 1 or indices.shape != values.shape:
            return "shape", f"{stem}: values {list(values.shape)} vs indices {list(indices.shape)}"
        if not np.issubdtype(indices.dtype, np.integer) or values.dtype != np.float32:
            return "shape", f"{stem}: indices {indices.dtype}, values {values.dtype}"
    return None


def _sparse_update_sq(tensors: dict[str, np.ndarray]) -> float:
    """Squared norm of a sparse update: its values *are* the (adapter) update entries."""
    return float(
        sum(np.sum(v.astype(np.float64) ** 2) for k, v in tensors.items() if k.endswith(".values"))
    )


def _content_bytes(content: RecordDict) -> int:
    return sum(
        rec.count_bytes()
        for rec in content.values()
        if isinstance(rec, ArrayRecord | MetricRecord | ConfigRecord)
    )


class ReplyValidator(RoundPlugin):
    """Excludes invalid training replies (see the module docstring); works with any strategy."""

    def __init__(self, max_update_norm: float, max_reply_factor: float, min_valid: int) -> None:
        self.max_update_norm = max_update_norm
        self.max_reply_factor = max_reply_factor
        self.min_valid = min_valid
        self._sent: dict[int, RecordDict] = {}
        self._sent_numpy: dict[int, dict[str, np.ndarray]] = {}
        self._sent_bytes: dict[int, int] = {}
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
        # By id(): strategies send one shared RecordDict to many nodes; decode and size it once.
        self._sent_numpy: dict[int, dict[str, np.ndarray]] = {}
        self._sent_bytes: dict[int, int] = {}

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
        if not records_of(content, ArrayRecord):
            return "malformed", "the reply carries no ArrayRecord"
        metric_records = list(records_of(content, MetricRecord).values())
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
            if id(sent_content) not in self._sent_bytes:
                self._sent_bytes[id(sent_content)] = _content_bytes(sent_content)
            size, sent_size = _content_bytes(content), self._sent_bytes[id(sent_content)]
            if size > self.max_reply_factor * sent_size:
                return "oversized", (
                    f"{size} bytes > robustness.max_reply_factor={self.max_reply_factor:g} "
                    f"× {sent_size} bytes sent"
                )
        decoded = [(as_numpy(a), ref) for _, a, ref in pairs]
        squared, unscanned = 0.0, []
        for values, ref in decoded:
            if is_sparse_encoded(values.keys()):
                squared += _sparse_update_sq(values)
                unscanned.append(values)
            elif ref is not None:
                squared += update_norm(values, self._numpy_of_sent(ref)) ** 2
            else:
                unscanned.append(values)
        # A finite sum of squared differences to a (finite) sent model means every compared value
        # is finite: scan for NaN/Inf only when it is not, and where nothing was compared.
        suspect = not math.isfinite(squared) or not all(all_finite(v) for v in unscanned)
        if suspect and not all(all_finite(values) for values, _ in decoded):
            return "nonfinite", "arrays hold NaN or Inf"
        if math.sqrt(squared) > self.max_update_norm:
            return "norm", (
                f"||update||={math.sqrt(squared):.3g} > "
                f"robustness.max_update_norm={self.max_update_norm:g}"
            )
        return None

    def _common_metric_keys(self, replies: list[Message]) -> list[Message]:
        """Flower's strategies need identical metric keys in all replies: keep the common ones."""
        key_sets = [
            set(next(iter(records_of(r.content, MetricRecord).values())).keys()) for r in replies
        ]
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
            name, rec = next(iter(records_of(r.content, MetricRecord).items()))
            if set(rec.keys()) == common:
                out.append(r)
                continue
            content = RecordDict(dict(r.content.items()))
            content[name] = MetricRecord({k: v for k, v in rec.items() if k in common})
            r.content = content  # same reply, same metadata; only the metric record is narrowed
            out.append(r)
        return out
