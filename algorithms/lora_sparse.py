"""LoRA with top-k sparse adapter updates and error feedback (CELLM-style), framework-free math.

A client's adapter update u (per tensor) is sent as its top-k entries by magnitude, k = ⌈ρ·numel⌉;
with error feedback the residual e of what was not sent is added to the next round's update:
    v = u + e_prev,   sent = topk(v),   e_new = v − sent.
The server decodes each reply by scattering values at indices into a dense zero tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field

from algorithms.base import AlgorithmConfig, register_algorithm


@register_algorithm
class LoraSparseConfig(AlgorithmConfig):
    name: Literal["lora_sparse"] = "lora_sparse"
    rank: int = Field(4, ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(8.0, gt=0.0, description="LoRA alpha (scaling alpha / r)")
    density: float = Field(0.05, gt=0.0, le=1.0, description="share rho of adapter entries sent")
    error_feedback: bool = Field(True, description="carry the unsent residual to the next round")
    pretrain_epochs: int = Field(
        5, ge=0, description="central pre-training of the frozen base on the server proxy set"
    )

    def needs_server_proxy(self) -> bool:
        return True  # the frozen base is pre-trained centrally on the proxy set


SPARSE_INDEX_SUFFIX = ".indices"


def is_sparse_encoded(keys: Iterable[str]) -> bool:
    """A reply in the sparse (values + indices) encoding rather than one dense tensor per key."""
    return any(key.endswith(SPARSE_INDEX_SUFFIX) for key in keys)


def topk_sparsify(update: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, int32 flat indices) of the k = ⌈density·numel⌉ largest-magnitude entries."""
    flat = update.reshape(-1)
    k = max(1, math.ceil(density * flat.numel()))
    if k >= flat.numel():
        return flat.clone(), torch.arange(flat.numel(), dtype=torch.int32)
    idx = flat.abs().topk(k, sorted=False).indices.sort().values
    return flat[idx].clone(), idx.to(torch.int32)


def densify(values: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Dense tensor of ``shape`` with ``values`` at flat ``indices`` and zeros elsewhere."""
    out = torch.zeros(math.prod(shape), dtype=values.dtype)
    out[indices.long()] = values
    return out.reshape(shape)


def sparsify_with_feedback(
    update: torch.Tensor, residual: torch.Tensor | None, density: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v = update + residual; return (values, indices, new residual v − densify(values))."""
    v = update if residual is None else update + residual
    values, indices = topk_sparsify(v, density)
    return values, indices, v - densify(values, indices, v.shape)
