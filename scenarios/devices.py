"""The ``[devices]`` schema and the device catalog: which device classes exist, with sourced figures.

The catalog (``scenarios/catalog/devices.toml``) holds the figures per device class; a scenario's
``[devices]`` section (:class:`DevicesConfig`) assigns classes to clients and describes their
availability. The draws themselves (who gets which device, who is online when) live in
``clients/devices.py``.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CATALOG_FILE = Path(__file__).parent / "catalog" / "devices.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False
    )  # see scenarios/config.py


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
