"""The packed engine (``engine.name = "packed"``): the in-process grid, with a round's training
messages handed to one batched trainer (``clients/packed.py``) instead of one ClientApp call each.

Same ServerApp, strategies, reply validation and metrics: :class:`PackedTrainer` returns one reply
per node, built by the ClientApp's own ``clients/replies.py::train_reply`` (the plan's extra
metrics included), its arrays rows of the pack's stacked result
(``clients/arrays.py::records_from_stack``). A client is packed when its trainer declares its
local step as a ``LocalPlan`` (``clients/training.py::plan_trainer``; for an algorithm's own
trainer the declaration must also say ``packable``): the plan is evaluated for each client (its
objective, its starting model — e.g. the cluster model it was sent or picked — and its context),
and clients whose plans agree train in one pack. The ClientApp's mods keep their meaning:

- ``[devices]``: the virtual clock's own two halves (``clients/clock.py::prepare_training`` and
  ``account_training``) run for every packed client: the same availability, out-of-memory and
  dropout verdicts (as error replies), the same partial-work cap, virtual time and energy;
- ``[attack]``: every packed reply passes through ``clients/attacks.py::attack_mod`` itself, which
  rewrites the attackers' updates exactly as on the ClientApp; label-flip attackers, whom the mod
  trains itself, are packed with the mod's own plan (``clients/attacks.py::label_flip_plan``:
  plain SGD on flipped labels) and replied as the mod replies.

A round's evaluate messages are answered together too, by ``clients/packed_eval.py`` (one forward
per distinct sent model, personalization's fine-tuning packed), with the ClientApp's replies
(``clients/replies.py::evaluate_reply``); both mods pass evaluate messages through untouched.

Clients it cannot pack go through the ClientApp as in the ``inprocess`` engine, with the reason
logged once: a trainer that declares no plan (LoRA), a plan that raised (e.g. forward-forward on
a model other than ``ff_mlp``: the ClientApp replies with the trainer's error), mods other than
the clock, LoRA downlink and attack ones, a model with (persistent) buffers, no training data, a
pack that raised.

Memory is bounded by training at most ``engine.pack_size`` clients at a time; the largest pack's
stacked state, the process's peak RSS (which also holds the pack's activations: ~2 MiB per client
for the quickstart's cnn1d, a few KiB for a small MLP) and CUDA's peak when used are printed at the
end of the run. ``engine.device = "cuda"`` puts the pack on the GPU.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import MessageType

from clients.arrays import received_state_dict, records_from_stack
from clients.attacks import (
    LABEL_FLIP_TRAINER,
    attack_mod,
    label_flip_plan,
    trains_flipped_labels,
)
from clients.clock import (
    ClockTicket,
    DeviceError,
    account_training,
    prepare_training,
    virtual_clock_mod,
)
from clients.data import ClientData, dataset_info, load_client_data
from clients.models import build_model
from clients.node import partition_id
from clients.packed import PackedClient, pack_bytes, train_packed, unpackable_reason
from clients.packed_eval import PackedEvaluator
from clients.replies import train_reply
from clients.seeding import derive_seeds
from clients.trainers import get_trainer, trainer_name_for
from clients.training import LocalPlan, PlanFn, TrainJob, local_plan_of
from edge.lora_downlink import lora_downlink_mod
from fedge.engines.errors import exception_reply
from scenarios.config import Scenario
from scenarios.registry import UnknownAlgorithm, algorithm_config

log = logging.getLogger("fedge.packed")


@dataclass
class _Entry:
    """One packed client of the round: its message, plan, pack data and clock ticket."""

    pos: int
    msg: Message
    context: Context
    trainer_name: str
    server_round: int
    plan: LocalPlan
    client: PackedClient
    ticket: ClockTicket | None


class PackedTrainer:
    """Trains a round's packable train messages together; see the module docstring."""

    def __init__(self, scenario: Scenario, device: torch.device, client_mods: list) -> None:
        self.scenario = scenario
        self.device = device
        info = dataset_info(scenario.data)
        self.model = build_model(scenario.model, info.input_shape, info.num_classes)
        # A CPU model the plans see (they may load a picked cluster model into it; never train).
        self.plan_model = build_model(scenario.model, info.input_shape, info.num_classes)
        # Listed once: walking the module tree for every client cost more than the check itself.
        self._plan_params = list(self.plan_model.parameters())
        self.reason = self._scenario_reason(client_mods)
        self.evaluator = PackedEvaluator(scenario, device)  # the round's evaluate messages
        self._logged: set[str] = set()
        self._plans: dict[str, PlanFn | None] = {}
        self.packed_updates = 0
        self.sequential_updates = 0
        self.failed_updates = 0
        self.peak_pack_bytes = 0
        self.train_seconds = 0.0
        self._data: dict[int, ClientData] = {}  # partition id -> its data
        # id(sent ArrayRecord) -> its tensors, for one call's messages
        self._received: dict[int, dict[str, torch.Tensor]] = {}
        # The received state the plan model holds, with its parameters' versions when loaded.
        self._loaded: tuple[dict[str, torch.Tensor], list[tuple[int, int]]] | None = None
        if self.reason:
            self._note(self.reason)

    def _scenario_reason(self, client_mods: list) -> str | None:
        # The LoRA downlink mod only touches lora_sparse messages, whose trainer is never packed;
        # the clock and the attack mod are run for packed clients by this trainer itself.
        if any(
            mod not in (virtual_clock_mod, lora_downlink_mod, attack_mod) for mod in client_mods
        ):
            return "the ClientApp has mods besides the virtual clock, LoRA downlink and attack"
        return unpackable_reason(self.model)

    def _note(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("packed engine: training sequentially because %s", reason)

    def _plan_fn(self, trainer_name: str) -> PlanFn | None:
        """The trainer's plan function, None (reason noted) when it declares none."""
        if trainer_name not in self._plans:
            plan_fn = local_plan_of(get_trainer(trainer_name))
            try:
                declared = algorithm_config(trainer_name)
            except UnknownAlgorithm:
                declared = None  # an edge trainer: its own plan is its declaration
            if plan_fn is None:
                self._note(f"trainer {trainer_name!r} declares no LocalPlan (clients/training.py)")
            elif declared is not None and not declared.packable:
                self._note(f"algorithm {trainer_name!r} does not declare packable = True")
                plan_fn = None
            self._plans[trainer_name] = plan_fn
        return self._plans[trainer_name]

    # ------------------------------------------------------------------------------------------
    def _entry(self, pos: int, msg: Message, context: Context) -> _Entry | Message | None:
        """The pack's view of one message; an error reply when the device clock failed it; None
        (with the reason noted) when the ClientApp must train it."""
        if msg.metadata.message_type != MessageType.TRAIN or "arrays" not in msg.content:
            return None  # evaluation: self.evaluator; custom actions: the ClientApp
        pid = partition_id(context)
        if trains_flipped_labels(self.scenario, pid):
            # The attack mod trains it by its own plan, whatever the algorithm's trainer is.
            trainer_name, plan_fn = LABEL_FLIP_TRAINER, label_flip_plan
        else:
            trainer_name = trainer_name_for(self.scenario, pid)
            plan_fn = self._plan_fn(trainer_name)
        if plan_fn is None:
            return None
        data = self._data.get(pid)
        if data is None:  # the data of a run's clients never changes (load_client_data caches)
            data = self._data[pid] = load_client_data(self.scenario.data, self.scenario.seed, pid)
        if len(data.x_train) == 0:
            return None  # the ClientApp replies with the trainer's own error
        try:
            ticket = prepare_training(msg, context)  # may put a step cap into msg's config
        except DeviceError as ex:
            return exception_reply(msg, ex)
        config = msg.content.get("config")
        config = config if isinstance(config, ConfigRecord) else ConfigRecord()
        server_round = int(config.get("server-round", 0))
        start = self._start_model(msg.content["arrays"])
        model = self.plan_model
        # Seeded by __call__ for every client at once (derive_seeds): a plan function never
        # trains, so it draws nothing from the generator before then.
        generator = torch.Generator()
        job = TrainJob(
            model,
            data,
            self.scenario,
            config,
            context.state,
            generator,
            torch.device("cpu"),
            received=msg.content,
        )
        try:
            plan = plan_fn(job).resolved(job)
        except Exception as ex:  # e.g. a trainer that cannot train this model
            self._note(f"trainer {trainer_name!r}'s plan raised {type(ex).__name__}: {ex}")
            self._loaded = None  # the plan may have loaded other weights before raising
            return None  # the ClientApp replies with the trainer's own error
        if not self._plan_model_holds(start):
            # The plan loaded other weights (e.g. IFCA's picked cluster model): start from those.
            start = {k: p.detach().clone() for k, p in model.named_parameters()}
            self._loaded = None
        client = PackedClient(data, start, generator, plan.context, plan.max_steps)
        return _Entry(pos, msg, context, trainer_name, server_round, plan, client, ticket)

    def _start_model(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The received model's tensors (converted once per sent record: strategies send one
        record to many nodes), loaded into the plan model unless it holds them already."""
        state = self._received.get(id(arrays))
        if state is None:
            state = self._received[id(arrays)] = received_state_dict(arrays)
        if not self._plan_model_holds(state):
            self.plan_model.load_state_dict(state)
            self._loaded = (state, self._param_versions())
        return state

    def _param_versions(self) -> list[tuple[int, int]]:
        # In-place writes (load_state_dict's copy_, an optimizer step) bump a tensor's _version.
        return [(id(p), p._version) for p in self._plan_params]

    def _plan_model_holds(self, state: dict[str, torch.Tensor]) -> bool:
        """Whether the plan model's parameters are ``state``'s, untouched since they were loaded
        (then ``state`` itself, read-only in the pack, is the client's starting model)."""
        return (
            self._loaded is not None
            and self._loaded[0] is state
            and self._loaded[1] == self._param_versions()
        )

    def __call__(
        self, messages: list[Message], contexts: dict[int, Context]
    ) -> dict[int, tuple[Message, float]]:
        """Replies (and per-node seconds) for the messages it trained, by position in ``messages``."""
        if self.reason:
            return {}
        # Per call: id() keys of this call's sent records are only unique while they are alive.
        self._received = {}
        self._loaded = None
        evaluated = self.evaluator(messages, contexts)  # evaluate messages: clients/packed_eval.py
        out: dict[int, tuple[Message, float]] = {}
        groups: dict[object, list[_Entry]] = {}
        num_train = 0
        for pos, msg in enumerate(messages):
            num_train += msg.metadata.message_type == MessageType.TRAIN
            context = contexts.get(msg.metadata.dst_node_id)
            entry = self._entry(pos, msg, context) if context is not None else None
            if isinstance(entry, Message):  # failed by its simulated device: nothing to train
                out[pos] = (entry, 0.0)
                self.failed_updates += 1
            elif entry is not None:
                groups.setdefault(entry.plan.pack_key(), []).append(entry)
        self.sequential_updates += num_train - len(out) - sum(len(g) for g in groups.values())
        size = self.scenario.engine.pack_size
        torch.set_num_threads(self.scenario.engine.client_threads)
        entries = [e for group in groups.values() for e in group]
        # The generator clients/app.py::train gives each client this round, all seeded at once.
        seeds = derive_seeds(
            [(self.scenario.seed, e.server_round, e.client.data.partition_id) for e in entries]
        )
        for entry, seed in zip(entries, seeds, strict=True):
            entry.client.generator.manual_seed(seed)
        self._received = {}
        self._loaded = None
        for group in groups.values():
            for start in range(0, len(group), size):
                self._train_chunk(group[start : start + size], out)
        out.update(evaluated)
        return out

    def _train_chunk(self, chunk: list[_Entry], out: dict[int, tuple[Message, float]]) -> None:
        t0 = time.perf_counter()
        clients = [e.client for e in chunk]
        try:
            results = train_packed(self.model, clients, chunk[0].plan, self.device)
        except Exception as ex:  # the ClientApp path still gives every node its own reply
            self._note(f"the pack raised {type(ex).__name__}: {ex}")
            self.sequential_updates += len(chunk)
            return
        seconds = time.perf_counter() - t0  # the chunk's nodes trained "in parallel"
        self.train_seconds += seconds
        self.packed_updates += len(chunk)
        self.peak_pack_bytes = max(
            self.peak_pack_bytes,
            pack_bytes(self.model, clients, chunk[0].plan)
            + sum(c.data.x_train.nbytes + c.data.y_train.nbytes for c in clients),
        )
        # Every reply's arrays are a row of the pack's stacked result (no copy per client; the
        # server reads the rows back as one stack: server/validation.py, server/stacked_mean.py).
        records = records_from_stack({k: v.numpy() for k, v in results[0].stack.items()})
        for entry, result in zip(chunk, results, strict=True):
            # The ClientApp's own reply builder: the same records, in the same order.
            reply = train_reply(
                entry.msg,
                entry.context,
                entry.client.data.partition_id,
                entry.trainer_name,
                records[result.row],
                result.train_loss,
                result.num_examples,
                result.num_steps,
                entry.plan.metrics,
            )
            out[entry.pos] = (self._after_training(entry, reply), seconds)

    def _after_training(self, entry: _Entry, reply: Message) -> Message:
        """What the ClientApp's mods do to a trained reply: attackers rewrite it (the attack mod
        itself, innermost), then the clock times it. A label-flip attacker's reply is already
        the attack mod's (the pack trained the mod's own plan), so there is nothing to rewrite."""
        if self.scenario.attack.kind != "none" and entry.trainer_name != LABEL_FLIP_TRAINER:
            reply = attack_mod(entry.msg, entry.context, lambda _msg, _ctx: reply)
        if entry.ticket is not None:
            reply = account_training(entry.ticket, reply)
        return reply

    def report(self) -> str:
        """One line: how many updates were packed, and the peak memory."""
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        why = f": {'; '.join(sorted(self._logged))}" if self.sequential_updates else ""
        line = (
            f"fedge: packed engine: {self.packed_updates} client updates packed "
            f"({self.sequential_updates} sequential{why}"
            f"{f'; {self.failed_updates} failed by their simulated device' if self.failed_updates else ''}), "
            f"{self.train_seconds:.2f} s of packed "
            f"training, largest pack state {self.peak_pack_bytes / 2**20:.1f} MiB (parameters, "
            f"gradients, momentum, objective context, data; "
            f"engine.pack_size={self.scenario.engine.pack_size}), "
            f"peak RSS {rss_mib:.0f} MiB (with the activations, which grow with the pack too)"
        )
        if self.device.type == "cuda":
            line += f", peak CUDA {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
        ev = self.evaluator
        if ev.packed or ev.sequential:
            why = f": {'; '.join(ev.reasons())}" if ev.sequential and ev.reasons() else ""
            line += (
                f"; {ev.packed} client evaluations packed ({ev.sequential} through the "
                f"ClientApp{why}), {ev.seconds:.2f} s"
            )
        return line
