"""Simulated device fleets: who gets which device class, and who is online when.

The device classes and the ``[devices]`` schema live in ``scenarios/devices.py``. Everything here is a pure function of (scenario, seed, round, partition id), so every
engine — in-process, Ray actors, SuperNodes — draws exactly the same schedule without sharing state.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np

from clients.seeding import derive_seed
from scenarios.devices import DeviceProfile, DevicesConfig

# Tags that keep the independent random streams apart (any distinct ints would do).
_ASSIGN, _SPEED, _AVAILABLE, _DROPOUT = 0xA551, 0x5BEED, 0xAFA1, 0xD409


# -------------------- assignment


def _largest_remainder(weights: dict[str, float], n: int) -> dict[str, int]:
    """Integer counts summing to n, proportional to weights (Hamilton's method, ties by name)."""
    total = sum(weights.values())
    quotas = {k: n * w / total for k, w in sorted(weights.items())}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    leftover = n - sum(counts.values())
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - counts[k]), k))[:leftover]:
        counts[k] += 1
    return counts


def assign_classes(cfg: DevicesConfig, num_clients: int, seed: int) -> list[str]:
    """Device class of every client (index = partition id); a pure function of its inputs."""
    return list(_assign_cached(cfg.model_dump_json(), num_clients, seed))


@lru_cache(maxsize=16)
def _assign_cached(cfg_json: str, num_clients: int, seed: int) -> tuple[str, ...]:
    cfg = DevicesConfig.model_validate(json.loads(cfg_json))
    if cfg.assign == "list":
        return tuple(cfg.classes[i % len(cfg.classes)] for i in range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, _ASSIGN))
    names = sorted(cfg.mix)
    if cfg.assign == "sample":
        p = np.array([cfg.mix[k] for k in names], dtype=float)
        return tuple(names[i] for i in rng.choice(len(names), size=num_clients, p=p / p.sum()))
    counts = _largest_remainder(cfg.mix, num_clients)
    pool = [k for k in names for _ in range(counts[k])]
    return tuple(pool[i] for i in rng.permutation(num_clients))


def client_profile(
    cfg: DevicesConfig, num_clients: int, seed: int, partition_id: int
) -> tuple[str, DeviceProfile]:
    """(class name, profile) of one client, with its personal speed spread applied."""
    name = assign_classes(cfg, num_clients, seed)[partition_id]
    profile = cfg.catalog()[name]
    if cfg.speed_sigma == 0:
        return name, profile
    rng = np.random.default_rng(derive_seed(seed, _SPEED, partition_id))
    compute, network = np.exp(rng.normal(0.0, cfg.speed_sigma, size=2))
    return name, profile.model_copy(
        update={
            "peak_flops": profile.peak_flops * float(compute),
            "uplink_bps": profile.uplink_bps * float(network),
            "downlink_bps": profile.downlink_bps * float(network),
        }
    )


# -------------------- availability


def uniform(*parts: int) -> float:
    """A reproducible U[0, 1) draw keyed by integers (seed, round, partition id, stream tag)."""
    return derive_seed(*parts) / 2.0**63


def is_available(cfg: DevicesConfig, seed: int, server_round: int, partition_id: int) -> bool:
    """Whether the client is online in ``server_round`` (rounds count from 1).

    bernoulli: online iff u < p_available, independently per round. markov: a two-state chain
    started from its stationary law P(on) = p_off_to_on / (p_on_to_off + p_off_to_on) and replayed
    from round 1 with one seeded draw per round, so the state needs no memory between calls.
    """
    if cfg.availability == "always":
        return True
    if cfg.availability == "bernoulli":
        return uniform(seed, server_round, partition_id, _AVAILABLE) < cfg.p_available
    rate = cfg.p_on_to_off + cfg.p_off_to_on
    p_on = cfg.p_off_to_on / rate if rate > 0 else 1.0
    online = uniform(seed, 1, partition_id, _AVAILABLE) < p_on
    for r in range(2, max(server_round, 1) + 1):
        u = uniform(seed, r, partition_id, _AVAILABLE)
        online = u >= cfg.p_on_to_off if online else u < cfg.p_off_to_on
    return online


def drops_out(cfg: DevicesConfig, seed: int, server_round: int, partition_id: int) -> bool:
    """Whether an online client drops out during ``server_round``."""
    return uniform(seed, server_round, partition_id, _DROPOUT) < cfg.dropout_prob


def schedule(cfg: DevicesConfig, num_clients: int, seed: int, num_rounds: int) -> list[list[str]]:
    """Per round, per client: 'on', 'off' (unavailable) or 'drop' — handy to inspect a fleet."""
    rows = []
    for r in range(1, num_rounds + 1):
        row = []
        for pid in range(num_clients):
            if not is_available(cfg, seed, r, pid):
                row.append("off")
            elif drops_out(cfg, seed, r, pid):
                row.append("drop")
            else:
                row.append("on")
        rows.append(row)
    return rows
