"""Personalized evaluation, for every algorithm: fine-tune the received model on the local train
split, then test it on the local test split.

The server asks for it through the evaluate instruction's config (``finetune-epochs`` and/or
``finetune-steps``, see ``PersonalizationConfig``); without those keys nothing happens, so a stock
Flower server still gets plain local accuracy.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from clients.data import ClientData
from clients.seeding import derive_seed
from clients.training import TrainJob, evaluate, local_sgd
from scenarios.config import Scenario, TrainConfig

FINETUNE_EPOCHS_KEY = "finetune-epochs"
FINETUNE_STEPS_KEY = "finetune-steps"
_FINETUNE_STREAM = 2  # a seed stream of its own, apart from training's


def finetune_request(config: ConfigRecord) -> tuple[int, int] | None:
    """``(epochs, steps)`` of the fine-tuning the evaluate config asks for; None when it asks for
    none (both 0 or absent)."""
    epochs = int(config.get(FINETUNE_EPOCHS_KEY, 0))
    steps = int(config.get(FINETUNE_STEPS_KEY, 0))
    if epochs <= 0 and steps <= 0:
        return None
    return epochs, steps


def finetune_generator(
    scenario: Scenario, config: ConfigRecord, partition_id: int
) -> torch.Generator:
    """The shuffling generator of client ``partition_id``'s fine-tuning this round (a seed stream of
    its own, apart from training's)."""
    server_round = int(config.get("server-round", 0))
    return torch.Generator().manual_seed(
        derive_seed(scenario.seed, server_round, partition_id, _FINETUNE_STREAM)
    )


def finetune_schedule(
    scenario: Scenario, request: tuple[int, int], n_train: int
) -> tuple[TrainConfig, int | None]:
    """The SGD settings and step cap of a fine-tuning ``request`` on ``n_train`` examples:
    ``steps`` > 0 runs that many steps (the epochs they start), else ``epochs`` epochs."""
    epochs, steps = request
    if steps > 0:
        per_epoch = math.ceil(n_train / scenario.train.batch_size)
        epochs = math.ceil(steps / per_epoch)
    return scenario.train.model_copy(update={"epochs": epochs}), steps if steps > 0 else None


def finetune_metrics(
    model: nn.Module,
    data: ClientData,
    scenario: Scenario,
    config: ConfigRecord,
    device: torch.device,
) -> dict[str, float]:
    """Fine-tune ``model`` in place as the config asks; return ``personalized_{accuracy,loss}``.

    ``finetune-steps`` > 0 runs that many SGD steps (at ``train.lr``, ``train.batch_size``),
    else ``finetune-epochs`` epochs; both 0 or absent: no fine-tuning, no metrics. The packed
    engine fine-tunes a round's clients together with the same schedule and generators
    (``clients/packed_eval.py``).
    """
    request = finetune_request(config)
    if request is None or len(data.x_train) == 0:
        return {}
    generator = finetune_generator(scenario, config, data.partition_id)
    cfg, max_steps = finetune_schedule(scenario, request, len(data.x_train))
    job = TrainJob(model, data, scenario, config, RecordDict(), generator, device)
    local_sgd(job, cfg=cfg, max_steps=max_steps)
    loss, acc = evaluate(model, data.x_test, data.y_test, device)
    return {"personalized_loss": loss, "personalized_accuracy": acc}
