"""Peak training memory of one step, per trainer, on the same model and batch.

``measure_training_memory(trainer, model, x, y)`` is the function other code calls (e.g. a device
profile's memory check). On CUDA it reports ``torch.cuda.max_memory_allocated`` around the step.
On CPU (torch has no CPU allocator statistics and tracemalloc cannot see tensor storage) it is a
*measured count*: parameter bytes + gradient bytes (tpSGD: the largest block's, since its trainer
steps and frees each block's gradients in turn) + the peak of live tensors saved for backward,
tracked with ``torch.autograd.graph.saved_tensors_hooks`` (each saved tensor is counted while its
graph is alive and released when the graph is freed).

Run: ``PYTHONPATH=. python benchmarks/edge_memory.py``  (prints a table, BP vs each trainer).
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
        from edge.forward_forward import ff_step

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
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
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
            trainer, peak, param_bytes, grad_bytes, activation, "cuda max_memory_allocated"
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
    )


def main() -> None:
    from clients.models import build_model
    from scenarios.config import ModelConfig

    torch.manual_seed(0)
    rows = []
    for dataset, shape in (("mnist1d", (40,)), ("digits", (1, 8, 8))):
        for hidden in ([256, 256], [512, 512, 512]):
            x = torch.randn(256, *shape)
            y = torch.randint(0, 10, (256,))
            mlp = build_model(ModelConfig(name="mlp", hidden=hidden), shape, 10)
            ff = build_model(ModelConfig(name="ff_mlp", hidden=hidden), shape, 10)
            bp = measure_training_memory("backprop", mlp, x, y)
            for trainer, model in (
                ("backprop", mlp),
                ("tpsgd", mlp),
                ("lora", mlp),
                ("forward_forward", ff),
            ):
                r = measure_training_memory(trainer, model, x, y)
                rows.append(
                    (
                        dataset,
                        hidden,
                        r,
                        r.peak_bytes / bp.peak_bytes,
                        r.activation_bytes / max(bp.activation_bytes, 1),
                    )
                )
    print(
        "| data | hidden | trainer | peak KiB | params KiB | grads KiB | activations KiB | peak / BP | act / BP |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dataset, hidden, r, ratio, act_ratio in rows:
        print(
            f"| {dataset} | {hidden} | {r.trainer} | {r.peak_bytes / 1024:.0f} | "
            f"{r.param_bytes / 1024:.0f} | {r.grad_bytes / 1024:.0f} | "
            f"{r.activation_bytes / 1024:.0f} | {ratio:.2f} | {act_ratio:.2f} |"
        )
    print(f"(batch 256, CPU, method: {rows[0][2].method})")


if __name__ == "__main__":
    main()
