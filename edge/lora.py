"""LoRA clients with top-k sparse adapter updates and error feedback (CELLM-style), using ``peft``.

Protocol (algorithm ``lora_sparse``; server side in ``server/lora_sparse.py``, wire format in
``algorithms/lora_sparse.py``):

* The frozen base W is the zoo model pre-trained centrally by the server on its proxy set
  (``algorithm.pretrain_epochs``; nothing is downloaded). A node receives it once, on first
  contact (or when backprop clients in the same federation changed it), and keeps it in its
  ``Context.state``; the bytes of that delivery are counted in the round it happens.
* Every target ``nn.Linear`` gets ``peft`` LoRA factors (rank r, alpha). The *global adapters*
  (A, B) start from a point every node can compute alone — ``A₀`` drawn by peft under
  ``derive_seed(scenario.seed, LORA_SEED_TAG)``, ``B₀ = 0`` — and from then on travel only as
  sparse packets: each train/evaluate message's ``arrays`` is one packet, the change of the
  broadcast adapters since the version this node holds (``lora-sync``: from/to version). :func:`lora_downlink_mod`
  (``edge/lora_downlink.py``)
  applies it to the node's copy and hands the ClientApp the merged model ``W + (α/r)·B·A`` as
  the usual ``arrays`` record, so evaluation and backprop trainers work unchanged.
* The ``lora`` trainer trains only the adapters, starting from the node's copy, and replies with
  one packet: the top-k per tensor of its update (density ρ; values only when ρ = 1) with error
  feedback — the residual of what was not sent, rounding included, waits in ``Context.state``.
"""

from __future__ import annotations

import copy

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from peft import LoraConfig, get_peft_model
from torch import nn

from algorithms.lora_sparse import (
    BASE_KEY,
    PACKET_KEY,
    REPLACE_KEY,
    SYNC_KEY,
    LoraSparseConfig,
    decode_packet,
    dense_values_bytes,
    flatten,
    sparsify_with_feedback,
    unflatten,
)
from clients.data import dataset_info
from clients.models import build_model
from clients.seeding import derive_seed
from clients.training import TrainJob, TrainResult, local_sgd
from scenarios.config import Scenario

LORA_SEED_TAG = 0x10A4
RESIDUAL_KEY = "lora-residual"
# Records of a LoRA downlink message and of the node's state.
ADAPTERS_KEY = "lora-adapters"  # node state: {"flat": H}; the message's packet is its "arrays"
FLAT = "flat"
BASE_MISSING = "lora-base-missing"  # in an error reason: the server must resend the base


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Linear`` modules (the LoRA targets)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def lora_config(model: nn.Module, cfg: LoraSparseConfig) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=linear_names(model))


def wrap_lora(model: nn.Module, cfg: LoraSparseConfig, seed: int) -> nn.Module:
    """``peft`` LoRA on a copy of ``model`` with adapters initialised from the shared ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, LORA_SEED_TAG))
        return get_peft_model(copy.deepcopy(model), lora_config(model, cfg))


def _lora_layers(peft_model: nn.Module, names: list[str]):
    inner = peft_model.base_model.model
    for name in names:
        layer = inner.get_submodule(name)
        yield name, layer.lora_A["default"].weight, layer.lora_B["default"].weight


def adapter_factors(peft_model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """``{"<layer>.lora_A": A, "<layer>.lora_B": B}`` of a peft-wrapped zoo model (detached copies)."""
    out = {}
    for name, a, b in _lora_layers(peft_model, names):
        out[f"{name}.lora_A"] = a.detach().cpu().clone()
        out[f"{name}.lora_B"] = b.detach().cpu().clone()
    return out


def set_adapter_factors(peft_model: nn.Module, names: list[str], factors: dict) -> None:
    with torch.no_grad():
        for name, a, b in _lora_layers(peft_model, names):
            a.copy_(factors[f"{name}.lora_A"])
            b.copy_(factors[f"{name}.lora_B"])


def initial_factors(model: nn.Module, cfg: LoraSparseConfig, seed: int) -> dict[str, torch.Tensor]:
    """The shared starting adapters (A₀ random from the seed, B₀ = 0) for ``model``'s shapes."""
    return adapter_factors(wrap_lora(model, cfg, seed), linear_names(model))


def merged_state(
    base: dict[str, torch.Tensor],
    factors: dict[str, torch.Tensor],
    names: list[str],
    scaling: float,
) -> dict[str, torch.Tensor]:
    """``merge_and_unload``'s formula on a state dict: W' = W + scaling · B·A per target layer."""
    out = {k: v.clone() for k, v in base.items()}
    for name in names:
        a, b = factors[f"{name}.lora_A"], factors[f"{name}.lora_B"]
        out[f"{name}.weight"] = base[f"{name}.weight"] + scaling * (b @ a).to(
            base[f"{name}.weight"]
        )
    return out


