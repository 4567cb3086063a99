"""The virtual clock: a Flower client mod that times every local update on a simulated device.

For each training message the mod (1) fails the client with an exception — which every engine turns
into a Flower error reply — when its device is offline this round, cannot hold the training memory,
or drops out mid-round; (2) with partial work, caps the local steps at what fits the deadline; and
(3) after the trainer ran, counts the real work and converts it into device time::

    client time = FLOPs / sustained FLOP/s + 8 * bytes_down / downlink + 8 * bytes_up / uplink + RTT

FLOPs are measured once per (model, batch shape) with ``torch.utils.flop_counter.FlopCounterMode``
on one forward + backward pass and scaled by the samples actually processed; bytes are the
``ArrayRecord.count_bytes()`` of the incoming and outgoing messages, so compressed or sparse updates
count at their real size. The reply's metrics get the time, FLOPs, bytes and energy; its identity
record (clients/identity.py) the device class name and index.
A trainer that knows its own FLOP count (e.g. a forward-only edge trainer) may report it as the
metric ``train-flops``; the clock then uses that number.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from clients.data import dataset_info, load_client_data
from clients.devices import client_profile, drops_out, is_available
from clients.identity import DEVICE_INDEX, DEVICE_PROFILE, identity_record
from clients.models import build_model
from clients.node import node_scenario, partition_id
from clients.trainers import EDGE_TRAINERS, trainer_name_for
from scenarios.config import DataConfig, ModelConfig
from scenarios.devices import DeviceProfile
from scenarios.registry import UnknownAlgorithm, algorithm_config

# Edge trainers whose training memory is measured on one step of their own update rule
# (edge/memory.py) instead of backprop's params + grads + optimizer + activations: trainer name ->
# (measurement kind, optimizer buffers per trainable parameter; None = SGD: 1 with momentum, else 0).
# An algorithm whose declared client side is one of these trainers (lora_sparse: edge.lora) is
# measured as that trainer (:func:`memory_trainer`).
EDGE_MEMORY: dict[str, tuple[str, int | None]] = {
    "tpsgd": ("tpsgd", None),
    "forward_forward": ("forward_forward", 2),  # Adam: two moments
    "lora": ("lora", None),
}

# Prefixes of the error reasons; the server counts failures by them (they survive every engine's
# wrapping of the exception text, unlike exception class names).
UNAVAILABLE = "device unavailable"
DROPOUT = "device dropout"
OUT_OF_MEMORY = "device out of memory"

# Config keys the server sends with each round (server/deadline.py) and the trainer honours.
DEADLINE_KEY = "deadline-s"
PARTIAL_WORK_KEY = "partial-work"
MAX_STEPS_KEY = "max-local-steps"


class DeviceError(RuntimeError):
    """A simulated device failure; ``str()`` starts with one of the reason prefixes above."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


# -------------------- pure math


@dataclass(frozen=True)
class WorkEstimate:
    """Measured cost of training one model on batches of one shape."""

    flops_per_sample: float  # forward + backward FLOPs of one sample
    activation_bytes: int  # tensors saved for backward by one full batch
    param_bytes: int
    batch_size: int


def training_memory_bytes(work: WorkEstimate, optimizer_copies: int) -> int:
    """Training memory = params + grads + optimizer state (``optimizer_copies`` x params) + activations."""
    return work.param_bytes * (2 + optimizer_copies) + work.activation_bytes


def samples_processed(num_examples: int, batch_size: int, num_steps: int) -> int:
    """Samples seen in ``num_steps`` mini-batch steps over epochs of ``num_examples`` (last batch short)."""
    if num_examples <= 0 or num_steps <= 0:
        return 0
    steps_per_epoch = math.ceil(num_examples / batch_size)
    epochs, rest = divmod(num_steps, steps_per_epoch)
    return epochs * num_examples + rest * batch_size  # rest < steps_per_epoch: only full batches


@dataclass(frozen=True)
class ClientTime:
    compute_s: float
    download_s: float
    upload_s: float
    latency_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.download_s + self.upload_s + self.latency_s


def client_time(flops: float, bytes_down: int, bytes_up: int, profile: DeviceProfile) -> ClientTime:
    """t = FLOPs / (peak * sustained) + 8 b_down / downlink + 8 b_up / uplink + latency (seconds)."""
    return ClientTime(
        compute_s=flops / profile.train_flops,
        download_s=8.0 * bytes_down / profile.downlink_bps,
        upload_s=8.0 * bytes_up / profile.uplink_bps,
        latency_s=profile.latency_s,
    )


