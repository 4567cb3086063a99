"""The packed engine (``engine.name = "packed"``): the in-process grid, with a round's training
messages handed to one batched trainer (``clients/packed.py``) instead of one ClientApp call each.

Same ServerApp, strategies, reply validation and metrics: :class:`PackedTrainer` returns one reply
per node, built by the ClientApp's own ``clients/replies.py::train_reply``; its arrays are rows of
the pack's stacked result (``clients/arrays.py::records_from_stack``). Clients it cannot pack go through the
ClientApp as in the ``inprocess`` engine, with the reason logged once:

- the scenario has ``[devices]`` (the virtual clock fails, caps and times each client on its own);
- the ClientApp carries mods other than the virtual clock (and the attack mod, a no-op without
  ``[attack]``), or the scenario simulates an ``[attack]``;
- the client's trainer is not fedge's own FedAvg/FedProx (edge trainers, clustered, FedLD, ...);
- the model has buffers; the client has no training data; the pack itself raised.

Memory is bounded by training at most ``engine.pack_size`` clients at a time; the largest pack's
stacked state, the process's peak RSS (which also holds the pack's activations: ~2 MiB per client
for the quickstart's cnn1d, a few KiB for a small MLP) and CUDA's peak when used are printed at the
end of the run. ``engine.device = "cuda"`` puts the pack on the GPU.
"""

from __future__ import annotations

import logging
import resource
import time

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.common import MessageType

from clients.arrays import received_state_dict, records_from_stack
from clients.attacks import attack_mod
from clients.clock import MAX_STEPS_KEY, virtual_clock_mod
from clients.data import ClientData, dataset_info, load_client_data
from clients.fedavg import train_fedavg
from clients.fedprox import train_fedprox
from clients.models import build_model
from clients.node import partition_id
from clients.packed import PackedClient, pack_bytes, train_packed, unpackable_reason
from clients.replies import train_reply
from clients.seeding import derive_seeds
from clients.trainers import get_trainer, trainer_name_for
from edge.lora_downlink import lora_downlink_mod
from scenarios.config import Scenario

log = logging.getLogger("fedge.packed")

# The trainers the pack reproduces, by identity: a re-registered "fedavg" is not packed.
PACKABLE = {train_fedavg: 0.0, train_fedprox: None}  # trainer -> fixed mu (None: from config)


