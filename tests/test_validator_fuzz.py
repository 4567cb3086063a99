"""Fuzz: a reply can fail its own node, never the server (issue #17).

For every registered strategy family, one real round of fedge's own ClientApp gives honest replies;
hypothesis then corrupts one of them in every way a hostile or broken client could (stray and
missing keys, a ``*.indices`` key that mimics the sparse encoding, dtypes, shapes, arrays whose
declared shape lies about their bytes, undecodable bytes, NaN/Inf, huge / negative / NaN / boolean /
list ``num-examples``, non-integer identities, extra or missing records). Checked each time:

- the validator never raises, and rejects the corrupted reply with a reason from ``REASONS``;
- the honest replies still pass, and a harmless change (another record name) passes too;
- the strategy then aggregates what passed without raising, to a finite model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from algorithms.lora_sparse import PACKET_KEY, decode_packet, encode_packet
from clients.app import app as fedge_client_app
from clients.data import dataset_info
from clients.models import build_model
from fedge.engines import SERVER_NODE_ID, InProcessGrid
from scenarios.registry import algorithm_names
from server.loop import arrays_finite
from server.strategies import ServerSetup, build_strategy
from server.validation import REASONS, ReplyValidator
from tests.test_faults import scenario_for

NUM_CLIENTS = 4


class Round:
    """One algorithm's strategy, validator and a round of honest replies."""

    def __init__(self, algorithm: str, tmp_path: Path) -> None:
        scenario = scenario_for(
            algorithm,
            tmp_path,
            data={"num_clients": NUM_CLIENTS, "num_samples": 600},
            federation={"min_train_clients": 1, "fraction_train": 1.0},
            # the checks of each reply on its own: the round-relative norm bound (on by default
            # since #23) would judge a perturbed honest reply against the others
            robustness={"relative_norm_bound": 0.0},
        )
        info = dataset_info(scenario.data)
        model = build_model(scenario.model, info.input_shape, info.num_classes)
        setup = ServerSetup(scenario, info, model, torch.device("cpu"), tmp_path)
        self.algorithm = algorithm
        self.strategy = build_strategy(setup)
        self.validator = ReplyValidator.from_setup(setup)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
        grid = InProcessGrid(
            fedge_client_app,
            NUM_CLIENTS,
            {**scenario.to_run_config(), "run-dir": str(tmp_path)},
            seed=scenario.seed,
        )
        arrays = ArrayRecord(model.state_dict())
        self.instructions = list(self.strategy.configure_train(1, arrays, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(self.instructions, timeout=60))
        self.replies = [r for r in replies if not r.has_error()]
        assert len(self.replies) == len(self.instructions) == NUM_CLIENTS

    def fresh(self) -> list[Message]:
        """Copies of the honest replies (the validator may rename their records in place)."""
        out = []
        for r in self.replies:
            out.append(
                Message(RecordDict(dict(r.content.items())), reply_to=_instruction_of(self, r))
            )
        return out


def _instruction_of(rnd: Round, reply: Message) -> Message:
    return next(m for m in rnd.instructions if m.metadata.dst_node_id == reply.metadata.src_node_id)


_ROUNDS: dict[str, Round] = {}


@pytest.fixture(params=list(algorithm_names()))
def honest_round(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Round:
    name = request.param
    if name not in _ROUNDS:
        _ROUNDS[name] = Round(name, tmp_path_factory.mktemp(f"fuzz-{name}"))
    return _ROUNDS[name]


# --------------------------------------------------------------------------- corruptions
KEY_NAMES = st.one_of(
    st.sampled_from(["x.indices", "adapters.indices", "adapters.values", "w.values", "", "0"]),
    st.text(min_size=1, max_size=12).map(lambda s: s + ".indices"),
    st.text(min_size=1, max_size=12),
)
DTYPES = st.sampled_from([np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_])
BAD_WEIGHTS = st.one_of(
    st.sampled_from([0, -1, -(10**9), 10**30, 2**70, 1e300, -0.0, math.nan, math.inf, -math.inf]),
    st.integers(max_value=0),
    st.integers(min_value=10**9 + 1),
    st.floats(max_value=0.0),
    st.just("bool"),
    st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=3),
)
BAD_METRICS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.lists(st.sampled_from([math.nan, 1.0, math.inf]), min_size=1).filter(
        lambda v: not all(math.isfinite(x) for x in v)
    ),
)
BAD_IDENTITIES = st.one_of(
    st.sampled_from([0.5, math.nan, math.inf, 2.0**70, "bool"]), st.lists(st.integers(), min_size=1)
)

