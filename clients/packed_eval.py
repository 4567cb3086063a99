"""Packed client evaluation: a round's EVALUATE messages answered together, for the packed engine
(``fedge/engines/packed.py``), with the replies the ClientApp's ``clients/app.py::evaluate_local``
would send, built by the same ``clients/replies.py::evaluate_reply``.

Every algorithm's client evaluation is that one ClientApp function (no algorithm registers its
own): load the model the server sent (``arrays``; a clustered method sends each client its cluster
model, never the candidates, which only training instructions carry), compute the mean
cross-entropy and accuracy on the client's local test split, and, when the evaluate config asks
for personalization (``finetune-epochs`` / ``finetune-steps``), fine-tune that model with local
SGD on the local train split (its own seed stream) and test it again
(``clients/personalization.py::finetune_metrics``). Here:

- the received model is evaluated once per distinct sent model (strategies send one record to
  many nodes: one forward over the concatenated test splits of its clients; a clustered strategy
  sends one per cluster), each client's loss and accuracy computed from its own rows of the logits
  exactly as ``clients/training.py::evaluate`` computes them (sum of cross-entropy per 1,024-row
  chunk, argmax hits);
- fine-tuning is the packed trainer (``clients/packed.py::train_packed``) running plain SGD on
  cross-entropy with the ClientApp's schedule (``finetune_schedule``) and generators
  (``finetune_generator``), and the fine-tuned models are tested in one forward over the stacked
  client models (``torch.func.vmap``).

The metrics equal the ClientApp's to float tolerance, not bit for bit: a batched matrix product
may sum a row in another order than the client's own (measured: an MLP's logits differ in the last
bit for some clients, cross-entropy sums within ~1e-7 relative), and fine-tuning differs as packed
training does (``tests/test_packed_eval.py``). Everything else of the reply (record names, order,
``num-examples``, the identity record) is the ClientApp's.

The ClientApp's mods keep their meaning: the virtual clock (``[devices]``) and the attack mod pass
evaluate messages through untouched (they time, fail and poison training only), so a packed
evaluation is the same plain one; a LoRA downlink message (``lora-sync``, which the LoRA mod turns
into a merged model) goes through the ClientApp, as does a message without an ``arrays`` record
or whose model does not fit the scenario's (the ClientApp replies with its explained error).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import MessageType
from torch.func import functional_call, vmap
from torch.nn import functional as F

from clients.arrays import received_state_dict
from clients.data import ClientData, dataset_info, load_client_data
from clients.models import build_model
from clients.node import partition_id
from clients.packed import PackedClient, train_packed
from clients.personalization import finetune_generator, finetune_request, finetune_schedule
from clients.replies import evaluate_reply
from clients.training import LocalPlan
from edge.lora_downlink import SYNC_KEY
from scenarios.config import Scenario

log = logging.getLogger("fedge.packed")

EVAL_BATCH = 1024  # clients/training.py::evaluate's chunk: its loss is summed per chunk


@dataclass
class _EvalEntry:
    """One evaluate message the pack answers: its client's data and the model it was sent."""

    pos: int
    msg: Message
    context: Context
    data: ClientData
    state: dict[str, torch.Tensor]  # the received model's tensors (read-only)
    config: ConfigRecord
    local: tuple[float, float] = (math.nan, math.nan)
    personalized: dict[str, float] | None = None