class PackedTrainer:
    """Trains a round's packable train messages together; see the module docstring."""

    def __init__(self, scenario: Scenario, device: torch.device, client_mods: list) -> None:
        self.scenario = scenario
        self.device = device
        info = dataset_info(scenario.data)
        self.model = build_model(scenario.model, info.input_shape, info.num_classes)
        self.reason = self._scenario_reason(client_mods)
        self._logged: set[str] = set()
        self.packed_updates = 0
        self.sequential_updates = 0
        self.peak_pack_bytes = 0
        self.train_seconds = 0.0
        self._data: dict[int, ClientData] = {}  # partition id -> its data
        self._received: dict[int, dict[str, torch.Tensor]] = {}
        if self.reason:
            self._note(self.reason)

    def _scenario_reason(self, client_mods: list) -> str | None:
        if self.scenario.devices is not None:
            return "[devices] is set: the virtual clock times and fails each client on its own"
        if self.scenario.attack.kind != "none":
            return "[attack] is set: attackers rewrite their own replies in a client mod"
        # The LoRA downlink mod only touches lora_sparse messages, whose trainer is never packed;
        # the attack mod passes every message through untouched when no [attack] is set.
        if any(
            mod not in (virtual_clock_mod, lora_downlink_mod, attack_mod) for mod in client_mods
        ):
            return "the ClientApp has mods besides the virtual clock"
        return unpackable_reason(self.model)

    def _note(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("packed engine: training sequentially because %s", reason)

    # ------------------------------------------------------------------------------------------
    def _client(self, msg: Message, context: Context) -> tuple[PackedClient, str, int] | None:
        """The pack's view of one message, the client's trainer name and the server round, or
        None (with the reason noted) if it cannot join."""
        if msg.metadata.message_type != MessageType.TRAIN or "arrays" not in msg.content:
            return None  # evaluation and custom actions always go through the ClientApp
        pid = partition_id(context)
        trainer_name = trainer_name_for(self.scenario, pid)
        trainer = get_trainer(trainer_name)
        if trainer not in PACKABLE:
            self._note(f"trainer {trainer_name!r} is not FedAvg/FedProx local SGD")
            return None
        data = self._data.get(pid)
        if data is None:  # the data of a run's clients never changes (load_client_data caches)
            data = self._data[pid] = load_client_data(self.scenario.data, self.scenario.seed, pid)
        if len(data.x_train) == 0:
            return None  # the ClientApp replies with the trainer's own error
        config = msg.content.get("config")
        config = config if isinstance(config, ConfigRecord) else ConfigRecord()
        server_round = int(config.get("server-round", 0))
        mu = PACKABLE[trainer]
        if mu is None:  # FedProx: as clients/fedprox.py reads it
            mu = float(config.get("proximal-mu", getattr(self.scenario.algorithm, "mu", 0.0)))
        arrays = msg.content["arrays"]
        state = self._received.get(id(arrays))  # strategies send one record to many nodes
        if state is None:
            state = self._received[id(arrays)] = received_state_dict(arrays)
        client = PackedClient(
            data=data,
            state=state,
            generator=torch.Generator(),  # seeded by __call__, for every client at once
            mu=mu,
            max_steps=int(config[MAX_STEPS_KEY]) if MAX_STEPS_KEY in config else None,
        )
        return client, trainer_name, server_round

    def __call__(
        self, messages: list[Message], contexts: dict[int, Context]
    ) -> dict[int, tuple[Message, float]]:
        """Replies (and per-node seconds) for the messages it trained, by position in ``messages``."""
        if self.reason:
            return {}
        chosen: list[tuple[int, Message, PackedClient, str]] = []
        rounds: list[int] = []
        self._received = {}  # id(sent ArrayRecord) -> its tensors, for this call's messages
        for pos, msg in enumerate(messages):
            context = contexts.get(msg.metadata.dst_node_id)
            joined = self._client(msg, context) if context is not None else None
            if joined is not None:
                client, trainer_name, server_round = joined
                chosen.append((pos, msg, client, trainer_name))
                rounds.append(server_round)
        self._received = {}
        # The generator clients/app.py::train gives each client this round.
        seeds = derive_seeds(
            [
                (self.scenario.seed, server_round, client.data.partition_id)
                for server_round, (_, _, client, _) in zip(rounds, chosen, strict=True)
            ]
        )
        for (_, _, client, _), seed in zip(chosen, seeds, strict=True):
            client.generator.manual_seed(seed)
        self.sequential_updates += sum(
            m.metadata.message_type == MessageType.TRAIN for m in messages
        ) - len(chosen)
        out: dict[int, tuple[Message, float]] = {}
        size = self.scenario.engine.pack_size
        torch.set_num_threads(self.scenario.engine.client_threads)
        for start in range(0, len(chosen), size):
            chunk = chosen[start : start + size]
            t0 = time.perf_counter()
            try:
                results = train_packed(
                    self.model, [c for _, _, c, _ in chunk], self.scenario.train, self.device
                )
            except Exception as ex:  # the ClientApp path still gives every node its own reply
                self._note(f"the pack raised {type(ex).__name__}: {ex}")
                self.sequential_updates += len(chunk)
                continue
            seconds = time.perf_counter() - t0  # the chunk's nodes trained "in parallel"
            self.train_seconds += seconds
            self.packed_updates += len(chunk)
            prox = any(c.mu > 0 for _, _, c, _ in chunk)
            self.peak_pack_bytes = max(
                self.peak_pack_bytes,
                pack_bytes(self.model, len(chunk), self.scenario.train, prox)
                + sum(c.data.x_train.nbytes + c.data.y_train.nbytes for _, _, c, _ in chunk),
            )
            # Every reply's arrays are a row of the pack's stacked result (no copy per client;
            # the server reads the rows back as one stack: server/validation.py, server/fedavg.py).
            records = records_from_stack({k: v.numpy() for k, v in results[0].stack.items()})
            for (pos, msg, client, trainer_name), result in zip(chunk, results, strict=True):
                reply = train_reply(
                    msg,
                    contexts[msg.metadata.dst_node_id],
                    client.data.partition_id,
                    trainer_name,
                    records[result.row],
                    result.train_loss,
                    result.num_examples,
                    result.num_steps,
                )
                out[pos] = (reply, seconds)
        return out

    def report(self) -> str:
        """One line: how many updates were packed, and the peak memory."""
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        line = (
            f"fedge: packed engine: {self.packed_updates} client updates packed "
            f"({self.sequential_updates} sequential), {self.train_seconds:.2f} s of packed "
            f"training, largest pack state {self.peak_pack_bytes / 2**20:.1f} MiB (parameters, "
            f"gradients, momentum, data; engine.pack_size={self.scenario.engine.pack_size}), "
            f"peak RSS {rss_mib:.0f} MiB (with the activations, which grow with the pack too)"
        )
        if self.device.type == "cuda":
            line += f", peak CUDA {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
        return line
