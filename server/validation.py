"""Reply validation: a :class:`RoundPlugin` that screens every training reply before any strategy
aggregates it, so one broken, malicious or stale client can never corrupt the global model.

A reply is excluded, with a logged reason, when it

- is an error reply (the client raised, dropped out, or the node vanished)        -> ``error``
- carries no ArrayRecord, not one MetricRecord with a positive ``num-examples`` (at most
  ``MAX_NUM_EXAMPLES``), metrics that are not numbers, answers an instruction its node was never
  sent, or cannot be decoded at all                                                -> ``malformed``
- has array keys other than the ones it was sent                                  -> ``keys``
- has an array whose shape or dtype differs from the one it was sent              -> ``shape``
- holds NaN or ±Inf anywhere (arrays or metrics)                                   -> ``nonfinite``
- moved the model further than ``robustness.max_update_norm``: ``||w_client - w_sent||_2``, or
  (``robustness.relative_norm_bound`` = c > 0) further than c × the round's median update norm  -> ``norm``
- is more than ``robustness.max_reply_factor`` times the size of what it was sent   -> ``oversized``

Each round records ``num_invalid`` and ``num_invalid_<reason>``. If fewer than
``federation.min_train_clients`` valid replies remain, no reply is passed on: the round is skipped
(the global model is unchanged) and ``round_skipped = 1`` is recorded.

The rule: a reply can fail its own node, never the server. ``check`` never raises (anything it
cannot read is ``malformed``), and what it passes is what every strategy can aggregate: one
ArrayRecord per record sent, the same keys, and shapes/dtypes of the *decoded* arrays equal to
what was sent. The LoRA packet encoding (one ``lora.packet`` array, see ``algorithms/lora_sparse.py``)
is accepted only from runs whose algorithm aggregates it (``lora_sparse``), when it decodes to
exactly the adapters' size with finite values; elsewhere a stray packet key is an unexpected key.
A LoRA reply's size is bounded by the dense adapters, since its downlink can be nearly empty.

Client extras are optional: when valid replies carry different metric keys (e.g. a stock Flower
client next to fedge's own), only the keys common to all are kept, and that is logged once.
Replies are compared with what *that node* was sent, so strategies that send different models to
different clients (clustered, personalized) are checked correctly too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from algorithms.lora_sparse import (
    PACKET_KEY,
    decode_packet,
    dense_packet_bytes,
    is_sparse_encoded,
)
from clients.arrays import (  # in-process replies are read without parsing
    as_numpy,
    record_bytes,
    records_of,
    stacked_values,
)
from server.plugins import Metrics, RoundPlugin
from server.strategies import ServerSetup

REASONS = ("error", "malformed", "keys", "shape", "nonfinite", "norm", "oversized")
WEIGHT_KEY = "num-examples"
# A client claiming more samples than any simulation holds would outweigh every other reply.
MAX_NUM_EXAMPLES = 10**9
# Metrics strategies read as identities (int() of them picks a model or a cluster): integers only.
IDENTITY_KEYS = ("partition-id", "device-index", "cluster-id")


def update_norm(reply: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> float:
    r"""L2 norm of the update over all floating-point arrays: :math:`\sqrt{\sum_k \|r_k - s_k\|_2^2}`."""
    total = 0.0
    for key, values in reply.items():
        if values.dtype.kind == "f":  # cast-and-subtract in one ufunc call: same float64 values
            diff = np.subtract(values, sent[key], dtype=np.float64)
        elif values.dtype.kind == "c":
            diff = values.astype(np.float64) - sent[key].astype(np.float64)
        else:
            continue
        # np.sum's sum, minus its Python wrapper (a third of the time for small arrays); np.dot
        # goes to a threaded BLAS: 30x slower on a busy machine
        total += float(np.add.reduce(np.multiply(diff, diff, out=diff), axis=None))
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


def _sparse_problem(name: str, tensors: dict[str, np.ndarray], size: int) -> tuple[str, str] | None:
    """Structure of a LoRA packet reply: it decodes (header, sizes, indices) to ``size`` entries
    (the adapters' total) with finite values (bytes are always finite; the values they encode not)."""
    try:
        values = decode_packet(tensors[PACKET_KEY], size)
    except ValueError as err:
        return "shape", f"{name}: {err}"
    if not bool(values.isfinite().all()):
        return "nonfinite", f"{name}: the LoRA packet's values hold NaN or Inf"
    return None


def _metric_problem(metrics: MetricRecord) -> tuple[str, str] | None:
    """``num-examples`` a positive, finite, plausible number; every other metric finite numbers."""
    weight = metrics[WEIGHT_KEY]
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        return "malformed", f"{WEIGHT_KEY}={weight!r} is not a number"
    if isinstance(weight, float) and not math.isfinite(weight):
        return "nonfinite", f"{WEIGHT_KEY}={weight!r}"
    if weight <= 0:
        return "malformed", f"{WEIGHT_KEY}={weight!r} must be positive"
    if weight > MAX_NUM_EXAMPLES:
        return (
            "malformed",
            f"{WEIGHT_KEY}={weight:.3g} is implausibly large (> {MAX_NUM_EXAMPLES:g})",
        )
    for key in IDENTITY_KEYS:
        if key not in metrics:  # (Mapping.get raises and catches inside: slow)
            continue
        value = metrics[key]
        integral = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
        if not (integral and abs(value) < 2**63):
            return "malformed", f"{key}={value!r} must be an integer"
    for key, value in metrics.items():
        kind = type(value)  # plain floats and ints first: the checks below, answered directly
        if kind is float and math.isfinite(value) or kind is int and abs(value) <= 2**63 - 1:
            continue
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            return "malformed", f"metric {key!r} is not a number or list of numbers"
        if not all(math.isfinite(v) for v in items if isinstance(v, float)):
            return "nonfinite", f"metric {key!r} holds NaN or Inf"
        if any(isinstance(v, int) and abs(v) > 2**63 - 1 for v in items):
            return "malformed", f"metric {key!r} does not fit in 64 bits"
    return None


def _sparse_update_sq(tensors: dict[str, np.ndarray]) -> float:
    """Squared norm of a LoRA packet: its decoded values *are* the (adapter) update entries."""
    return float(decode_packet(tensors[PACKET_KEY]).double().pow(2).sum())


def _content_bytes(content: RecordDict) -> int:
    return sum(
        record_bytes(rec)
        for rec in content.values()
        if isinstance(rec, ArrayRecord | MetricRecord | ConfigRecord)
    )


def _squared_update_norms(
    records: list[tuple[ArrayRecord, dict[str, np.ndarray]]],
    reference: dict[str, np.ndarray],
    block_bytes: int = 64 * 2**20,
) -> np.ndarray:
    """``update_norm(values, reference) ** 2`` for each ``(record, values)`` (values: the record's
    decoded arrays, with the keys, shapes and dtypes of ``reference``, in the same key order for
    all), computed over the stacked records: one subtraction per array name for a block of
    records instead of one per record and name. The sums run in the same order, so the values
    are update_norm's to the last bit."""
    keys = list(records[0][1])
    out = np.empty(len(records))
    # float64 differences of this many records at a time (bounds memory for large models)
    block = max(1, block_bytes // max(1, 8 * sum(reference[k].size for k in keys)))
    for start in range(0, len(records), block):
        chunk = records[start : start + block]
        total = np.zeros(len(chunk))
        for key in keys:
            ref = reference[key]
            if ref.dtype.kind not in "fc":
                continue
            # (decoded already: stacked rows, or the values _check read)
            rows = stacked_values([rec[key] for rec, _ in chunk], [v[key] for _, v in chunk])
            if ref.dtype.kind == "f":
                diff = np.subtract(rows, ref, dtype=np.float64)
            else:
                diff = rows.astype(np.float64) - ref.astype(np.float64)
            diff = diff.reshape(len(chunk), -1)
            total += np.add.reduce(np.multiply(diff, diff, out=diff), axis=1)
        out[start : start + len(chunk)] = np.sqrt(total) ** 2  # update_norm's sqrt, squared
    return out


@dataclass
class _DeferredNorm:
    """A reply that passed every check but the norm: its record, decoded arrays, record sent."""

    arrays: ArrayRecord
    values: dict[str, np.ndarray]
    sent: ArrayRecord


def _named_as_sent(content: RecordDict, sent: RecordDict) -> bool:
    """True when ``content`` is ``{<the one ArrayRecord's name sent>: ArrayRecord, "metrics":
    MetricRecord, <ConfigRecords>...}`` in this order: what ``_canonical`` would leave as it is."""
    items = list(content.items())
    if len(items) < 2 or items[1][0] != "metrics" or not isinstance(items[1][1], MetricRecord):
        return False
    sent_arrays = [name for name, rec in sent.items() if isinstance(rec, ArrayRecord)]
    return (
        sent_arrays == [items[0][0]]
        and isinstance(items[0][1], ArrayRecord)
        and all(isinstance(rec, ConfigRecord) for _, rec in items[2:])
    )


class ReplyValidator(RoundPlugin):
    """Excludes invalid training replies (see the module docstring); works with any strategy."""

    def __init__(
        self,
        max_update_norm: float,
        max_reply_factor: float,
        min_valid: int,
        sparse_size: int | None = None,
        array_records_per_reply: int | None = 1,
        relative_norm_bound: float = 0.0,
    ) -> None:
        """``sparse_size``: total adapter entries when the strategy aggregates packed sparse
        replies (``lora_sparse``); None refuses the sparse encoding. ``array_records_per_reply``:
        how many ArrayRecords a reply must carry (every strategy in fedge aggregates exactly one,
        as Flower's FedAvg demands); None allows one per record sent, matched by name."""
        self.sparse_size = sparse_size
        self.array_records_per_reply = array_records_per_reply
        # > 0: also exclude updates longer than this multiple of the round's median update norm
        self.relative_norm_bound = relative_norm_bound
        self._norms: dict[int, tuple[bool, float]] = {}  # node -> (sparse?, update norm)
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
        sparse_size = None
        if getattr(setup.scenario.algorithm, "sparse_replies", False):
            from edge.lora import initial_factors

            factors = initial_factors(setup.model, setup.scenario.algorithm, setup.scenario.seed)
            sparse_size = sum(t.numel() for t in factors.values())
        return cls(
            rob.max_update_norm,
            rob.max_reply_factor,
            setup.scenario.federation.min_train_clients,
            sparse_size,
            relative_norm_bound=rob.relative_norm_bound,
        )

    # RoundPlugin -----------------------------------------------------------------------------
    def observe_train_instructions(self, server_round: int, instructions: list[Message]) -> None:
        self._sent = {m.metadata.dst_node_id: m.content for m in instructions}
        self._norms = {}
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
        for reply, reason in zip(replies, self._check_round(replies), strict=True):
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
        kept, outliers = self._relative_norm_outliers(server_round, kept)
        invalid["norm"] += outliers
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
        return self._common_metric_keys([self._canonical(r) for r in kept]), metrics

    def _relative_norm_outliers(
        self, server_round: int, kept: list[Message]
    ) -> tuple[list[Message], int]:
        r"""Drop updates with :math:`\|\Delta_k\| > c \cdot \mathrm{median}_j \|\Delta_j\|`
        (``c = robustness.relative_norm_bound``): a bound that follows the round, unlike an
        absolute one that either misses small attacks or rejects every honest update of a model
        already thrown off course. The median needs honest majority: with 3+ replies only."""
        if self.relative_norm_bound <= 0 or len(kept) < 3:
            return kept, 0
        # A reply that picked one of several models sent (IFCA) has no update norm we can trust;
        # a LoRA packet's norm and a dense client's (a mixed federation) measure different
        # things: each kind is bounded by its own median.
        measured = [self._norms.get(r.metadata.src_node_id) for r in kept]
        limits: dict[bool, float] = {}
        for sparse in (False, True):
            same_kind = [m[1] for m in measured if m is not None and m[0] == sparse]
            if len(same_kind) >= 3:
                limits[sparse] = self.relative_norm_bound * float(np.median(same_kind))
        if not limits:
            return kept, 0
        out, norms, bounds = [], [], []
        for r, m in zip(kept, measured, strict=True):
            norm, limit = (0.0, math.inf) if m is None else (m[1], limits.get(m[0], math.inf))
            norms.append(norm)
            bounds.append(limit)
            if norm <= limit:
                out.append(r)
        for r, n, limit in zip(kept, norms, bounds, strict=True):
            if n > limit:
                log(
                    WARNING,
                    "round %d: excluded reply from node %d (norm): ||update||=%.3g > "
                    "robustness.relative_norm_bound=%g × the round's median %.3g",
                    server_round,
                    r.metadata.src_node_id,
                    n,
                    self.relative_norm_bound,
                    limit / self.relative_norm_bound,
                )
        return out, len(kept) - len(out)

    def state(self) -> dict:
        return {"total_invalid": dict(self.total_invalid)}

    def load_state(self, state: dict) -> None:
        self.total_invalid = Counter(state.get("total_invalid", {}))

    # checks ----------------------------------------------------------------------------------
    def check(self, reply: Message) -> tuple[str, str] | None:
        """``None`` if the reply may be aggregated, else ``(reason, detail)``. Never raises."""
        try:
            return self._check(reply)
        except Exception as err:  # a reply can fail its own node, never the server
            return "malformed", f"the reply cannot be read ({type(err).__name__}: {err})"[:300]

    def _check_round(self, replies: list[Message]) -> list[tuple[str, str] | None]:
        """``check`` of every reply, with the update norms of the replies that answer the same
        sent record with exactly its array names, shapes and dtypes computed for them all at
        once (``_squared_update_norms``: the same values). A reply whose stacked norm is not
        finite is checked again on its own, so every reason is ``check``'s."""
        reasons: list[tuple[str, str] | None] = []
        pending: dict[tuple, tuple[ArrayRecord, list]] = {}  # (id(sent), keys) -> sent, replies
        for pos, reply in enumerate(replies):
            try:
                reason = self._check(reply, defer_norm=True)
            except Exception:  # check() says why
                reason = self.check(reply)
            if isinstance(reason, _DeferredNorm):
                key = (id(reason.sent), tuple(reason.values))
                group = pending.setdefault(key, (reason.sent, []))[1]
                group.append((pos, reply, reason.arrays, reason.values))
                reason = None
            reasons.append(reason)
        for sent, group in pending.values():
            try:
                reference = self._numpy_of_sent(sent)
                with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf: check() says
                    squared = _squared_update_norms([(a, v) for _, _, a, v in group], reference)
            except Exception:  # never the server's failure: each reply on its own, as check()
                squared = np.full(len(group), np.nan)
            for (pos, reply, _, _), sq in zip(group, squared.tolist(), strict=True):
                reasons[pos] = (
                    self._norm_reason(reply, sq) if math.isfinite(sq) else self.check(reply)
                )
        return reasons

    def _norm_reason(
        self, reply: Message, squared: float, sparse: bool = False
    ) -> tuple[str, str] | None:
        """The norm bound on a reply whose squared update norm is ``squared`` (recorded if kept,
        with whether it measured a sparse LoRA packet: the relative bound compares like with
        like)."""
        if not math.sqrt(squared) <= self.max_update_norm:
            return "norm", (
                f"||update||={math.sqrt(squared):.3g} > "
                f"robustness.max_update_norm={self.max_update_norm:g}"
            )
        sent = self._sent[reply.metadata.src_node_id]
        if len(records_of(reply.content, ArrayRecord)) == len(records_of(sent, ArrayRecord)):
            # not when it answers one of several models sent (an IFCA candidate set): its norm
            # against the record of the same name would measure the distance between models
            self._norms[reply.metadata.src_node_id] = (sparse, math.sqrt(squared))
        return None

    def _check(
        self, reply: Message, defer_norm: bool = False
    ) -> tuple[str, str] | _DeferredNorm | None:
        """``check``'s reasons; with ``defer_norm``, a reply that passes everything up to its
        update norm (one dense record answering one sent record) returns what the norm needs."""
        if reply.has_error():
            return "error", reply.error.reason
        content = reply.content
        if not records_of(content, ArrayRecord):
            return "malformed", "the reply carries no ArrayRecord"
        metric_records = list(records_of(content, MetricRecord).values())
        if len(metric_records) != 1 or WEIGHT_KEY not in metric_records[0]:
            return "malformed", f"expected one MetricRecord holding {WEIGHT_KEY!r}"
        problem = _metric_problem(metric_records[0])
        if problem is not None:
            return problem

        sent_content = self._sent.get(reply.metadata.src_node_id)
        if sent_content is None:
            return "malformed", f"node {reply.metadata.src_node_id} was sent no instruction"
        pairs = _reference_pairs(content, sent_content)
        expected = self.array_records_per_reply
        if any(ref is None for _, _, ref in pairs) or (expected and len(pairs) != expected):
            return "keys", (
                f"ArrayRecords {sorted(content.array_records)} do not answer the record(s) sent "
                f"{sorted(sent_content.array_records)}"
                + (f" with exactly {expected}" if expected else "")
            )
        if id(sent_content) not in self._sent_bytes:
            self._sent_bytes[id(sent_content)] = _content_bytes(sent_content)
        size, sent_size = _content_bytes(content), self._sent_bytes[id(sent_content)]
        if self.sparse_size is not None:  # a synced LoRA node's downlink is nearly empty
            sent_size = max(sent_size, dense_packet_bytes(self.sparse_size))
        if size > self.max_reply_factor * sent_size:
            return "oversized", (
                f"{size} bytes > robustness.max_reply_factor={self.max_reply_factor:g} "
                f"× {sent_size} bytes sent"
            )
        squared, any_sparse = 0.0, False
        for name, arrays, sent in pairs:
            # Compare the *decoded* arrays: an Array's declared shape/dtype can lie about its bytes.
            values, reference = as_numpy(arrays), self._numpy_of_sent(sent)
            sparse = self.sparse_size is not None and is_sparse_encoded(values)
            any_sparse |= sparse
            if sparse:
                # A LoRA packet has its own key by design and the strategy decodes it; its
                # values *are* the update entries.
                problem = _sparse_problem(name, values, self.sparse_size)
                if problem is not None:
                    return problem
            elif set(values) != set(reference):
                missing = sorted(set(reference) - set(values))
                extra = sorted(set(values) - set(reference))
                return "keys", f"{name}: missing {missing[:5]}, unexpected {extra[:5]}"
            else:
                for key, arr in values.items():
                    ref = reference[key]
                    if arr.shape != ref.shape or arr.dtype != ref.dtype:
                        return "shape", (
                            f"{key}: got {arr.dtype}{list(arr.shape)}, sent {ref.dtype}{list(ref.shape)}"
                        )
                if defer_norm and len(pairs) == 1:  # the norm, with the round's others
                    return _DeferredNorm(arrays, values, sent)
            with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf are reported below
                update_sq = (
                    _sparse_update_sq(values) if sparse else update_norm(values, reference) ** 2
                )
            # A finite squared distance to the (finite) model sent means every compared value is
            # finite: scan for NaN/Inf only when it is not (sparse replies: always, it is small).
            if (sparse or not math.isfinite(update_sq)) and not all_finite(values):
                return "nonfinite", "arrays hold NaN or Inf"
            squared += update_sq
        return self._norm_reason(reply, squared, sparse=any_sparse)

    def _canonical(self, reply: Message) -> Message:
        """Name the reply's records as the server expects: each ArrayRecord as the record it
        answers (a lone record may come back under any name) and the MetricRecord ``metrics``.
        Flower's FedAvg looks records up by the first reply's names and raises on a mismatch."""
        content = reply.content
        sent = self._sent[reply.metadata.src_node_id]
        if _named_as_sent(content, sent):
            return reply  # fedge's own clients: nothing to rebuild
        pairs = _reference_pairs(content, sent)
        sent_names = {id(ref): n for n, ref in sent.items()}
        names = [sent_names[id(ref)] for _, _, ref in pairs]
        configs = [n for n in records_of(content, ConfigRecord) if n not in names]
        if [n for n, _, _ in pairs] == names and list(content) == [*names, "metrics", *configs]:
            return reply  # already as the server expects (fedge's own clients): nothing to rebuild
        out = RecordDict({name: arrays for name, (_, arrays, _) in zip(names, pairs, strict=True)})
        out["metrics"] = next(iter(records_of(content, MetricRecord).values()))
        for name, record in records_of(content, ConfigRecord).items():
            if name not in out:
                out[name] = record
        reply.content = out  # same reply and metadata; only record names change
        return reply

    def _common_metric_keys(self, replies: list[Message]) -> list[Message]:
        """Flower's strategies need identical metric keys in all replies: keep the common ones."""
        records = [next(iter(records_of(r.content, MetricRecord).values())) for r in replies]
        key_sets = [set(rec.keys()) for rec in records]
        common = set.intersection(*key_sets) if key_sets else set()
        # a key that is a scalar in one reply and a list (or a list of another length) in the
        # next cannot be averaged: Flower's metric aggregation would raise
        common = {
            k
            for k in common
            if len({len(rec[k]) if isinstance(rec[k], list) else -1 for rec in records}) == 1
        }
        common.add(WEIGHT_KEY)
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
