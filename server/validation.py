"""Reply validation: a :class:`RoundPlugin` that screens every training reply before any strategy
aggregates it, so one broken, malicious or stale client can never corrupt the global model.

A reply is excluded, with a logged reason, when it

- is an error reply (the client raised, dropped out, or the node vanished)        -> ``error``
- carries no single ArrayRecord, or no MetricRecord with a numeric ``num-examples`` -> ``malformed``
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

from collections import Counter
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from server.loop import arrays_finite
from server.plugins import Metrics, RoundPlugin
from server.strategies import ServerSetup

REASONS = ("error", "malformed", "keys", "shape", "nonfinite", "norm", "oversized")
WEIGHT_KEY = "num-examples"


def update_norm(reply: ArrayRecord, sent: ArrayRecord) -> float:
    r"""L2 norm of the update over all floating-point arrays: :math:`\sqrt{\sum_k \|r_k - s_k\|_2^2}`."""
    total = 0.0
    for key, arr in reply.items():
        values = arr.numpy()
        if np.issubdtype(values.dtype, np.inexact):
            diff = values.astype(np.float64) - sent[key].numpy().astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def _single_arrays(content: RecordDict) -> ArrayRecord | None:
    records = list(content.array_records.values())
    return records[0] if len(records) == 1 else None


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
        arrays = _single_arrays(content)
        if arrays is None:
            return "malformed", f"expected one ArrayRecord, got {len(content.array_records)}"
        metric_records = list(content.metric_records.values())
        if len(metric_records) != 1 or WEIGHT_KEY not in metric_records[0]:
            return "malformed", f"expected one MetricRecord holding {WEIGHT_KEY!r}"
        weight = metric_records[0][WEIGHT_KEY]
        if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
            return "malformed" if np.isfinite(weight) else "nonfinite", f"{WEIGHT_KEY}={weight!r}"

        sent_content = self._sent.get(reply.metadata.src_node_id)
        sent = _single_arrays(sent_content) if sent_content is not None else None
        if sent is not None:
            if set(arrays.keys()) != set(sent.keys()):
                missing = sorted(set(sent.keys()) - set(arrays.keys()))
                extra = sorted(set(arrays.keys()) - set(sent.keys()))
                return "keys", f"missing {missing[:5]}, unexpected {extra[:5]}"
            for key, arr in arrays.items():
                ref = sent[key]
                if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != ref.dtype:
                    return "shape", (
                        f"{key}: got {arr.dtype}{list(arr.shape)}, sent {ref.dtype}{list(ref.shape)}"
                    )
            size, limit = (
                _content_bytes(content),
                self.max_reply_factor * _content_bytes(sent_content),
            )
            if size > limit:
                return (
                    "oversized",
                    f"{size} bytes > {self.max_reply_factor:g} × {limit / self.max_reply_factor:.0f} sent",
                )
        if not arrays_finite(arrays):
            return "nonfinite", "arrays hold NaN or Inf"
        if sent is not None:
            norm = update_norm(arrays, sent)
            if norm > self.max_update_norm:
                return (
                    "norm",
                    f"||update||={norm:.3g} > robustness.max_update_norm={self.max_update_norm:g}",
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
