"""fedge's Flower ClientApp: the same object runs in-process, in Ray actors and on SuperNodes.

Each node learns who it is from ``context.node_config["partition-id"]`` (set by the engine, by
Flower's simulation runtime, or by ``flower-supernode --node-config``) and what to do from the
scenario carried in ``context.run_config``. The local trainer is chosen by ``algorithm.name``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.arrays import received_state_dict, record_from_state_dict, records_of
from clients.attacks import attack_mod
from clients.clock import virtual_clock_mod
from clients.data import ClientData, dataset_info, load_client_data
from clients.identity import (
    IDENTITY_RECORD,
)
from clients.models import build_model
from clients.node import node_scenario, partition_id, resolve_device
from clients.personalization import finetune_metrics
from clients.replies import client_identity, evaluate_reply, train_reply
from clients.seeding import derive_seed, seed_global_torch
from clients.state import STATE_ACTION, restore_state
from clients.trainers import trainer_for, trainer_name_for
from clients.training import TrainJob, evaluate
from edge.lora_downlink import lora_downlink_mod
from scenarios.config import RUN_CONFIG_KEY, Scenario

# Client mods (Flower middleware) wrap every trainer: e.g. the virtual clock, size accounting.
# The LoRA downlink mod sits inside the clock, so the clock counts the compact message; the
# attack mod (a no-op without [attack]) innermost, rewriting what the trainer replied.
MODS: list = [
    virtual_clock_mod,
    lora_downlink_mod,
    attack_mod,
]  # must be filled before the @app.train decorators run

app = ClientApp(mods=MODS)


class Loaded(NamedTuple):
    scenario: Scenario
    data: ClientData
    model: torch.nn.Module  # holding the weights the server sent
    device: torch.device
    state: dict[str, torch.Tensor] | None  # the reused model's state tensors (None: a new model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict; the reused model's without walking its modules again."""
        return self.state if self.state is not None else self.model.state_dict()


def _load(msg: Message, context: Context, reuse_model: bool = False) -> Loaded:
    """The scenario, this client's data and the model the server sent. ``reuse_model``: the
    process's one model of the scenario (see ``clients/training.py::updates_parameters_only``)."""
    scenario = node_scenario(context)
    torch.set_num_threads(scenario.engine.client_threads)
    data = load_client_data(scenario.data, scenario.seed, partition_id(context))
    device = resolve_device(scenario.engine.device)
    if reuse_model:
        model, targets = _reused_model(scenario, device)
    else:
        info = dataset_info(scenario.data)
        model, targets = build_model(scenario.model, info.input_shape, info.num_classes), None
    load_server_arrays(model, msg, context, scenario, targets)
    # Module.to walks every submodule even when nothing moves: skip it for the CPU (built there).
    model = model if device.type == "cpu" else model.to(device)
    return Loaded(scenario, data, model, device, targets)


# Per process, the model of the last scenario (``node_scenario`` caches one Scenario object per
# run config) and device, for trainers that only change parameter values. Flower's runtimes call
# a process's ClientApp one message at a time, so it is never shared by two updates at once.
_REUSED: dict[str, tuple[Scenario, torch.device, torch.nn.Module, dict[str, torch.Tensor]]] = {}


def _reused_model(
    scenario: Scenario, device: torch.device
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    held = _REUSED.get("model")
    if held is None or held[0] is not scenario or held[1] != device:
        info = dataset_info(scenario.data)
        model = build_model(scenario.model, info.input_shape, info.num_classes).to(device)
        # state_dict()'s tensors share the model's storage: copying into them loads the model
        held = _REUSED["model"] = (scenario, device, model, model.state_dict())
    model, targets = held[2], held[3]
    if not model.training:  # as a newly built model is (evaluation leaves it in eval mode)
        model.train()
    return model, targets


def _copy_state(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor] | None,
) -> None:
    """``model.load_state_dict(state)``; a plain copy into ``targets`` (the model's own state
    tensors) when every name and shape matches, which skips load_state_dict's module walk."""
    if (
        targets is not None
        and targets.keys() == state.keys()
        and all(t.shape == state[k].shape for k, t in targets.items())
    ):
        with torch.no_grad():
            for key, tensor in targets.items():
                tensor.copy_(state[key])
        return
    model.load_state_dict(state)  # checks names and shapes, and raises what the caller explains


