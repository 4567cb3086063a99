"""Peak training memory of one step, per trainer, on the same model and batch.

``measure_training_memory(trainer, model, x, y)`` feeds the device profiles' memory check
(``clients/clock.py``) and ``benchmarks/edge_memory.py``. On CUDA it reports
``torch.cuda.max_memory_allocated`` around the step. On CPU (torch has no CPU allocator statistics
and tracemalloc cannot see tensor storage) it is a *measured count*: parameter bytes + gradient
bytes (tpSGD: the largest block's, since its trainer steps and frees each block's gradients in
turn) + the peak of live tensors saved for backward, tracked with
``torch.autograd.graph.saved_tensors_hooks`` (each saved tensor is counted while its graph is alive
and released when the graph is freed).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

TRAINERS = ("backprop", "tpsgd", "forward_forward", "lora")


@dataclass(frozen=True)
class MemoryReport:
    trainer: str
    peak_bytes: int  # what the device needs for training (params + grads + activations)
    param_bytes: int
    grad_bytes: int
    activation_bytes: int  # peak of live saved-for-backward tensors (CPU) or allocator peak − rest
    method: str  # "saved-tensor count" or "cuda max_memory_allocated"
    trainable_bytes: int = 0  # parameters the optimizer keeps state for (LoRA: adapters only)

    def with_optimizer(self, copies: int) -> int:
        """Bytes a device needs: the step's peak plus ``copies`` optimizer buffers per trainable
        parameter (SGD momentum: 1, Adam: 2), which live for the whole of training."""
        return self.peak_bytes + copies * self.trainable_bytes


class _SavedTensorMeter:
    """Live / peak bytes of tensors autograd keeps for backward."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        holder = _Saved(t)
        weakref.finalize(holder, self._release, nbytes)
        return holder

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    @staticmethod
    def unpack(holder: _Saved) -> torch.Tensor:
        return holder.tensor


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _step_fn(trainer: str, model: nn.Module, seed: int):
    """A closure running one training step of ``trainer`` on ``model`` (grads accumulated)."""
    if trainer == "backprop":
        return lambda x, y: F.cross_entropy(model(x), y).backward()
    if trainer == "tpsgd":
        from edge.tpsgd import block_optimizers, projection_matrices, split_blocks, tpsgd_step

        blocks = split_blocks(model)
        proj = projection_matrices(blocks, blocks[-1].width, seed)
        opts = block_optimizers(blocks, lr=0.0)  # as the trainer: step + free each block's grads
        return lambda x, y: tpsgd_step(blocks, proj, x, y, "ce", opts)
    if trainer == "forward_forward":
        from edge.forward_forward import ff_step, require_ff_model

        require_ff_model(model)
        gen = torch.Generator().manual_seed(seed)
        return lambda x, y: ff_step(model, x, y, 0.5, gen)
    if trainer == "lora":
        return lambda x, y: F.cross_entropy(model(x), y).backward()
    raise ValueError(f"unknown trainer {trainer!r}; one of {', '.join(TRAINERS)}")


def measure_training_memory(
    trainer: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int = 0,
    lora_rank: int = 4,
) -> MemoryReport:
    """Peak memory of one training step of ``trainer`` on (a copy of) ``model`` with batch (x, y).

    ``trainer="lora"`` wraps the copy with peft LoRA (rank ``lora_rank``) on its Linear layers;
    ``forward_forward`` needs an ``FFMLP``.
    """
    if trainer not in TRAINERS:
        raise ValueError(f"unknown trainer {trainer!r}; one of {', '.join(TRAINERS)}")
    model = copy.deepcopy(model)
    if trainer == "lora":
        from algorithms.lora_sparse import LoraSparseConfig
        from edge.lora import wrap_lora

        model = wrap_lora(model, LoraSparseConfig(rank=lora_rank, alpha=2.0 * lora_rank), seed)
    device = x.device
    model.to(device).train()
    step = _step_fn(trainer, model, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    if trainer == "tpsgd":  # the trainer frees each block's gradients after stepping it
        from edge.tpsgd import split_blocks

        grad_bytes = max(
            sum(p.numel() * p.element_size() for p in b.layer.parameters())
            for b in split_blocks(model)
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(x, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
        activation = max(peak - base - grad_bytes, 0)
        return MemoryReport(
            trainer,
            peak,
            param_bytes,
            grad_bytes,
            activation,
            "cuda max_memory_allocated",
            trainable_bytes,
        )
    meter = _SavedTensorMeter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        step(x, y)
    return MemoryReport(
        trainer,
        param_bytes + grad_bytes + meter.peak,
        param_bytes,
        grad_bytes,
        meter.peak,
        "saved-tensor count",
        trainable_bytes,
    )
