"""fedge's Flower ClientApp: the same object runs in-process, in Ray actors and on SuperNodes.

Each node learns who it is from ``context.node_config["partition-id"]`` (set by the engine, by
Flower's simulation runtime, or by ``flower-supernode --node-config``) and what to do from the
scenario carried in ``context.run_config``. The local trainer is chosen by ``algorithm.name``.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.clock import virtual_clock_mod
from clients.data import ClientData, dataset_info, load_client_data
from clients.models import build_model
from clients.node import node_scenario, partition_id, resolve_device
from clients.personalization import finetune_metrics
from clients.seeding import derive_seed
from clients.trainers import trainer_for
from clients.training import TrainJob, evaluate
from edge.lora import lora_downlink_mod
from scenarios.config import Scenario

# Client mods (Flower middleware) wrap every trainer: e.g. the virtual clock, size accounting.
# The LoRA downlink mod sits inside the clock, so the clock counts the compact message.
MODS: list = [
    virtual_clock_mod,
    lora_downlink_mod,
]  # must be filled before the @app.train decorators run

app = ClientApp(mods=MODS)


def _load(
    msg: Message, context: Context
) -> tuple[Scenario, ClientData, torch.nn.Module, torch.device]:
    scenario = node_scenario(context)
    torch.set_num_threads(scenario.engine.client_threads)
    data = load_client_data(scenario.data, scenario.seed, partition_id(context))
    info = dataset_info(scenario.data)
    device = resolve_device(scenario.engine.device)
    model = build_model(scenario.model, info.input_shape, info.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return scenario, data, model.to(device), device


@app.train()
def train(msg: Message, context: Context) -> Message:
    scenario, data, model, device = _load(msg, context)
    config = msg.content.get("config", ConfigRecord())
    server_round = int(config.get("server-round", 0))
    generator = torch.Generator().manual_seed(
        derive_seed(scenario.seed, server_round, data.partition_id)
    )
    torch.manual_seed(derive_seed(scenario.seed, server_round, data.partition_id, 1))
    trainer = trainer_for(scenario, data.partition_id)
    result = trainer(
        TrainJob(
            model, data, scenario, config, context.state, generator, device, received=msg.content
        )
    )
    metrics = MetricRecord(
        {
            "train_loss": result.train_loss,
            "num-examples": result.num_examples,
            "num-steps": result.num_steps,
            "partition-id": data.partition_id,
            **result.metrics,
        }
    )
    arrays = (
        result.reply_arrays
        if result.reply_arrays is not None
        else ArrayRecord(model.to("cpu").state_dict())
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Accuracy of the received model on this client's local test split (and, when the config asks
    for fine-tuning, after fine-tuning it on the local train split: ``personalized_accuracy``)."""
    scenario, data, model, device = _load(msg, context)
    loss, acc = evaluate(model, data.x_test, data.y_test, device)
    tuned = finetune_metrics(
        model, data, scenario, msg.content.get("config", ConfigRecord()), device
    )
    metrics = MetricRecord(
        {
            "local_loss": loss,
            "local_accuracy": acc,
            "num-examples": len(data.x_test),
            "partition-id": data.partition_id,
            **tuned,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