def load_server_arrays(
    model: torch.nn.Module,
    msg: Message,
    context: Context,
    scenario: Scenario,
    targets: dict[str, torch.Tensor] | None = None,
) -> None:
    """Load the model the server sent into ``model`` (built from the run's scenario).

    A server that is not fedge's (e.g. a stock Flower ``FedAvg`` ServerApp) may send a model
    other than the scenario's, typically because ``run_config["scenario"]`` is missing and this
    client fell back to the default scenario: say so, naming the key, instead of a shape error.
    """
    records = records_of(msg.content, ArrayRecord)
    arrays = records.get("arrays") or next(iter(records.values()), None)
    if arrays is None:
        raise ValueError(
            "the server sent no ArrayRecord (fedge's ClientApp trains a model it sends)"
        )
    try:
        # Decoded once per round and process, not per client (load_state_dict copies them).
        _copy_state(model, received_state_dict(arrays), targets)
    except RuntimeError as err:
        raw = context.run_config.get(RUN_CONFIG_KEY)
        why = (
            f"run_config has no {RUN_CONFIG_KEY!r} key, so this client built the default "
            "scenario's model"
            if raw is None
            else f"run_config[{RUN_CONFIG_KEY!r}] is empty, so this client built the default "
            "scenario's model"
            if not raw
            else f"this client built the model of run_config[{RUN_CONFIG_KEY!r}]"
        )
        detail = str(err).strip().splitlines()
        raise ValueError(
            f"the server's model does not fit this client's ({scenario.model.name} for "
            f"{scenario.data.dataset}): {why}. fedge's ClientApp builds its model from "
            f"run_config[{RUN_CONFIG_KEY!r}] (the scenario as JSON, Scenario.to_run_config()); "
            f"give the run that key (flwr run --run-config \"{RUN_CONFIG_KEY}='<json>'\") and send "
            f"a model built from the same scenario. PyTorch said: {' '.join(detail[1:3]) or detail[0]}"
        ) from None


@app.train()
def train(msg: Message, context: Context) -> Message:
    trainer = trainer_for(node_scenario(context), partition_id(context))
    reuse = getattr(trainer, "updates_parameters_only", False)
    loaded = _load(msg, context, reuse_model=reuse)
    scenario, data, model, device, _ = loaded
    config = msg.content.get("config", ConfigRecord())
    server_round = int(config.get("server-round", 0))
    generator = torch.Generator().manual_seed(
        derive_seed(scenario.seed, server_round, data.partition_id)
    )
    # Trainers get `generator`; the global CPU generator is reseeded too, as before, for any
    # library code that draws from it (results stay bit-identical across engines).
    seed_global_torch(derive_seed(scenario.seed, server_round, data.partition_id, 1))
    result = trainer(
        TrainJob(
            model, data, scenario, config, context.state, generator, device, received=msg.content
        )
    )
    arrays = (
        result.reply_arrays
        if result.reply_arrays is not None
        else record_from_state_dict(loaded.state_dict())  # tensors are moved to the CPU there
    )
    return train_reply(
        msg,
        context,
        data.partition_id,
        trainer_name_for(scenario, data.partition_id),
        arrays,
        result.train_loss,
        result.num_examples,
        result.num_steps,
        result.metrics,
    )


@app.query(STATE_ACTION)
def node_state(msg: Message, context: Context) -> Message:
    """After a resume: say who this node is; then take back the state it had at the checkpoint."""
    restore_state(msg, context)
    pid = partition_id(context)
    return Message(RecordDict({IDENTITY_RECORD: client_identity(context, pid)}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Accuracy of the received model on this client's local test split (and, when the config asks
    for fine-tuning, after fine-tuning it on the local train split: ``personalized_accuracy``)."""
    # Evaluation and fine-tuning (local SGD) only change parameter values.
    scenario, data, model, device, _ = _load(msg, context, reuse_model=True)
    loss, acc = evaluate(model, data.x_test, data.y_test, device)
    tuned = finetune_metrics(
        model, data, scenario, msg.content.get("config", ConfigRecord()), device
    )
    # The packed engine answers with the same builder (clients/packed_eval.py).
    return evaluate_reply(msg, context, data.partition_id, loss, acc, len(data.x_test), tuned)