CORRUPTIONS = st.one_of(
    st.tuples(st.just("stray_key"), KEY_NAMES, st.integers(0, 5)),
    st.tuples(st.just("drop_key"), st.integers(0, 100)),
    st.tuples(st.just("dtype"), st.integers(0, 100), DTYPES),
    st.tuples(st.just("shape"), st.integers(0, 100), st.integers(0, 4)),
    st.tuples(
        st.just("nonfinite"), st.integers(0, 100), st.sampled_from([np.nan, np.inf, -np.inf])
    ),
    st.tuples(st.just("lying_array"), st.integers(0, 100)),
    st.tuples(st.just("garbage_bytes"), st.integers(0, 100), st.binary(max_size=64)),
    st.tuples(st.just("weight"), BAD_WEIGHTS),
    st.tuples(st.just("metric"), BAD_METRICS),
    st.tuples(st.just("identity"), st.sampled_from(["partition-id", "cluster-id"]), BAD_IDENTITIES),
    st.tuples(st.just("no_metrics")),
    st.tuples(st.just("two_metric_records")),
    st.tuples(st.just("no_arrays")),
    st.tuples(st.just("extra_array_record"), KEY_NAMES),
    st.tuples(
        st.just("sparse"),
        st.integers(0, 50),
        st.sampled_from(["out_of_range", "negative", "length", "float_indices"]),
    ),
    st.tuples(st.just("huge_update"), st.integers(0, 100)),
)


def _arrays_of(reply: Message) -> tuple[str, dict[str, np.ndarray]]:
    name, record = next(iter(reply.content.array_records.items()))
    return name, {k: v.numpy().copy() for k, v in record.items()}


def _with(reply: Message, arrays: dict[str, Array] | None, name: str | None = None) -> RecordDict:
    old_name, _ = next(iter(reply.content.array_records.items()))
    content = RecordDict()
    if arrays is not None:
        content[name or old_name] = ArrayRecord(arrays)
    for key, rec in reply.content.metric_records.items():
        content[key] = MetricRecord(dict(rec.items()))
    return content


def _set_metric(content: RecordDict, key: str, value: object) -> None:
    rec = next(iter(content.metric_records.values()))
    if value == "bool":  # MetricRecord refuses bool; an in-process client could still smuggle one
        rec._data[key] = True
    elif isinstance(value, list):
        rec[key] = [float(v) if isinstance(v, float) else v for v in value]
    else:
        rec[key] = value


def corrupt(reply: Message, corruption: tuple) -> None:
    kind, *args = corruption
    _, tensors = _arrays_of(reply)
    keys = sorted(tensors)
    pick = keys[args[0] % len(keys)] if args and isinstance(args[0], int) else keys[0]
    dense = {k: Array(v) for k, v in tensors.items()}
    if keys == [PACKET_KEY] and kind in ("nonfinite", "huge_update"):
        # a LoRA packet's bytes are always finite: break the values it encodes instead
        values = decode_packet(tensors[PACKET_KEY])
        sent = values.nonzero().reshape(-1)
        sent = sent if sent.numel() else torch.tensor([0])
        values[sent[args[0] % sent.numel()]] = args[1] if kind == "nonfinite" else 1e6
        packet = encode_packet(values, sent, "float32")[0]
        reply.content = _with(reply, {PACKET_KEY: Array(packet)})
        return
    if kind == "stray_key":
        key = args[0] if args[0] not in tensors else args[0] + ".x.indices"
        dense[key] = Array(np.zeros(args[1], dtype=np.int32))
        content = _with(reply, dense)
    elif kind == "drop_key":
        del dense[pick]
        content = _with(reply, dense)
    elif kind == "dtype":
        if tensors[pick].dtype == args[1]:
            args[1] = np.float64 if args[1] != np.float64 else np.float16
        dense[pick] = Array(tensors[pick].astype(args[1]))
        content = _with(reply, dense)
    elif kind == "shape":
        reshaped = np.zeros(tensors[pick].size + 1 + args[1], dtype=tensors[pick].dtype)
        dense[pick] = Array(reshaped)
        content = _with(reply, dense)
    elif kind == "nonfinite":
        arr = tensors[pick].astype(np.float32) if tensors[pick].dtype.kind != "f" else tensors[pick]
        if arr.dtype != tensors[pick].dtype:
            pick = next(k for k in keys if tensors[k].dtype.kind == "f")
            arr = tensors[pick]
        arr.flat[args[0] % arr.size] = args[1]
        dense[pick] = Array(arr)
        content = _with(reply, dense)
    elif kind in ("lying_array", "garbage_bytes"):
        real = dense[pick]
        data = (
            Array(np.zeros(real.numpy().size + 3, dtype=np.float32)).data
            if kind == "lying_array"
            else args[1]
        )
        dense[pick] = Array(dtype=real.dtype, shape=real.shape, stype=real.stype, data=data)
        content = _with(reply, dense)
    elif kind == "weight":
        content = _with(reply, dense)
        _set_metric(content, "num-examples", args[0])
    elif kind == "metric":
        content = _with(reply, dense)
        _set_metric(content, "train_loss", args[0])
    elif kind == "identity":
        content = _with(reply, dense)
        _set_metric(content, args[0], args[1])
    elif kind == "no_metrics":
        content = RecordDict({"arrays": ArrayRecord(dense)})
    elif kind == "two_metric_records":
        content = _with(reply, dense)
        content["more"] = MetricRecord({"num-examples": 3})
    elif kind == "no_arrays":
        content = _with(reply, None)
    elif kind == "extra_array_record":
        content = _with(reply, dense)
        content[f"extra-{args[0]}"] = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    elif kind == "sparse":  # a LoRA packet, broken in one of four ways
        n = 17 + args[0]  # > 16 entries: one sent entry is coded as a uint16 position, not a bitmap
        packet, _ = encode_packet(torch.full((n,), 1e-3), torch.tensor([0]), "float32")
        if args[1] == "out_of_range":  # a position past the vector (uint16 positions here)
            packet[14:16] = np.frombuffer(np.uint16(n).tobytes(), np.uint8)
        elif args[1] == "negative":  # a header that promises more entries than it carries
            packet[6:10] = np.frombuffer(np.uint32(n).tobytes(), np.uint8)
        elif args[1] == "length":
            packet = packet[:-1]
        else:
            packet = packet.astype(np.float32)
        content = _with(reply, {PACKET_KEY: Array(packet)})
    elif kind == "huge_update":
        arr = tensors[next(k for k in keys if tensors[k].dtype.kind == "f")]
        arr += 1e6
        content = _with(reply, {k: Array(v) for k, v in tensors.items()})
    else:  # pragma: no cover
        raise AssertionError(kind)
    reply.content = content


