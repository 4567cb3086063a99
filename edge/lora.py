"""LoRA clients with top-k sparse adapter updates and error feedback (CELLM-style), using ``peft``.

Protocol (algorithm ``lora_sparse``; server side in ``server/lora_sparse.py``):

* The global model W is the zoo model's state dict. The server pre-trains it centrally on its proxy
  set before round 1 (``algorithm.pretrain_epochs``; nothing is downloaded); that is the frozen base.
* Each round a LoRA client wraps the received W with ``peft`` LoRA adapters on every ``nn.Linear``
  (rank r, alpha), base frozen. The adapters start from a fixed point shared by every client and
  the server: ``A₀`` drawn by peft under the seed ``derive_seed(scenario.seed, LORA_SEED_TAG)``,
  ``B₀ = 0``. Only the adapters are trained.
* The update ``u = (A − A₀, B)`` is sparsified per tensor to its top-k entries (density ρ) with
  error feedback: the residual not sent is kept in the node's ``Context.state`` and added to the
  next round's update. The reply carries every adapter's top-k entries packed into
  ``adapters.values`` (float32) and ``adapters.indices`` (int32, offsets into the adapters
  concatenated in ``linear_names`` order, lora_A before lora_B) — so ``ArrayRecord.count_bytes()`` and the
  round's ``bytes_up`` see exactly the sparse payload.
* The server decodes each reply densely and turns it into that client's weight update
  ``ΔW_k = (α/r)·B_k·(A₀ + ΔA_k)`` (the merge of its adapter, ``merge_and_unload``'s formula), then
  ``W ← W + Σ_k n_k ΔW_k / Σ_k n_k``. Dense replies (backprop / tpSGD clients in the same
  federation) contribute ``ΔW_k = W_k − W``, so the update of every client kind is a weight delta
  on the same parameter names and one weighted average combines them (FedAvg semantics).
* Downlink is the dense merged model (sparse downlink is not implemented).
"""

from __future__ import annotations

import copy

import torch
from flwr.app import ArrayRecord
from peft import LoraConfig, get_peft_model
from torch import nn

from algorithms.lora_sparse import LoraSparseConfig, pack_sparse, sparsify_with_feedback
from clients.seeding import derive_seed
from clients.training import TrainJob, TrainResult, local_sgd

LORA_SEED_TAG = 0x10A4
RESIDUAL_KEY = "lora-residual"


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


def adapter_factors(peft_model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """``{"<layer>.lora_A": A, "<layer>.lora_B": B}`` of a peft-wrapped zoo model (detached copies)."""
    inner = peft_model.base_model.model
    out = {}
    for name in names:
        layer = inner.get_submodule(name)
        out[f"{name}.lora_A"] = layer.lora_A["default"].weight.detach().cpu().clone()
        out[f"{name}.lora_B"] = layer.lora_B["default"].weight.detach().cpu().clone()
    return out


def initial_factors(model: nn.Module, cfg: LoraSparseConfig, seed: int) -> dict[str, torch.Tensor]:
    """The shared starting adapters (A₀ random from the seed, B₀ = 0) for ``model``'s shapes."""
    return adapter_factors(wrap_lora(model, cfg, seed), linear_names(model))


def lora_config_of(job: TrainJob) -> LoraSparseConfig:
    algo = job.scenario.algorithm
    if not isinstance(algo, LoraSparseConfig):
        raise ValueError(
            "the lora trainer sends sparse adapter updates that only the lora_sparse strategy can "
            f"aggregate; set [algorithm] name = 'lora_sparse' (got {algo.name!r})"
        )
    return algo


def train_lora(job: TrainJob) -> TrainResult:
    """Train LoRA adapters on the frozen received model; reply with the sparse adapter update."""
    cfg = lora_config_of(job)
    names = linear_names(job.model)
    peft_model = wrap_lora(job.model, cfg, job.scenario.seed).to(job.device)
    start = initial_factors(job.model, cfg, job.scenario.seed)
    inner_job = copy.copy(job)
    inner_job.model = peft_model  # peft froze the base: only lora_A / lora_B get gradients
    result = local_sgd(inner_job)
    trained = adapter_factors(peft_model, names)

    previous = job.state.get(RESIDUAL_KEY) if cfg.error_feedback else None
    residuals = previous.to_torch_state_dict() if previous is not None else {}
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    new_residuals: dict[str, torch.Tensor] = {}
    dense_bytes = 0
    for key, value in trained.items():
        update = value - start[key]
        values, indices, residual = sparsify_with_feedback(update, residuals.get(key), cfg.density)
        parts[key] = (values, indices)
        new_residuals[key] = residual
        dense_bytes += update.numel() * 4
    payload = pack_sparse(parts, {k: v.shape for k, v in start.items()})
    if cfg.error_feedback:
        job.state[RESIDUAL_KEY] = ArrayRecord(torch_state_dict=new_residuals)
    residual_norm = float(torch.sqrt(sum(r.pow(2).sum() for r in new_residuals.values())))
    result.metrics.update({"lora_dense_bytes": dense_bytes, "lora_residual_norm": residual_norm})
    result.reply_arrays = ArrayRecord(torch_state_dict=payload)
    return result
