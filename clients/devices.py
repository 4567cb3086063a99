"""Simulated device fleets: device profiles, who gets which device, and who is online when.

The catalog (``clients/devices.toml``) holds sourced figures per device class; a scenario's
``[devices]`` section (:class:`DevicesConfig`) assigns classes to clients and describes their
availability. Everything here is a pure function of (scenario, seed, round, partition id), so every
engine — in-process, Ray actors, SuperNodes — draws exactly the same schedule without sharing state.
"""

from __future__ import annotations

import json
import math
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clients.seeding import derive_seed

CATALOG_FILE = Path(__file__).with_name("devices.toml")

# Tags that keep the independent random streams apart (any distinct ints would do).
_ASSIGN, _SPEED, _AVAILABLE, _DROPOUT = 0xA551, 0x5BEED, 0xAFA1, 0xD409


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceProfile(_Strict):
    """One device class. Sustained training FLOP/s = ``peak_flops * sustained_fraction``."""

    description: str = ""
    kind: Literal[
        "datacenter_gpu", "consumer_gpu", "edge_accelerator", "phone", "sbc", "mcu", "custom"
    ] = "custom"
    peak_flops: float = Field(gt=0, description="peak FP32 FLOP/s (vendor spec)")
    sustained_fraction: float = Field(
        1.0, gt=0, le=1, description="assumed share of peak reached in training"
    )
    memory_bytes: int = Field(gt=0, description="memory the trainer may use")
    uplink_bps: float = Field(gt=0, description="client -> server bandwidth, bit/s")
    downlink_bps: float = Field(gt=0, description="server -> client bandwidth, bit/s")
    latency_s: float = Field(0.0, ge=0, description="round-trip latency, added once per round")
    power_w: float | None = Field(None, gt=0, description="board power under training load")
    energy_per_flop_j: float | None = Field(
        None, gt=0, description="J/FLOP; default power_w / sustained FLOP/s"
    )
    source: str = "user-defined"

    @property
    def train_flops(self) -> float:
        """Sustained training throughput in FLOP/s."""
        return self.peak_flops * self.sustained_fraction

    @property
    def joules_per_flop(self) -> float | None:
        """Energy per FLOP: explicit, else board power / sustained FLOP/s, else unknown (None)."""
        if self.energy_per_flop_j is not None:
            return self.energy_per_flop_j
        return None if self.power_w is None else self.power_w / self.train_flops


@lru_cache(maxsize=4)
def load_catalog(path: str | Path = CATALOG_FILE) -> dict[str, DeviceProfile]:
    """The device classes of a catalog TOML file (default: fedge's own), by name."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"cannot read device catalog {path}: {err}") from None
    return {name: DeviceProfile.model_validate(table) for name, table in raw.items()}


class DevicesConfig(_Strict):
    """Scenario section ``[devices]``: simulate a heterogeneous fleet with a virtual clock.

    Assignment (``assign``): ``list`` gives ``classes[i % len(classes)]`` to client i; ``mix`` gives
    exact proportions (largest-remainder counts, then a seeded shuffle); ``sample`` draws each
    client's class i.i.d. from the ``mix`` weights. ``speed_sigma`` > 0 spreads each client's
    compute and network speed by a seeded log-normal factor exp(N(0, sigma^2)) around its class.
    """

    profiles: dict[str, DeviceProfile] = Field(
        default_factory=dict, description="your own device classes (or overrides of the catalog)"
    )
    assign: Literal["list", "mix", "sample"] = "mix"
    classes: list[str] = Field(
        default_factory=list, description="assign=list: class per client, cycled"
    )
    mix: dict[str, float] = Field(
        default_factory=dict, description="assign=mix|sample: class -> weight"
    )
    speed_sigma: float = Field(
        0.0, ge=0.0, le=3.0, description="log-normal spread of per-client speeds"
    )
    availability: Literal["always", "bernoulli", "markov"] = "always"
    p_available: float = Field(1.0, ge=0.0, le=1.0, description="bernoulli: P(online) per round")
    p_on_to_off: float = Field(0.1, ge=0.0, le=1.0, description="markov: P(online -> offline)")
    p_off_to_on: float = Field(0.5, ge=0.0, le=1.0, description="markov: P(offline -> online)")
    dropout_prob: float = Field(
        0.0, ge=0.0, lt=1.0, description="P(an online client drops out mid-round)"
    )
    policy: Literal["wait_for_all", "deadline", "first_k"] = "wait_for_all"
    deadline_s: float | None = Field(
        None, gt=0.0, description="policy=deadline: virtual seconds per round"
    )
    first_k: int | None = Field(
        None, ge=1, description="policy=first_k: keep the K fastest of the sampled clients"
    )
    partial_work: bool = Field(
        False, description="policy=deadline: slow clients do as many local steps as fit"
    )
    memory_check: bool = Field(
        True, description="fail clients whose training memory exceeds their device's"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DevicesConfig:
        known = self.class_names()
        if self.assign == "list":
            if not self.classes:
                raise ValueError("devices.assign='list' needs devices.classes = ['t4', ...]")
            named = self.classes
        else:
            if not self.mix:
                raise ValueError(
                    f"devices.assign={self.assign!r} needs devices.mix = {{t4 = 0.5, jetson_nano = 0.5}}"
                )
            if any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
                raise ValueError("devices.mix weights must be >= 0 with a positive sum")
            named = list(self.mix)
        unknown = sorted(set(named) - set(known))
        if unknown:
            raise ValueError(
                f"unknown device class(es) {unknown}; known: {', '.join(known)} "
                "(or define them under [devices.profiles.<name>])"
            )
        if self.policy == "deadline" and self.deadline_s is None:
            raise ValueError("devices.policy='deadline' needs devices.deadline_s (virtual seconds)")
        if self.policy == "first_k" and self.first_k is None:
            raise ValueError("devices.policy='first_k' needs devices.first_k (clients kept)")
        if self.partial_work and self.policy != "deadline":
            raise ValueError("devices.partial_work needs devices.policy='deadline'")
        return self

    def catalog(self) -> dict[str, DeviceProfile]:
        """fedge's catalog plus this scenario's own profiles (which win on a name clash)."""
        return {**load_catalog(), **self.profiles}

    def class_names(self) -> list[str]:
        return sorted(self.catalog())


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
