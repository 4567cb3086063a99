"""engine.ray_address: validated, checked before any process starts, pinned to a private runtime
when empty; the Ray node id in a client's identity (fast: no Ray started)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from clients.identity import ray_node_id
from fedge.engines import EngineError, free_port, resolve_ray_address, run_engine
from scenarios.config import validate_scenario


def scenario(tmp_path: Path, **engine):
    return validate_scenario(
        {"name": "addr", "output_dir": str(tmp_path), "engine": {"name": "ray", **engine}}
    )


@pytest.mark.parametrize(
    "good", ["", "auto", "10.0.0.5:6379", "head.cluster:6379", "ray://h:10001"]
)
def test_accepted_addresses(tmp_path: Path, good: str) -> None:
    assert scenario(tmp_path, ray_address=good).engine.ray_address == good


@pytest.mark.parametrize("bad", ["10.0.0.5", "host:port", ":6379", "h:0", "h:70000"])
def test_bad_address_names_the_key_and_the_forms(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=r"engine\.ray_address=.*HOST:PORT"):
        scenario(tmp_path, ray_address=bad)


def test_address_needs_the_ray_engine(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only the ray engine uses"):
        validate_scenario({"engine": {"name": "inprocess", "ray_address": "auto"}})


def test_empty_address_pins_a_private_runtime() -> None:
    # Ray reads RAY_ADDRESS; unset it would join whatever `ray start` left on the machine
    assert resolve_ray_address("") == "local"


def test_listening_head_is_used_as_given() -> None:
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        assert resolve_ray_address(address) == address


def test_unreachable_head_fails_before_flower_starts(tmp_path: Path) -> None:
    port = free_port()  # nothing listens on it
    with pytest.raises(
        EngineError, match=rf"nothing listens there.*ray start --head --port {port}"
    ):
        run_engine(scenario(tmp_path, ray_address=f"127.0.0.1:{port}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # no Flower process, no results folder


def test_ray_node_id_only_inside_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert ray_node_id() is None  # in-process engine, SuperNodes: Ray never imported
    fake = types.SimpleNamespace(
        is_initialized=lambda: True,
        get_runtime_context=lambda: types.SimpleNamespace(get_node_id=lambda: "ab12"),
    )
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert ray_node_id() == "ab12"
    fake.is_initialized = lambda: False
    assert ray_node_id() is None
