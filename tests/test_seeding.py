"""clients/seeding.py: the cheap per-client reseed draws exactly what torch.manual_seed would."""

from __future__ import annotations

import torch

from clients.seeding import derive_seed, seed_global_torch


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
