"""LoRA with top-k sparse adapter updates and error feedback (CELLM-style), framework-free math.

Every client and the server share the layout of the adapters: the LoRA factors of every target
layer flattened and concatenated into one vector of ``n`` entries. A client's adapter update
``u`` (per tensor) is sent as its top-k entries by magnitude, ``k = ⌈ρ·numel⌉``; with error
feedback the part that was not sent (including the rounding of the value type) is added to the
next round's update:
    v = u + e_prev,   sent = Q(topk(v)),   e_new = v − sent.

Wire format of one sparse vector (a *packet*, one ``uint8`` array), little-endian:
    header  <BBIIf: index code, value code, n (entries in the full vector), k (entries sent),
            scale (int8 values: value = q · scale; 1.0 otherwise)
    indices none (k = n, values only: a dense update carries no index array),
            bitmap (⌈n/8⌉ bytes, bit i set = entry i sent), uint16 or uint32 positions
            — whichever of bitmap / positions is smaller is chosen per packet
    values  k × float32 | float16 | int8
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from algorithms.base import AlgorithmConfig

ValueType = Literal["float32", "float16", "int8"]


class LoraSparseConfig(AlgorithmConfig):
    name: Literal["lora_sparse"] = "lora_sparse"
    server_factory: ClassVar[str] = "server.lora_sparse:make_lora_sparse"
    client_trainer: ClassVar[str] = "edge.lora:train_lora"
    sparse_replies: ClassVar[bool] = True
    edge_export: ClassVar[bool] = True
    rank: int = Field(4, ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(8.0, gt=0.0, description="LoRA alpha (scaling alpha / r)")
    density: float = Field(0.05, gt=0.0, le=1.0, description="share rho of adapter entries sent")
    value_type: ValueType = Field(
        "float16", description="type of the sent values (int8: one float32 scale per packet)"
    )
    downlink_density: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="share of adapter entries the server broadcasts per round (None: = density)",
    )
    error_feedback: bool = Field(True, description="carry the unsent residual to the next round")
    pretrain_epochs: int = Field(
        5, ge=0, description="central pre-training of the frozen base on the server proxy set"
    )

    def needs_server_proxy(self) -> bool:
        return True  # the frozen base is pre-trained centrally on the proxy set

    @property
    def scaling(self) -> float:
        """peft's ``lora_alpha / r``: the merged weight is W + scaling · B·A."""
        return self.alpha / self.rank

    @property
    def broadcast_density(self) -> float:
        return self.density if self.downlink_density is None else self.downlink_density


PACKET_KEY = "lora.packet"  # the one array of a LoRA reply / downlink
SYNC_KEY = "lora-sync"  # downlink record: from (-1 = replace), to, base-version
BASE_KEY = "lora-base"  # the frozen base's state dict (message and node state)
REPLACE_KEY = "lora-adapters"  # downlink record: every adapter entry, when "arrays" is the model
_HEADER = struct.Struct("<BBIIf")
_INDEX_NONE, _INDEX_BITMAP, _INDEX_U16, _INDEX_U32 = range(4)
_VALUE_TYPES: tuple[ValueType, ...] = ("float32", "float16", "int8")
_VALUE_SIZE = {"float32": 4, "float16": 2, "int8": 1}


def is_sparse_encoded(keys: Iterable[str]) -> bool:
    """A reply in the LoRA packet encoding: exactly one ``lora.packet`` array. Any other key set is
    dense, so a stray packet key cannot make a dense reply skip the checks a dense reply gets."""
    return set(keys) == {PACKET_KEY}