def steps_within(
    deadline_s: float, step_flops: float, bytes_down: int, bytes_up: int, profile: DeviceProfile
) -> int:
    """Largest number of local steps whose client time fits ``deadline_s`` (at least 1).

    floor((deadline - t_comm - latency) / t_step): a client that cannot even do one step still does
    one, arrives late, and the server's deadline drops it like any late update.
    """
    fixed = client_time(0.0, bytes_down, bytes_up, profile).total_s
    step_s = step_flops / profile.train_flops
    if step_s <= 0:
        return 1 << 30
    return max(1, math.floor((deadline_s - fixed) / step_s))


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 6.2 * 2**30 -> '6.2 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# -------------------- measuring a model


def measure_work(
    model: torch.nn.Module, input_shape: tuple[int, ...], batch_size: int
) -> WorkEstimate:
    """FLOPs (``FlopCounterMode``) and saved-activation bytes of one forward+backward of a full batch.

    Runs on a CPU copy of the model with a zero batch, so the caller's model and RNG are untouched.
    """
    probe = copy.deepcopy(model).to("cpu").train()
    x = torch.zeros((batch_size, *input_shape))
    y = torch.zeros(batch_size, dtype=torch.long)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if not isinstance(t, torch.nn.Parameter):  # parameters are counted separately
            saved += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(probe(x), y)
        loss.backward()
    param_bytes = sum(p.numel() * p.element_size() for p in probe.parameters())
    return WorkEstimate(counter.get_total_flops() / batch_size, saved, param_bytes, batch_size)


@lru_cache(maxsize=16)
def _work_cached(model_json: str, data_json: str, batch_size: int) -> WorkEstimate:
    model, input_shape = _model_from_json(model_json, data_json)
    return measure_work(model, input_shape, batch_size)


