"""A partition id is bound to the node that claimed it first (server/identity.py, issue #23): a
second node claiming it is refused and counted, ids outside [0, num_clients) are refused, an owner
that is gone hands its id over, and clients.jsonl names the node behind every reply."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.identity import IDENTITY_RECORD
from fedge.engines import SERVER_NODE_ID, InProcessGrid
from scenarios.config import Scenario, validate_scenario
from scenarios.results import load_run
from server.checkpoint import load_checkpoint
from server.identity import IdentityGuard

NUM_ROUNDS = 2


def small_scenario(tmp_path: Path, num_clients: int = 3) -> Scenario:
    return validate_scenario(
        {
            "name": "identity",
            "seed": 2,
            "num_rounds": NUM_ROUNDS,
            "output_dir": str(tmp_path),
            "data": {"dataset": "mnist1d", "num_clients": num_clients, "num_samples": 600},
            "model": {"name": "mlp", "hidden": [16]},
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
            "federation": {"fraction_train": 1.0, "fraction_evaluate": 0.0},
        }
    )


def run_with_node_configs(scenario: Scenario, run_dir: Path, node_configs: list[dict]) -> dict:
    """The in-process engine, with chosen ``--node-config`` per node (as SuperNodes get them)."""
    from clients.app import app as client_app
    from server.app import run_server

    grid = InProcessGrid(
        client_app,
        scenario.data.num_clients,
        {**scenario.to_run_config(), "run-dir": str(run_dir)},
        seed=scenario.seed,
        node_configs=node_configs,
    )
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    return run_server(grid, scenario, run_dir, show_progress=False)


def test_second_node_claiming_a_partition_is_refused_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nodes 0 and 1 both say partition 0: before, both were aggregated (partition 0 counted
    twice, partition 1 never trained) and one's client state replaced the other's."""
    scenario = small_scenario(tmp_path)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="flwr"):
        summary = run_with_node_configs(scenario, run_dir, [{}, {"partition-id": 0}, {}])
    assert summary["status"] == "ok"
    run = load_run(run_dir)
    assert [r["num_identity_refused"] for r in run.rounds[1:]] == [1] * NUM_ROUNDS
    assert [r["num_valid"] for r in run.rounds[1:]] == [2] * NUM_ROUNDS
    trained = [c for c in run.clients if "train_loss" in c]
    assert sorted(c["partition_id"] for c in trained) == [0, 0, 2, 2]  # once per round each
    owners = {c["node_id"] for c in trained if c["partition_id"] == 0}
    assert len(owners) == 1  # always the same node: the first claimant
    assert "(identity): partition-id 0 is held by node" in caplog.text
    # the checkpoint keeps partition 0's state from its owner only, and binds it to that node
    guard_state = next(s for s in load_checkpoint(run_dir).plugin_states if "owners" in s)
    assert guard_state["owners"][0] == owners.pop()


def test_clients_jsonl_names_the_node_of_every_reply(tmp_path: Path) -> None:
    scenario = small_scenario(tmp_path)
    run_with_node_configs(scenario, tmp_path / "run", [{}, {}, {}])
    clients = load_run(tmp_path / "run").clients
    assert clients and all(isinstance(c["node_id"], int) for c in clients)
    assert len({c["node_id"] for c in clients}) == scenario.data.num_clients


# ------------------------------------------------------------------------ the guard on its own
@pytest.fixture
def runtime() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1


def reply_from(node: int, partition: object) -> Message:
    """A training reply from ``node`` whose identity record claims ``partition``."""
    sent = Message(RecordDict(), node, "train")
    sent.metadata.__dict__["_message_id"] = f"m{node}"
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": 10}),
            IDENTITY_RECORD: ConfigRecord({"partition-id": partition}),
        }
    )
    reply = Message(content, reply_to=sent)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


