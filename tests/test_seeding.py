"""clients/seeding.py: the cheap per-client reseed draws exactly what torch.manual_seed would."""

from __future__ import annotations

import numpy as np
import torch

from clients.seeding import derive_seed, derive_seeds, seed_global_torch


def test_seed_global_torch_matches_manual_seed() -> None:
    seed = derive_seed(3, 2, 7, 1)
    torch.manual_seed(seed)
    expected = (torch.rand(5), torch.randn(3, 2), torch.randperm(10))
    torch.rand(100)  # move the global stream on, then reseed the cheap way
    seed_global_torch(seed)
    got = (torch.rand(5), torch.randn(3, 2), torch.randperm(10))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_a_library_drawing_from_the_global_rng_sees_the_same_stream_every_update() -> None:
    """What the reseed in clients/app.py::train guarantees: a trainer that draws from the global
    generator (e.g. dropout) gets the same numbers for the same (seed, round, client)."""
    draws = []
    for _ in range(2):
        torch.rand(17)  # whatever ran before (other clients, model init)
        seed_global_torch(derive_seed(0, 1, 4, 1))
        draws.append(torch.nn.functional.dropout(torch.ones(50), p=0.5))
    assert torch.equal(draws[0], draws[1])


def test_derive_seeds_is_derive_seed_row_by_row() -> None:
    """The vectorized SeedSequence gives every row derive_seed's seed: 1 to 4 parts, zeros,
    negatives (abs), the 2**32 boundary, and rows it hands to derive_seed (wider parts, 5 parts)."""
    rng = np.random.default_rng(0)
    for width in (1, 2, 3, 4):
        rows = [
            tuple(int(v) for v in row) for row in rng.integers(-(2**32) + 1, 2**32, (300, width))
        ]
        rows += [(0,) * width, (2**32 - 1,) * width, tuple(range(width))]
        assert derive_seeds(rows) == [derive_seed(*row) for row in rows]
    for rows in ([(2**32, 1, 2), (3, 4, 5)], [(1, 2, 3, 4, 5)], [(1, 2), (1, 2, 3)], []):
        assert derive_seeds(rows) == [derive_seed(*row) for row in rows]
