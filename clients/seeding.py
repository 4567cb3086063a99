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