def split_metrics(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of one client's ``logits`` rows against its labels ``y``,
    summed as ``clients/training.py::evaluate`` sums them; (nan, nan) for an empty split."""
    n = len(y)
    if n == 0:
        return float("nan"), float("nan")
    loss_sum, correct = 0.0, 0
    for start in range(0, n, EVAL_BATCH):
        lb, yb = logits[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
        loss_sum += float(F.cross_entropy(lb, yb, reduction="sum"))
        correct += int((lb.argmax(1) == yb).sum())
    return loss_sum / n, correct / n


class PackedEvaluator:
    """Answers a round's evaluate messages together; see the module docstring."""

    def __init__(self, scenario: Scenario, device: torch.device) -> None:
        self.scenario = scenario
        self.device = device
        info = dataset_info(scenario.data)
        # The forward's template (eval mode, as evaluate() puts the ClientApp's model) and the
        # fine-tuning pack's (train_packed moves it to the device and sets train mode).
        self.model = build_model(scenario.model, info.input_shape, info.num_classes).eval()
        self.finetune_model = build_model(scenario.model, info.input_shape, info.num_classes)
        self._names = [k for k, _ in self.model.named_parameters()]
        self._shapes = {k: tuple(p.shape) for k, p in self.model.named_parameters()}
        self._data: dict[int, ClientData] = {}
        # id(sent ArrayRecord) -> its tensors, for one call's messages (a clustered strategy sends
        # more distinct models than clients/arrays.py's decode cache holds)
        self._received: dict[int, dict[str, torch.Tensor]] = {}
        self._logged: set[str] = set()
        self.packed = 0  # evaluate replies the pack built
        self.sequential = 0  # evaluate messages left to the ClientApp
        self.seconds = 0.0

    def _note(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("packed engine: evaluating through the ClientApp because %s", reason)

    def reasons(self) -> list[str]:
        return sorted(self._logged)

    # ------------------------------------------------------------------------------------------
    def _entry(self, pos: int, msg: Message, context: Context) -> _EvalEntry | None:
        """The pack's view of one evaluate message; None (reason noted) for the ClientApp."""
        content = msg.content
        if SYNC_KEY in content:
            self._note("a LoRA downlink message is merged by its mod (edge/lora_downlink.py)")
            return None
        arrays = content.get("arrays")
        if not isinstance(arrays, ArrayRecord):
            self._note("an evaluate message has no 'arrays' ArrayRecord")
            return None
        state = self._received.get(id(arrays))
        if state is None:
            state = self._received[id(arrays)] = received_state_dict(arrays)
        if list(state) != self._names or any(
            tuple(t.shape) != self._shapes[k] for k, t in state.items()
        ):
            self._note("a sent model does not fit the scenario's (the ClientApp explains)")
            return None
        pid = partition_id(context)
        data = self._data.get(pid)
        if data is None:  # a run's client data never changes (load_client_data caches)
            data = self._data[pid] = load_client_data(self.scenario.data, self.scenario.seed, pid)
        config = content.get("config")
        config = config if isinstance(config, ConfigRecord) else ConfigRecord()
        return _EvalEntry(pos, msg, context, data, state, config)

    def __call__(
        self, messages: list[Message], contexts: dict[int, Context]
    ) -> dict[int, tuple[Message, float]]:
        """Replies (and the seconds the pack took) for the evaluate messages it answered, by
        position in ``messages``; the others are left to the ClientApp."""
        entries: list[_EvalEntry] = []
        # Per call: id() keys of this call's sent records are only unique while they are alive.
        self._received = {}
        for pos, msg in enumerate(messages):
            if msg.metadata.message_type != MessageType.EVALUATE:
                continue
            context = contexts.get(msg.metadata.dst_node_id)
            entry = self._entry(pos, msg, context) if context is not None else None
            if entry is None:
                self.sequential += 1
            else:
                entries.append(entry)
        self._received = {}
        if not entries:
            return {}
        t0 = time.perf_counter()
        torch.set_num_threads(self.scenario.engine.client_threads)  # as the ClientApp's _load
        size = self.scenario.engine.pack_size
        by_model: dict[int, list[_EvalEntry]] = {}  # one forward per distinct sent model
        for entry in entries:
            by_model.setdefault(id(entry.state), []).append(entry)
        finetune: dict[tuple[int, int], list[_EvalEntry]] = {}
        for group in by_model.values():
            for start in range(0, len(group), size):
                self._evaluate_shared(group[start : start + size])
        for entry in entries:
            request = finetune_request(entry.config)
            if request is not None and len(entry.data.x_train) > 0:
                finetune.setdefault(request, []).append(entry)
            elif request is not None:
                entry.personalized = {}  # no train split: finetune_metrics reports nothing
        failed: set[int] = set()
        for request, group in finetune.items():
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                try:
                    self._finetune(request, chunk)
                except Exception as ex:  # the ClientApp still answers these nodes
                    self._note(f"the fine-tuning pack raised {type(ex).__name__}: {ex}")
                    failed.update(e.pos for e in chunk)
        seconds = time.perf_counter() - t0  # the nodes evaluated "in parallel"
        self.seconds += seconds
        out: dict[int, tuple[Message, float]] = {}
        for entry in entries:
            if entry.pos in failed:
                self.sequential += 1
                continue
            loss, acc = entry.local
            reply = evaluate_reply(
                entry.msg,
                entry.context,
                entry.data.partition_id,
                loss,
                acc,
                len(entry.data.x_test),
                entry.personalized,
            )
            out[entry.pos] = (reply, seconds)
            self.packed += 1
        return out

    def _evaluate_shared(self, chunk: list[_EvalEntry]) -> None:
        """The received model (the same for the whole chunk) on every client's test split: one
        forward over the concatenated splits."""
        state = {k: v.to(self.device) for k, v in chunk[0].state.items()}
        with_data = [e for e in chunk if len(e.data.x_test) > 0]
        if with_data:
            x = torch.from_numpy(_concat([e.data.x_test for e in with_data])).to(self.device)
            y = torch.from_numpy(_concat([e.data.y_test for e in with_data])).to(self.device)
            with torch.no_grad():
                logits = functional_call(self.model.to(self.device), state, (x,))
            offset = 0
            for e in with_data:
                n = len(e.data.x_test)
                e.local = split_metrics(logits[offset : offset + n], y[offset : offset + n])
                offset += n
        for e in chunk:
            if len(e.data.x_test) == 0:
                e.local = (float("nan"), float("nan"))

    def _finetune(self, request: tuple[int, int], chunk: list[_EvalEntry]) -> None:
        """Fine-tune the chunk's clients in one pack, then test the stacked tuned models."""
        schedules = [finetune_schedule(self.scenario, request, len(e.data.x_train)) for e in chunk]
        # One SGD setting for the pack; each client's own step cap: with finetune-steps a client
        # runs ceil(steps / its batches per epoch) epochs, which train_packed derives from the cap.
        cfg = max((s[0] for s in schedules), key=lambda c: c.epochs)
        clients = [
            PackedClient(
                e.data,
                e.state,
                finetune_generator(self.scenario, e.config, e.data.partition_id),
                {},
                max_steps,
            )
            for e, (_, max_steps) in zip(chunk, schedules, strict=True)
        ]
        results = train_packed(self.finetune_model, clients, LocalPlan(cfg=cfg), self.device)
        stack = {k: v.to(self.device) for k, v in results[0].stack.items()}
        rows = torch.tensor([r.row for r in results], device=self.device)
        params = {k: v[rows] for k, v in stack.items()}  # the chunk's order
        longest = max(len(e.data.x_test) for e in chunk)
        if longest == 0:
            for e in chunk:
                e.personalized = {"personalized_loss": math.nan, "personalized_accuracy": math.nan}
            return
        x0 = torch.from_numpy(chunk[0].data.x_test)
        padded = torch.zeros((len(chunk), longest, *x0.shape[1:]), dtype=x0.dtype)
        for i, e in enumerate(chunk):
            padded[i, : len(e.data.x_test)] = torch.from_numpy(e.data.x_test)
        model = self.model.to(self.device)

        def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, p, (x,))

        with torch.no_grad():
            logits = vmap(forward)(params, padded.to(self.device))
        for i, e in enumerate(chunk):
            n = len(e.data.x_test)
            y = torch.from_numpy(e.data.y_test).to(self.device)
            loss, acc = split_metrics(logits[i, :n], y)
            e.personalized = {"personalized_loss": loss, "personalized_accuracy": acc}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
