"""The one place where fedge derives and sets random seeds."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (scenario seed, round, partition id, ...), stable across processes."""
    return int(
        np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, dtype=np.uint64)[0]
        >> 1
    )


# numpy's SeedSequence constants (numpy/random/bit_generator.pyx), for derive_seeds
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _MASK32 = 0xCA01F9DD, 0x4973F715, 0xFFFFFFFF


def derive_seeds(rows: list[tuple[int, ...]]) -> list[int]:
    """``[derive_seed(*row) for row in rows]``, for many rows at once (the packed engine seeds
    hundreds of clients a round; one ``SeedSequence`` costs ~15 µs). Rows of up to 4 parts below
    2**32 run numpy's SeedSequence mixing (pool of 4 words, 2 output words) on uint32 columns;
    any other rows go through :func:`derive_seed` (tests/test_seeding.py checks they agree)."""
    widths = {len(row) for row in rows}
    if len(widths) != 1 or not 1 <= widths.pop() <= 4:
        return [derive_seed(*row) for row in rows]
    if not rows or any(abs(int(p)) > _MASK32 for row in rows for p in row):
        return [derive_seed(*row) for row in rows]
    words = np.abs(np.array(rows, dtype=np.int64)).astype(np.uint32)
    hash_const = _INIT_A
    shift = np.uint32(16)

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_A) & _MASK32
        value = value * np.uint32(hash_const)
        return value ^ (value >> shift)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
        return result ^ (result >> shift)

    zeros = np.zeros(len(rows), dtype=np.uint32)
    pool = [hashmix(words[:, i] if i < words.shape[1] else zeros) for i in range(4)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    out_const = _INIT_B
    state = []
    for word in pool[:2]:  # generate_state(1, dtype=np.uint64): two uint32 words
        value = word ^ np.uint32(out_const)
        out_const = (out_const * _MULT_B) & _MASK32
        value = value * np.uint32(out_const)
        state.append((value ^ (value >> shift)).astype(np.uint64))
    return ((state[0] | (state[1] << np.uint64(32))) >> np.uint64(1)).tolist()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch globally; return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seed_global_torch(seed: int) -> None:
    """``torch.manual_seed(seed)`` for what a local update can touch, at a fraction of its cost.

    ``torch.manual_seed`` also queues a lazy CUDA/XPU/MTIA seeding call with a captured stack trace
    when those are not initialized (~0.2-2 ms per call, and the queue grows with every client
    update). The CPU generator is what CPU trainers draw from; CUDA is reseeded only once it is in
    use (a model moved to the GPU initializes it), which is when ``torch.manual_seed`` would too.
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
