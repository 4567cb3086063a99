"""The one builder of a client's train reply, used by the ClientApp (``clients/app.py::train``) and
by the packed engine (``fedge/engines/packed.py``) for every client it trains, so both engines
reply with the same records, in the same order, with the same values; likewise
:func:`evaluate_reply` for evaluate replies (``clients/app.py::evaluate_local`` and the packed
engine's ``clients/packed_eval.py``).

A reply's content is ``{"arrays": ArrayRecord, "metrics": MetricRecord, "client": ConfigRecord}``
(plus the node's state when the server asked for it, ``clients/state.py``): the trained arrays,
``train_loss`` / ``num-examples`` / ``num-steps`` and the trainer's extra metrics, and who the
client is (``clients/identity.py``). The records are built without Flower re-checking each entry
when their values are the plain ints, floats and strings built here (a few µs per reply, which
the packed engine pays hundreds of times a round), a trainer's plain int/float extra metrics
included; anything else goes through Flower's checks, and a bad value raises as it always did.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.arrays import fast_record
from clients.identity import (
    DEVICE_PROFILE,
    IDENTITY_RECORD,
    PARTITION_ID,
    RAY_NODE_ID,
    TRAINER,
    ray_node_id,
)
from clients.state import attach_state


def client_identity(context: Context, pid: int, trainer_name: str | None = None) -> ConfigRecord:
    """Who this client is, kept out of the metrics that strategies average (clients/identity.py);
    with the name of the trainer that answered, for a train reply."""
    identity: dict[str, int | str] = {PARTITION_ID: int(pid)}
    profile = context.node_config.get(DEVICE_PROFILE)  # `fedge deploy supernode --device-profile`
    if profile:
        identity[DEVICE_PROFILE] = str(profile)
    node = ray_node_id()  # which machine of a Ray cluster ran this client (clients.jsonl)
    if node is not None:
        identity[RAY_NODE_ID] = node
    if trainer_name is not None:
        identity[TRAINER] = str(trainer_name)
    return fast_record(ConfigRecord, identity)


def train_reply(
    msg: Message,
    context: Context,
    pid: int,
    trainer_name: str,
    arrays: ArrayRecord,
    train_loss: float,
    num_examples: int,
    num_steps: int,
    extra_metrics: Mapping[str, Any] | None = None,
) -> Message:
    """The reply to train instruction ``msg`` from client ``pid`` (node ``context``), whose trainer
    ``trainer_name`` trained ``arrays`` with this loss, number of examples and steps, and the
    trainer's extra metrics (``TrainResult.metrics``, a packed client's ``LocalPlan.metrics``)."""
    values = {"train_loss": train_loss, "num-examples": num_examples, "num-steps": num_steps}
    if extra_metrics:  # e.g. a LocalPlan's cluster id: after the three, as the ClientApp sent them
        values.update(extra_metrics)
    # Plain str keys and int/float values pass Flower's checks as they are (a packed plan's extra
    # metrics included, so every packed method keeps the fast path); anything else is checked.
    if all(type(k) is str and type(v) in (int, float) for k, v in values.items()):
        metrics = fast_record(MetricRecord, values)
    else:
        metrics = MetricRecord(values)  # Flower checks each value; a bad one raises
    identity = client_identity(context, pid, trainer_name)
    content = fast_record(
        RecordDict, {"arrays": arrays, "metrics": metrics, IDENTITY_RECORD: identity}
    )
    config = msg.content.get("config")
    if isinstance(config, ConfigRecord):
        attach_state(content, context, config)  # for the server's checkpoint (clients/state.py)
    return Message(content, reply_to=msg)


def evaluate_reply(
    msg: Message,
    context: Context,
    pid: int,
    loss: float,
    accuracy: float,
    num_examples: int,
    personalized: Mapping[str, Any] | None = None,
) -> Message:
    """The reply to evaluate instruction ``msg`` from client ``pid`` (node ``context``): the received
    model's loss and accuracy on the client's local test split of ``num_examples`` examples, and
    the ``personalized_*`` metrics after fine-tuning when the server asked for them
    (``clients/personalization.py::finetune_metrics``); the client's identity beside them."""
    values = {"local_loss": loss, "local_accuracy": accuracy, "num-examples": num_examples}
    if personalized:
        values.update(personalized)
    if all(type(k) is str and type(v) in (int, float) for k, v in values.items()):
        metrics = fast_record(MetricRecord, values)
    else:
        metrics = MetricRecord(values)  # Flower checks each value; a bad one raises
    identity = client_identity(context, pid)
    content = fast_record(RecordDict, {"metrics": metrics, IDENTITY_RECORD: identity})
    return Message(content, reply_to=msg)
