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
