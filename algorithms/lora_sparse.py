"""LoRA with top-k sparse adapter updates and error feedback (CELLM-style), framework-free math.

A client's adapter update u (per tensor) is sent as its top-k entries by magnitude, k = ⌈ρ·numel⌉;
with error feedback the residual e of what was not sent is added to the next round's update:
    v = u + e_prev,   sent = topk(v),   e_new = v − sent.
The server decodes each reply by scattering values at indices into a dense zero tensor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
from pydantic import Field

from algorithms.base import AlgorithmConfig


class LoraSparseConfig(AlgorithmConfig):
    name: Literal["lora_sparse"] = "lora_sparse"
    server_factory: ClassVar[str] = "server.lora_sparse:make_lora_sparse"
    client_trainer: ClassVar[str] = "edge.lora:train_lora"
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
    """A reply in the packed sparse encoding: exactly ``adapters.values`` + ``adapters.indices``
    (:func:`pack_sparse`). Any other key set is dense, so one stray ``*.indices`` key cannot make
    a dense reply skip the checks and decoding a dense reply gets."""
    return set(keys) == {PACKED_VALUES, PACKED_INDICES}


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


# One reply carries every adapter's top-k entries in two flat arrays: per-array overhead of an
# ArrayRecord (~130 B each) would otherwise dominate small, very sparse replies.
PACKED_VALUES = "adapters.values"
PACKED_INDICES = "adapters" + SPARSE_INDEX_SUFFIX


def pack_sparse(
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]], shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """``{key: (values, flat indices)}`` -> one values and one int32 indices array, the indices
    offset into the concatenation of the tensors in ``shapes``' order (the order both sides share)."""
    offsets = dict(
        zip(
            shapes,
            itertools.accumulate((math.prod(s) for s in shapes.values()), initial=0),
            strict=False,
        )
    )
    values = torch.cat([parts[k][0].reshape(-1).float() for k in shapes])
    indices = torch.cat([parts[k][1].long() + offsets[k] for k in shapes]).to(torch.int32)
    return {PACKED_VALUES: values, PACKED_INDICES: indices}


def unpack_sparse(
    values: torch.Tensor, indices: torch.Tensor, shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_sparse`: dense ``{key: update}`` (zeros where nothing was sent)."""
    sizes = [math.prod(s) for s in shapes.values()]
    total = sum(sizes)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= total):
        raise ValueError(f"sparse indices outside 0..{total - 1} (the adapters' total size)")
    flat = densify(values, indices, torch.Size([total]))
    return {
        k: chunk.reshape(shape)
        for (k, shape), chunk in zip(shapes.items(), flat.split(sizes), strict=True)
    }


def sparsify_with_feedback(
    update: torch.Tensor, residual: torch.Tensor | None, density: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v = update + residual; return (values, indices, new residual v − densify(values))."""
    v = update if residual is None else update + residual
    values, indices = topk_sparsify(v, density)
    return values, indices, v - densify(values, indices, v.shape)
