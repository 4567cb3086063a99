"""Device catalog, scenario [devices] validation, assignment and the seeded availability schedule."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from clients.devices import assign_classes, client_profile, is_available, schedule
from scenarios.config import ScenarioError, load_scenario, validate_scenario
from scenarios.devices import DevicesConfig, load_catalog

REQUIRED = {
    "h100",
    "a100",
    "v100",
    "t4",
    "rtx3090",
    "rtx4090",
    "jetson_agx_orin",
    "jetson_nano",
    "phone_sd8gen2",
    "raspberry_pi_4",
    "raspberry_pi_5",
    "mcu_stm32h7",
}


def test_catalog_has_sourced_classes() -> None:
    catalog = load_catalog()
    assert set(catalog) >= REQUIRED
    for name, p in catalog.items():
        assert p.source and p.source != "user-defined", name
        assert 0 < p.train_flops <= p.peak_flops
        assert p.joules_per_flop is not None and p.joules_per_flop > 0
    # spot-check against the vendor spec sheets the entries cite
    assert catalog["h100"].peak_flops == 67e12 and catalog["t4"].memory_bytes == 16 * 2**30
    assert catalog["a100"].train_flops == pytest.approx(19.5e12 * 0.4)
    assert catalog["a100"].joules_per_flop == pytest.approx(400 / (19.5e12 * 0.4))


def test_mix_gives_exact_proportions_and_is_seeded() -> None:
    cfg = DevicesConfig(mix={"t4": 0.5, "jetson_nano": 0.25, "phone_sd8gen2": 0.25})
    a = assign_classes(cfg, 8, seed=3)
    assert Counter(a) == {"t4": 4, "jetson_nano": 2, "phone_sd8gen2": 2}
    assert a == assign_classes(cfg, 8, seed=3)
    assert any(assign_classes(cfg, 8, seed=s) != a for s in range(4, 10))  # shuffled by seed
    # largest remainder: 3 clients over weights 1:1 -> 2 + 1, never 3 + 0
    assert sorted(
        Counter(assign_classes(DevicesConfig(mix={"t4": 1, "v100": 1}), 3, 0)).values()
    ) == [1, 2]


def test_list_sample_and_speed_spread() -> None:
    listed = DevicesConfig(assign="list", classes=["h100", "mcu_stm32h7"])
    assert assign_classes(listed, 5, 0) == ["h100", "mcu_stm32h7"] * 2 + ["h100"]
    sampled = DevicesConfig(assign="sample", mix={"t4": 1, "v100": 0})
    assert set(assign_classes(sampled, 20, 1)) == {"t4"}
    spread = DevicesConfig(assign="list", classes=["t4"], speed_sigma=0.5)
    base = load_catalog()["t4"]
    flops = [client_profile(spread, 4, 0, pid)[1].peak_flops for pid in range(4)]
    assert len(set(flops)) == 4 and all(f != base.peak_flops for f in flops)
    assert flops == [client_profile(spread, 4, 0, pid)[1].peak_flops for pid in range(4)]


def test_user_profiles_and_clear_errors() -> None:
    cfg = DevicesConfig(
        assign="list",
        classes=["my_board"],
        profiles={
            "my_board": {
                "peak_flops": 1e9,
                "memory_bytes": 2**20,
                "uplink_bps": 1e6,
                "downlink_bps": 1e6,
            }
        },
    )
    assert client_profile(cfg, 1, 0, 0)[1].train_flops == 1e9
    with pytest.raises(ScenarioError, match=r"devices.*unknown device class.*gpu9000.*profiles"):
        validate_scenario({"devices": {"mix": {"gpu9000": 1.0}}})
    with pytest.raises(ScenarioError, match="needs devices.deadline_s"):
        validate_scenario({"devices": {"mix": {"t4": 1.0}, "policy": "deadline"}})
    with pytest.raises(ScenarioError, match="partial_work needs"):
        validate_scenario({"devices": {"mix": {"t4": 1.0}, "partial_work": True}})
    with pytest.raises(ScenarioError, match="devices.*unknown key"):
        validate_scenario({"devices": {"mix": {"t4": 1.0}, "dedline": 3}})
    assert validate_scenario({}).devices is None  # old scenarios: no device simulation


def test_availability_is_seeded_and_has_the_right_rates() -> None:
    bern = DevicesConfig(mix={"t4": 1}, availability="bernoulli", p_available=0.7, dropout_prob=0.1)
    sched = schedule(bern, 50, seed=11, num_rounds=40)
    assert sched == schedule(bern, 50, seed=11, num_rounds=40)  # fixed seed => same schedule
    assert sched != schedule(bern, 50, seed=12, num_rounds=40)
    flat = Counter(s for row in sched for s in row)
    assert flat["off"] / 2000 == pytest.approx(0.3, abs=0.03)
    assert flat["drop"] / (flat["on"] + flat["drop"]) == pytest.approx(0.1, abs=0.02)

    markov = DevicesConfig(mix={"t4": 1}, availability="markov", p_on_to_off=0.2, p_off_to_on=0.3)
    states = [[is_available(markov, 5, r, pid) for r in range(1, 61)] for pid in range(40)]
    on = sum(map(sum, states)) / (40 * 60)
    assert on == pytest.approx(0.3 / 0.5, abs=0.05)  # stationary law
    stay_on = [b for row in states for a, b in zip(row, row[1:], strict=False) if a]
    assert 1 - sum(stay_on) / len(stay_on) == pytest.approx(0.2, abs=0.04)  # P(on -> off)


def test_shipped_hetero_scenario_mixes_five_plus_classes() -> None:
    scenario = load_scenario(Path(__file__).parents[1] / "scenarios" / "hetero_gpus.toml")
    classes = set(assign_classes(scenario.devices, scenario.data.num_clients, scenario.seed))
    assert len(classes) >= 5
    assert scenario.devices.policy == "deadline" and scenario.devices.availability != "always"
