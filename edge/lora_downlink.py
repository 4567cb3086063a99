"""The client side of the LoRA downlink as a Flower mod, light enough for every ClientApp.

Every fedge ClientApp carries this mod, but only ``lora_sparse`` runs send its records: the mod
imports ``edge.lora`` (and with it ``peft``) only when a message carries ``lora-sync``, so a
FedAvg run never loads peft.
"""

from __future__ import annotations

import copy

from flwr.app import Context, Message, RecordDict

from algorithms.lora_sparse import BASE_KEY, SYNC_KEY


def lora_downlink_mod(msg: Message, context: Context, call_next) -> Message:
    """Turn a LoRA downlink (base once + an adapter packet as ``arrays``) into the merged model the
    ClientApp expects in ``arrays``. Sits inside the virtual clock, so the clock counts the bytes
    that really arrived. Messages without ``lora-sync`` pass through untouched."""
    if not msg.has_content() or SYNC_KEY not in msg.content:
        return call_next(msg, context)
    from edge.lora import apply_downlink  # only LoRA runs pay for peft
    from scenarios.config import RUN_CONFIG_KEY, Scenario

    scenario = Scenario.from_run_config({RUN_CONFIG_KEY: context.run_config[RUN_CONFIG_KEY]})
    arrays = apply_downlink(msg.content, context.state, scenario)
    local = copy.copy(msg)  # the in-process grid shares the server's object: do not edit it
    local.__dict__["_content"] = RecordDict(
        {**{k: v for k, v in msg.content.items() if k != BASE_KEY}, "arrays": arrays}
    )
    return call_next(local, context)
