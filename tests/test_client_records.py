"""clients.jsonl says which trainer and which device profile each client used (issue 18, item 11)."""

from __future__ import annotations

from pathlib import Path

from fedge.engines import run_engine
from scenarios.results import load_run


def test_clients_jsonl_names_trainer_and_device_profile(tmp_path: Path, tiny_scenario) -> None:
    scenario = tiny_scenario(
        seed=2,
        num_rounds=1,
        edge={"trainers": {"0": "tpsgd"}, "export_onnx": False},
        devices={"classes": ["t4", "jetson_nano"], "assign": "list"},
    )
    run_engine(scenario, tmp_path / "run", show_progress=False)
    rows = sorted(load_run(tmp_path / "run").clients, key=lambda r: r["partition_id"])
    assert [r["partition_id"] for r in rows] == [0, 1, 2]
    assert [r["trainer"] for r in rows] == ["tpsgd", "fedavg", "fedavg"]
    assert [r["device_profile"] for r in rows] == ["t4", "jetson_nano", "t4"]
    names = scenario.devices.class_names()  # the index still points into these, as before
    assert [names[r["device_index"]] for r in rows] == ["t4", "jetson_nano", "t4"]


def test_a_supernodes_device_profile_is_recorded_without_a_devices_section(
    tmp_path: Path, tiny_scenario
) -> None:
    """`fedge deploy supernode --device-profile NAME` puts NAME into the node config."""
    from flwr.supercore.task_identity import TaskIdentity

    from clients.app import app as client_app
    from fedge.engines import SERVER_NODE_ID, InProcessGrid
    from server.app import run_server

    scenario = tiny_scenario(
        num_rounds=1, data={"num_clients": 2, "num_samples": 400}, model={"hidden": [8]}
    )
    profiles = [{"device-profile": "jetson-nano"}, {"device-profile": "rpi5"}]
    grid = InProcessGrid(client_app, 2, scenario.to_run_config(), node_configs=profiles)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    run_server(grid, scenario, tmp_path / "run", show_progress=False)
    rows = sorted(load_run(tmp_path / "run").clients, key=lambda r: r["partition_id"])
    assert [(r["device_profile"], r["trainer"]) for r in rows] == [
        ("jetson-nano", "fedavg"),
        ("rpi5", "fedavg"),
    ]