def _model_from_json(model_json: str, data_json: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The scenario's model (fresh init) and its input shape, from the configs' JSON (cache keys)."""
    info = dataset_info(DataConfig.model_validate(json.loads(data_json)))
    model = build_model(
        ModelConfig.model_validate(json.loads(model_json)), info.input_shape, info.num_classes
    )
    return model, info.input_shape


@lru_cache(maxsize=16)
def _edge_memory_cached(
    trainer: str, model_json: str, data_json: str, batch_size: int, lora_rank: int, seed: int
):
    from edge.memory import measure_training_memory  # only for edge trainers: it imports peft

    with torch.random.fork_rng(devices=[]):  # the probe must not move the client's RNG
        torch.manual_seed(seed)
        model, input_shape = _model_from_json(model_json, data_json)
        x = torch.zeros((batch_size, *input_shape))
        y = torch.zeros(batch_size, dtype=torch.long)
        return measure_training_memory(trainer, model, x, y, seed=seed, lora_rank=lora_rank)


def memory_trainer(trainer: str) -> str:
    """The trainer whose training memory ``trainer`` needs: itself, or the edge trainer an
    algorithm's declaration names as its client side."""
    if trainer in EDGE_MEMORY:
        return trainer
    try:
        dotted = algorithm_config(trainer).client_trainer
    except UnknownAlgorithm:
        return trainer
    return next((name for name, d in EDGE_TRAINERS.items() if d == dotted), trainer)


def training_memory_need(scenario, trainer: str, work: WorkEstimate) -> tuple[int, str]:
    """Bytes client training needs with ``trainer`` and a one-line breakdown for error messages.

    Backprop trainers: params + grads + optimizer state + one batch of saved activations
    (``work``). Edge trainers (:data:`EDGE_MEMORY`): the measured peak of one step of their own
    update rule plus their optimizer's buffers.
    """
    momentum_copies = 1 if scenario.train.momentum > 0 else 0
    batch = scenario.train.batch_size
    measured_as = memory_trainer(trainer)
    if measured_as not in EDGE_MEMORY:
        need = training_memory_bytes(work, optimizer_copies=momentum_copies)
        return need, (
            f"params+grads+optimizer {format_bytes(need - work.activation_bytes)} + activations "
            f"of a {batch}-sample batch {format_bytes(work.activation_bytes)}"
        )
    kind, copies = EDGE_MEMORY[measured_as]
    report = _edge_memory_cached(
        kind,
        scenario.model.model_dump_json(),
        scenario.data.model_dump_json(),
        batch,
        int(getattr(scenario.algorithm, "rank", 4)),
        scenario.seed,
    )
    need = report.with_optimizer(momentum_copies if copies is None else copies)
    return need, (
        f"{trainer}: params {format_bytes(report.param_bytes)} + grads "
        f"{format_bytes(report.grad_bytes)} + optimizer {format_bytes(need - report.peak_bytes)} "
        f"+ activations of a {batch}-sample batch {format_bytes(report.activation_bytes)}"
    )


# -------------------- the mod


def _array_bytes(content: RecordDict) -> int:
    return sum(rec.count_bytes() for rec in content.array_records.values())


@dataclass(frozen=True)
class ClockTicket:
    """What the clock decided about one training message before it trained, for
    :func:`account_training` to time the reply with."""

    device_name: str
    device_index: int
    profile: DeviceProfile
    work: WorkEstimate
    batch_size: int
    n_train: int
    planned_steps: int
    bytes_down: int


def prepare_training(msg: Message, context: Context) -> ClockTicket | None:
    """The clock's half before training: raise :class:`DeviceError` when this client's device is
    offline, out of memory or drops out this round; with partial work, put the step cap into the
    message's config (a fresh record on ``msg``). None when the scenario has no ``[devices]``.

    Every engine gets exactly these verdicts: the mod below runs it per message, the packed engine
    (``fedge/engines/packed.py``) for each client it trains in a pack.
    """
    scenario = node_scenario(context)
    cfg = scenario.devices
    if cfg is None:
        return None

    pid = partition_id(context)
    config = msg.content.get("config")
    server_round = int(config.get("server-round", 0)) if config is not None else 0
    names = cfg.class_names()
    name, profile = client_profile(cfg, scenario.data.num_clients, scenario.seed, pid)
    where = f"client {pid} ({name}) in round {server_round}"
    if not is_available(cfg, scenario.seed, server_round, pid):
        raise DeviceError(UNAVAILABLE, f"{where} is offline ({cfg.availability} availability)")

    batch_size = scenario.train.batch_size
    work = _work_cached(
        scenario.model.model_dump_json(), scenario.data.model_dump_json(), batch_size
    )
    if cfg.memory_check:
        need, breakdown = training_memory_need(scenario, trainer_name_for(scenario, pid), work)
        if need > profile.memory_bytes:
            raise DeviceError(
                OUT_OF_MEMORY,
                f"device {name} has {format_bytes(profile.memory_bytes)}, training needs "
                f"{format_bytes(need)} ({breakdown}); use a smaller model/batch or a "
                "memory-light edge trainer ([edge] trainers: tpsgd, forward_forward, lora)",
            )

    bytes_down = _array_bytes(msg.content)
    n_train = len(load_client_data(scenario.data, scenario.seed, pid).x_train)
    planned_steps = scenario.train.epochs * math.ceil(max(n_train, 1) / batch_size)
    if config is not None and bool(config.get(PARTIAL_WORK_KEY, False)) and DEADLINE_KEY in config:
        # Assume the reply is as big as the model that came in (true for dense updates).
        fit = steps_within(
            float(config[DEADLINE_KEY]),
            work.flops_per_sample * batch_size,
            bytes_down,
            bytes_down,
            profile,
        )
        if fit < planned_steps:
            # A fresh record on this message only: strategies share one ConfigRecord (and often
            # one RecordDict) between all the round's messages, so mutating it would cap others.
            content = RecordDict(dict(msg.content.items()))
            content["config"] = ConfigRecord({**config, MAX_STEPS_KEY: fit})
            msg.content = content

    if drops_out(cfg, scenario.seed, server_round, pid):
        # Decided before training to save real compute; to the server it is a mid-round loss.
        raise DeviceError(DROPOUT, f"{where} dropped out mid-round (p={cfg.dropout_prob})")
    return ClockTicket(
        name, names.index(name), profile, work, batch_size, n_train, planned_steps, bytes_down
    )


def account_training(ticket: ClockTicket, reply: Message) -> Message:
    """The clock's half after training: the reply's virtual time, FLOPs, bytes and energy
    (metrics) and its device (identity record)."""
    if reply.has_error():
        return reply
    metrics: MetricRecord = reply.content["metrics"]
    steps = int(metrics.get("num-steps", 0))
    flops = float(
        metrics.get("train-flops")
        or ticket.work.flops_per_sample
        * samples_processed(
            int(metrics.get("num-examples", ticket.n_train)), ticket.batch_size, steps
        )
    )
    bytes_up = _array_bytes(reply.content)
    profile = ticket.profile
    t = client_time(flops, ticket.bytes_down, bytes_up, profile)
    joules = profile.joules_per_flop
    planned_steps = ticket.planned_steps
    metrics.update(
        {
            "virtual-time-s": t.total_s,
            "compute-time-s": t.compute_s,
            "comm-time-s": t.download_s + t.upload_s + t.latency_s,
            "train-flops": flops,
            "recv-bytes": ticket.bytes_down,
            "sent-bytes": bytes_up,
            "energy-j": flops * joules if joules is not None else float("nan"),
            "planned-steps": planned_steps,
            "work-fraction": steps / planned_steps if planned_steps else 1.0,
        }
    )
    identity = identity_record(reply.content)  # identifiers: never averaged by a strategy
    identity[DEVICE_INDEX] = ticket.device_index
    identity[DEVICE_PROFILE] = ticket.device_name
    return reply


def virtual_clock_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: device failures, partial work and virtual time for training messages."""
    if msg.metadata.message_type.split(".")[0] != "train":
        return call_next(msg, context)
    ticket = prepare_training(msg, context)
    reply = call_next(msg, context)
    return reply if ticket is None else account_training(ticket, reply)