@pytest.mark.usefixtures("runtime")
@pytest.mark.parametrize("partition", [3, 999, -1, "0", "abc", 1.5, float("nan"), float("inf")])
def test_ids_outside_the_federation_or_not_integers_are_refused(partition: object) -> None:
    guard = IdentityGuard(num_clients=3)
    kept, metrics = guard.filter_train_replies(1, [reply_from(11, partition), reply_from(12, 2)])
    assert [r.metadata.src_node_id for r in kept] == [12]
    assert metrics == {"num_identity_refused": 1}
    assert 999 not in guard.owners and -1 not in guard.owners


@pytest.mark.usefixtures("runtime")
def test_edge_ids_of_the_range_are_accepted() -> None:
    guard = IdentityGuard(num_clients=3)
    kept, _ = guard.filter_train_replies(1, [reply_from(11, 0), reply_from(12, 2)])
    assert len(kept) == 2


@pytest.mark.usefixtures("runtime")
def test_a_gone_owners_id_can_be_taken_back_a_present_ones_cannot() -> None:
    guard = IdentityGuard(num_clients=2)
    connected = {11, 12}
    guard.connected_nodes = lambda: connected
    guard.filter_train_replies(1, [reply_from(11, 0)])
    kept, _ = guard.filter_train_replies(2, [reply_from(12, 0)])
    assert kept == [] and guard.owners[0] == 11  # 11 still connected: 12 is an impostor
    connected.discard(11)  # node 11 restarted (a new node id without --auth): 13 is it
    connected.add(13)
    kept, metrics = guard.filter_train_replies(3, [reply_from(13, 0), reply_from(12, 1)])
    assert len(kept) == 2 and metrics == {"num_identity_refused": 0}
    assert guard.owners == {0: 13, 1: 12}
    restored = IdentityGuard(num_clients=2)
    restored.load_state(guard.state())
    assert restored.owners == {0: 13, 1: 12}


@pytest.mark.usefixtures("runtime")
def test_stock_clients_without_identity_are_not_checked() -> None:
    reply = reply_from(11, 0)
    del reply.content[IDENTITY_RECORD]
    kept, metrics = IdentityGuard(num_clients=1).filter_train_replies(1, [reply])
    assert kept == [reply] and metrics == {"num_identity_refused": 0}


@pytest.mark.usefixtures("runtime")
def test_a_claim_that_is_no_integer_cannot_crash_the_round_loop() -> None:
    """sort_replies runs before any plugin: it used to int() the claim and raise on "abc"."""
    from server.loop import sort_replies

    replies = [reply_from(11, "abc"), reply_from(12, float("nan")), reply_from(13, 1)]
    assert [r.metadata.src_node_id for r in sort_replies(replies)] == [13, 11, 12]


@pytest.mark.slow
def test_two_supernodes_claiming_one_partition_on_a_loopback_deployment(tmp_path: Path) -> None:
    """Real SuperNodes on a loopback SuperLink, both started with partition-id 0: each round one
    reply is refused (the later claimant), partition 0 trains once, the run stays ok."""
    from fedge.engines import flower_processes
    from fedge.engines.deployment import start_loopback_deployment
    from fedge.engines.submit import submit_app

    scenario = small_scenario(tmp_path, num_clients=2)
    run_dir = tmp_path / "run"
    with flower_processes(tmp_path / "logs") as group:
        address = start_loopback_deployment(group, [0, 0], 2)  # both claim partition 0
        summary = submit_app(scenario, run_dir, group, address, None)
        server_log = (tmp_path / "logs" / "flwr-run.log").read_text()
    assert summary["status"] == "ok"
    run = load_run(run_dir)
    assert [r["num_identity_refused"] for r in run.rounds[1:]] == [1] * NUM_ROUNDS
    trained = [c for c in run.clients if "train_loss" in c]
    assert [c["partition_id"] for c in trained] == [0] * NUM_ROUNDS
    assert len({c["node_id"] for c in trained}) == 1  # the first claimant, every round
    assert "(identity): partition-id 0 is held by node" in server_log