def lora_config_of(scenario: Scenario) -> LoraSparseConfig:
    algo = scenario.algorithm
    if not isinstance(algo, LoraSparseConfig):
        raise ValueError(
            "the lora trainer sends sparse adapter updates that only the lora_sparse strategy can "
            f"aggregate; set [algorithm] name = 'lora_sparse' (got {algo.name!r})"
        )
    return algo


# -- client side of the downlink -------------------------------------------------------------
def apply_downlink(content: RecordDict, state: RecordDict, scenario: Scenario) -> ArrayRecord:
    """Bring the node's base and adapter copy to the version the message names; return the merged
    model as an ArrayRecord. ``ValueError`` when the message does not fit what the node holds
    (the server then resends everything)."""
    cfg = lora_config_of(scenario)
    sync = content[SYNC_KEY]
    base_version = int(sync["base-version"])
    arrays_kind = str(sync.get("arrays", "packet"))  # "packet", or "model": the merged model
    held = state.get(SYNC_KEY, ConfigRecord({"version": 0, "base-version": -1}))
    if BASE_KEY in content or bool(sync.get("base-in-arrays", False)):
        state[BASE_KEY] = content[BASE_KEY if BASE_KEY in content else "arrays"]
        held["base-version"] = base_version
    if BASE_KEY not in state or int(held["base-version"]) != base_version:
        raise ValueError(
            f"{BASE_MISSING}: this node holds base version {held['base-version']}, the message "
            f"needs {base_version}; the server resends the base next time"
        )
    base = state[BASE_KEY].to_torch_state_dict()
    model = _zoo_model(scenario)
    model.load_state_dict(base)
    start = initial_factors(model, cfg, scenario.seed)
    shapes = {k: v.shape for k, v in start.items()}
    n = sum(v.numel() for v in start.values())
    source = int(sync["from"])
    packet_record = content.get(REPLACE_KEY if arrays_kind == "model" else "arrays")
    if packet_record is None or PACKET_KEY not in packet_record:
        if not (arrays_kind == "model" and source != -1):
            raise ValueError(
                f"a LoRA downlink carries its adapter packet as arrays[{PACKET_KEY!r}]"
            )
        change = torch.zeros(n)  # the model came whole; the adapters did not change
    else:
        change = decode_packet(packet_record[PACKET_KEY].numpy(), n)
    if source == -1:  # replace: the packet holds every entry
        flat = change
    elif source == int(held["version"]):
        flat = (
            torch.from_numpy(state[ADAPTERS_KEY][FLAT].numpy())
            if ADAPTERS_KEY in state
            else flatten(start)
        ).clone() + change
    else:
        raise ValueError(
            f"LoRA downlink is a change from version {source}, this node holds version "
            f"{held['version']}; the server resends the adapters next time"
        )
    state[ADAPTERS_KEY] = ArrayRecord({FLAT: Array(flat.numpy())})
    held["version"] = int(sync["to"])
    state[SYNC_KEY] = held
    merged = merged_state(base, unflatten(flat, shapes), linear_names(model), cfg.scaling)
    return ArrayRecord(torch_state_dict=merged)


def _zoo_model(scenario: Scenario) -> nn.Module:
    info = dataset_info(scenario.data)
    return build_model(scenario.model, info.input_shape, info.num_classes)


# -- trainer ---------------------------------------------------------------------------------
def train_lora(job: TrainJob) -> TrainResult:
    """Train the LoRA adapters on the frozen base from the node's adapter copy; reply with one
    packet: the update's top-k per tensor (density ρ) with error feedback."""
    cfg = lora_config_of(job.scenario)
    names = linear_names(job.model)
    if BASE_KEY in job.state:  # job.model holds base + adapters merged: train on the base
        job.model.load_state_dict(job.state[BASE_KEY].to_torch_state_dict())
    peft_model = wrap_lora(job.model, cfg, job.scenario.seed)
    start = adapter_factors(peft_model, names)
    shapes = {k: v.shape for k, v in start.items()}
    held = (
        torch.from_numpy(job.state[ADAPTERS_KEY][FLAT].numpy())
        if ADAPTERS_KEY in job.state
        else flatten(start)
    )
    set_adapter_factors(peft_model, names, unflatten(held, shapes))
    inner_job = copy.copy(job)
    inner_job.model = peft_model.to(job.device)  # peft froze the base: only lora_A / lora_B learn
    result = local_sgd(inner_job)
    update = flatten(adapter_factors(peft_model, names)) - held

    previous = job.state.get(RESIDUAL_KEY) if cfg.error_feedback else None
    residual = torch.from_numpy(previous[FLAT].numpy()) if previous is not None else None
    packet, new_residual = sparsify_with_feedback(
        update, residual, shapes, cfg.density, cfg.value_type
    )
    if cfg.error_feedback:
        job.state[RESIDUAL_KEY] = ArrayRecord({FLAT: Array(new_residual.numpy())})
    result.metrics.update(
        {
            "lora_dense_bytes": dense_values_bytes(update.numel()),
            "lora_residual_norm": float(new_residual.norm()),
        }
    )
    result.reply_arrays = ArrayRecord({PACKET_KEY: Array(packet)})
    return result
