"""Simulated poisoning: a Flower client mod that turns the ``[attack]`` clients into attackers.

Being a mod, it wraps every trainer without touching any. For the partition ids in
``attack.clients`` and training messages only:

================  ==================================================================================
``sign_flip``     train honestly, reply the update flipped:  w_sent − s·Δ  (s = ``strength``,
                  default 1)
``scale``         train honestly, reply  w_sent + s·Δ  (default s = 10): a boosted update
``gaussian``      reply  w_sent + N(0, s²) per entry (default s = 1): noise instead of an update
``label_flip``    train with plain local SGD on labels y → C − 1 − y (data poisoning)
``free_rider``    reply the model it was sent (+ N(0, s²) noise, default s = 0), claiming its usual
                  ``num-examples`` and metrics
``inflated_weight``  train honestly, claim ``num-examples`` = s (default 10⁹, the validator's limit):
                  a client that wants its data to outweigh everybody else's
``alie``, ``ipm`` train honestly here; the server replaces their replies (``server/omniscient_attack.py``,
                  simulation only: those attacks need the round's honest updates)
================  ==================================================================================

with Δ = w_trained − w_sent over the floating-point tensors (integer buffers are left alone). The
noise is seeded from (scenario seed, round, partition id), so attacked runs are reproducible.
The server marks attackers in ``clients.jsonl`` (``attacker = 1``, see ``server/robust.py``).
For label_flip the attacker trains with plain SGD whatever the algorithm's own trainer is, by a
declared local step (:func:`label_flip_plan`) that the packed engine trains too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.arrays import record_from_state_dict
from clients.data import dataset_info, load_client_data
from clients.models import build_model
from clients.node import node_scenario, resolve_device
from clients.replies import train_reply
from clients.seeding import derive_seed
from clients.training import LocalPlan, TrainJob, cross_entropy_objective, run_local_plan
from scenarios.config import Scenario

DEFAULT_STRENGTH = {
    "sign_flip": 1.0,
    "scale": 10.0,
    "gaussian": 1.0,
    "free_rider": 0.0,
    "label_flip": 0.0,
    "inflated_weight": 1e9,
}
# Attacks that need every honest update of the round: simulated on the server, not in this mod.
SERVER_SIDE_KINDS = ("alie", "ipm")
ATTACK_SEED_TAG = 0xA77AC
LABEL_FLIP_TRAINER = "local_sgd (label_flip attacker)"  # the trainer its clients.jsonl rows name


def strength_of(scenario: Scenario) -> float:
    attack = scenario.attack
    return DEFAULT_STRENGTH[attack.kind] if attack.strength is None else attack.strength


def poison_arrays(
    kind: str,
    strength: float,
    trained: dict[str, np.ndarray],
    sent: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The attacker's reply from its honest result ``trained`` and the model ``sent`` to it."""
    out = {}
    for key, value in trained.items():
        base = sent.get(key)
        if base is None or base.shape != value.shape or value.dtype.kind != "f":
            out[key] = value
            continue
        update = value - base
        if kind == "sign_flip":
            new = base - strength * update
        elif kind == "scale":
            new = base + strength * update
        elif kind in ("gaussian", "free_rider"):
            new = base + rng.normal(0.0, strength, size=base.shape) if strength > 0 else base
        else:
            new = value
        out[key] = np.asarray(new, dtype=value.dtype)
    return out


@dataclass(frozen=True)
class FlippedLabelsObjective:
    """The label-flip attacker's local objective (an ``Objective``): plain cross-entropy against
    the flipped labels y → C − 1 − y. The one place the flip is declared: the attack mod trains
    by it (:func:`label_flip_plan`), and so does the packed engine."""

    num_classes: int

    def __call__(
        self,
        params: dict[str, torch.Tensor],
        logits: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor | None,
        context: dict[str, Any],
    ) -> torch.Tensor:
        return cross_entropy_objective(params, logits, self.num_classes - 1 - y, weight, context)


def label_flip_plan(job: TrainJob) -> LocalPlan:
    """What a label-flip attacker trains, whatever the algorithm's own trainer is: plain local SGD
    (the scenario's [train]) on flipped labels, from the model it was sent."""
    return LocalPlan(FlippedLabelsObjective(dataset_info(job.scenario.data).num_classes))


def trains_flipped_labels(scenario: Scenario, pid: int) -> bool:
    """Whether client ``pid`` is a label-flip attacker (it trains by :func:`label_flip_plan`)."""
    return scenario.attack.kind == "label_flip" and pid in scenario.attack.clients


def _label_flip_train(msg: Message, context: Context, scenario: Scenario, pid: int) -> Message:
    """The label-flip attacker's reply: :func:`label_flip_plan` trained on this client's data."""
    info = dataset_info(scenario.data)
    data = load_client_data(scenario.data, scenario.seed, pid)
    config = msg.content.get("config", ConfigRecord())
    server_round = int(config.get("server-round", 0))
    device = resolve_device(scenario.engine.device)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    generator = torch.Generator().manual_seed(derive_seed(scenario.seed, server_round, pid))
    job = TrainJob(model.to(device), data, scenario, config, context.state, generator, device)
    result = run_local_plan(job, label_flip_plan(job))
    return train_reply(
        msg,
        context,
        pid,
        LABEL_FLIP_TRAINER,
        record_from_state_dict(model.state_dict()),
        result.train_loss,
        result.num_examples,
        result.num_steps,
        result.metrics,
    )


def attack_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: attackers (``attack.clients``) poison their training replies."""
    if msg.metadata.message_type.split(".")[0] != "train":
        return call_next(msg, context)
    scenario = node_scenario(context)
    attack = scenario.attack
    pid = int(context.node_config.get("partition-id", -1))
    if attack.kind in ("none", *SERVER_SIDE_KINDS) or pid not in attack.clients:
        return call_next(msg, context)
    if trains_flipped_labels(scenario, pid):
        return _label_flip_train(msg, context, scenario, pid)

    reply = call_next(msg, context)
    if reply.has_error() or "arrays" not in msg.content.array_records:
        return reply
    config = msg.content.get("config", ConfigRecord())
    rng = np.random.default_rng(
        derive_seed(scenario.seed, int(config.get("server-round", 0)), pid, ATTACK_SEED_TAG)
    )
    sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    content = RecordDict(dict(reply.content.items()))
    if attack.kind == "inflated_weight":
        for name, record in reply.content.metric_records.items():
            content[name] = MetricRecord(
                {**dict(record.items()), "num-examples": int(strength_of(scenario))}
            )
        reply.content = content
        return reply
    for name, record in reply.content.array_records.items():
        trained = {k: v.numpy() for k, v in record.items()}
        poisoned = poison_arrays(attack.kind, strength_of(scenario), trained, sent, rng)
        content[name] = ArrayRecord({k: Array(v) for k, v in poisoned.items()})
    reply.content = content
    return reply