# -- the shared adapter layout ---------------------------------------------------------------
def flatten(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The adapters as one float32 vector, in ``factors``' key order (the order both sides share)."""
    return torch.cat([t.reshape(-1).float() for t in factors.values()])


def unflatten(flat: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    sizes = [math.prod(s) for s in shapes.values()]
    if flat.numel() != sum(sizes):
        raise ValueError(f"adapter vector has {flat.numel()} entries, the layout {sum(sizes)}")
    return {
        k: chunk.reshape(shape).clone()
        for (k, shape), chunk in zip(shapes.items(), flat.split(sizes), strict=True)
    }


# -- sparsification ----------------------------------------------------------------------------
def topk_indices(update: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted flat int64 indices of the k = ⌈density·numel⌉ largest-magnitude entries."""
    flat = update.reshape(-1)
    k = max(1, math.ceil(density * flat.numel()))
    if k >= flat.numel():
        return torch.arange(flat.numel())
    return flat.abs().topk(k, sorted=False).indices.sort().values


def layout_topk(flat: torch.Tensor, shapes: dict[str, torch.Size], density: float) -> torch.Tensor:
    """Top-k *per tensor* (A and B updates differ in scale), as indices into the flat vector."""
    out, offset = [], 0
    for shape in shapes.values():
        size = math.prod(shape)
        out.append(topk_indices(flat[offset : offset + size], density) + offset)
        offset += size
    return torch.cat(out)


def quantize(values: torch.Tensor, value_type: ValueType) -> tuple[np.ndarray, float]:
    """(wire values, scale); int8 is symmetric with one scale max|v|/127 per packet."""
    v = values.detach().cpu().float().numpy()
    if value_type == "float32":
        return v.astype(np.float32), 1.0
    if value_type == "float16":
        return v.astype(np.float16), 1.0
    peak = float(np.abs(v).max()) if v.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    return np.clip(np.rint(v / scale), -127, 127).astype(np.int8), scale


def encode_packet(
    flat: torch.Tensor, indices: torch.Tensor | None, value_type: ValueType
) -> tuple[np.ndarray, torch.Tensor]:
    """Encode ``flat[indices]`` (``None``: every entry, values only). Returns the packet and the
    dense vector the receiver will decode (what was *really* sent, after rounding)."""
    n = flat.numel()
    if indices is None or indices.numel() == n:
        indices = None
        values = flat.reshape(-1)
    else:
        values = flat.reshape(-1)[indices]
    wire, scale = quantize(values, value_type)
    k = wire.size
    if indices is None:
        index_code, index_bytes = _INDEX_NONE, b""
    else:
        idx = indices.cpu().numpy()
        bitmap_size = (n + 7) // 8
        width = 2 if n <= 0xFFFF else 4
        if bitmap_size <= width * k:
            mask = np.zeros(n, dtype=bool)
            mask[idx] = True
            index_code, index_bytes = _INDEX_BITMAP, np.packbits(mask, bitorder="little").tobytes()
        else:
            index_code = _INDEX_U16 if width == 2 else _INDEX_U32
            index_bytes = idx.astype("<u2" if width == 2 else "<u4").tobytes()
    header = _HEADER.pack(index_code, _VALUE_TYPES.index(value_type), n, k, scale)
    wire = wire.astype(wire.dtype.newbyteorder("<"))
    packet = np.frombuffer(header + index_bytes + wire.tobytes(), dtype=np.uint8).copy()
    return packet, decode_packet(packet, n)


def decode_packet(packet: np.ndarray, expected_n: int | None = None) -> torch.Tensor:
    """Dense float32 vector of a packet (zeros where nothing was sent); ``ValueError`` naming the
    problem for anything malformed (wrong size, indices out of range, unknown codes)."""
    raw = np.asarray(packet)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"LoRA packet must be a 1-D uint8 array, got {raw.dtype}{list(raw.shape)}")
    data = raw.tobytes()
    if len(data) < _HEADER.size:
        raise ValueError(f"LoRA packet of {len(data)} bytes is shorter than its header")
    index_code, value_code, n, k, scale = _HEADER.unpack_from(data)
    if expected_n is not None and n != expected_n:
        raise ValueError(f"LoRA packet is for {n} adapter entries, this model has {expected_n}")
    if value_code >= len(_VALUE_TYPES) or index_code > _INDEX_U32:
        raise ValueError(f"LoRA packet has unknown codes (index {index_code}, value {value_code})")
    if not math.isfinite(scale) or k > n:
        raise ValueError(f"LoRA packet header is invalid (k={k}, n={n}, scale={scale})")
    value_type = _VALUE_TYPES[value_code]
    index_size = {
        _INDEX_NONE: 0,
        _INDEX_BITMAP: (n + 7) // 8,
        _INDEX_U16: 2 * k,
        _INDEX_U32: 4 * k,
    }[index_code]
    if index_code == _INDEX_NONE and k != n:
        raise ValueError(f"LoRA packet without indices must carry all {n} values, has {k}")
    expected = _HEADER.size + index_size + _VALUE_SIZE[value_type] * k
    if len(data) != expected:
        raise ValueError(f"LoRA packet has {len(data)} bytes, its header implies {expected}")
    body = data[_HEADER.size :]
    values = np.frombuffer(
        body[index_size:], dtype=np.dtype(value_type).newbyteorder("<"), count=k
    ).astype(np.float32)
    if value_type == "int8":
        values = values * np.float32(scale)
    out = np.zeros(n, dtype=np.float32)
    if index_code == _INDEX_NONE:
        out[:] = values
    elif index_code == _INDEX_BITMAP:
        mask = np.unpackbits(np.frombuffer(body[:index_size], np.uint8), bitorder="little")[:n]
        if int(mask.sum()) != k:
            raise ValueError(f"LoRA packet bitmap marks {int(mask.sum())} entries, carries {k}")
        out[mask.astype(bool)] = values
    else:
        idx = np.frombuffer(body[:index_size], dtype="<u2" if index_code == _INDEX_U16 else "<u4")
        if idx.size and int(idx.max()) >= n:
            raise ValueError(f"LoRA packet index {int(idx.max())} outside 0..{n - 1}")
        out[idx.astype(np.int64)] = values
    return torch.from_numpy(out)


def sparsify_with_feedback(
    update: torch.Tensor,
    residual: torch.Tensor | None,
    shapes: dict[str, torch.Size],
    density: float,
    value_type: ValueType,
) -> tuple[np.ndarray, torch.Tensor]:
    """v = update + residual; send Q(topk(v)); return (packet, new residual v − what was sent)."""
    v = update if residual is None else update + residual
    indices = None if density >= 1.0 else layout_topk(v, shapes, density)
    packet, sent = encode_packet(v, indices, value_type)
    return packet, v - sent


def dense_values_bytes(n: int) -> int:
    """Bytes of the float32 values of all n entries: the dense-LoRA baseline's payload."""
    return 4 * n


def dense_packet_bytes(n: int) -> int:
    """Size of a dense float32 packet of n entries (header + values): a LoRA reply's ceiling."""
    return _HEADER.size + dense_values_bytes(n)