FUZZ = settings(
    max_examples=30,  # x 9 strategy families; the fast suite stays fast
    deadline=None,
    derandomize=True,  # seeded: the same examples on every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(corruption=CORRUPTIONS, victim=st.integers(0, NUM_CLIENTS - 1))
def test_a_corrupted_reply_fails_its_node_not_the_server(
    honest_round: Round, corruption: tuple, victim: int
) -> None:
    rnd = honest_round
    validator = rnd.validator
    validator.observe_train_instructions(1, rnd.instructions)
    replies = rnd.fresh()
    corrupt(replies[victim], corruption)
    bad_id = replies[victim].metadata.src_node_id

    verdict = validator.check(replies[victim])  # must not raise
    assert verdict is not None, f"{rnd.algorithm}: {corruption[0]} passed the validator"
    assert verdict[0] in REASONS and verdict[1]

    kept, metrics = validator.filter_train_replies(1, replies)
    assert [r.metadata.src_node_id for r in kept] == [
        r.metadata.src_node_id for r in replies if r.metadata.src_node_id != bad_id
    ]
    assert metrics["num_invalid"] == 1
    new_arrays, _ = rnd.strategy.aggregate_train(1, kept)  # must not raise either
    assert new_arrays is None or arrays_finite(new_arrays)


@settings(FUZZ, max_examples=10)
@given(name=st.text(min_size=1, max_size=10), scale=st.floats(1e-6, 1e-2))
def test_honest_replies_pass_whatever_their_record_names(
    honest_round: Round, name: str, scale: float
) -> None:
    """Renaming a lone record or nudging the weights is harmless: every reply passes and the
    strategy aggregates them (Flower's FedAvg would raise on mixed record names)."""
    rnd = honest_round
    rnd.validator.observe_train_instructions(1, rnd.instructions)
    replies = rnd.fresh()
    _, tensors = _arrays_of(replies[0])
    nudged = {
        k: Array(v + np.asarray(scale, dtype=v.dtype) if v.dtype.kind == "f" else v)
        for k, v in tensors.items()
    }
    sent_records = _instruction_of(rnd, replies[0]).content.array_records
    # a lone record may come back under any name; with several sent (IFCA), the name says which
    replies[0].content = _with(replies[0], nudged, name=name if len(sent_records) == 1 else None)
    metric_name = next(iter(replies[-1].content.metric_records))
    content = RecordDict(dict(replies[-1].content.items()))
    content[metric_name + "-x"] = content.pop(metric_name)
    replies[-1].content = content
    assert all(rnd.validator.check(r) is None for r in replies)
    kept, metrics = rnd.validator.filter_train_replies(1, replies)
    assert len(kept) == NUM_CLIENTS and metrics["num_invalid"] == 0
    new_arrays, _ = rnd.strategy.aggregate_train(1, kept)
    assert new_arrays is None or arrays_finite(new_arrays)


def test_a_well_formed_sparse_reply_passes_only_where_sparse_is_aggregated(
    honest_round: Round,
) -> None:
    rnd = honest_round
    rnd.validator.observe_train_instructions(1, rnd.instructions)
    replies = rnd.fresh()
    n = rnd.validator.sparse_size or 8
    sparse = {PACKET_KEY: Array(encode_packet(torch.full((n,), 1e-3), None, "float16")[0])}
    replies[0].content = _with(replies[0], sparse)
    verdict = rnd.validator.check(replies[0])
    if rnd.algorithm == "lora_sparse":
        assert verdict is None
        new_arrays, _ = rnd.strategy.aggregate_train(
            1, rnd.validator.filter_train_replies(1, replies)[0]
        )
        assert new_arrays is not None and arrays_finite(new_arrays)
    else:
        assert verdict is not None and verdict[0] == "keys"


def test_only_the_lone_packet_is_sparse() -> None:
    from algorithms.lora_sparse import is_sparse_encoded

    assert is_sparse_encoded([PACKET_KEY])
    assert not is_sparse_encoded(["fc.weight", "fc.bias", "x.indices"])
    assert not is_sparse_encoded([PACKET_KEY, "fc.weight"])
