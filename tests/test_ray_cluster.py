"""The ray engine on a real two-node Ray cluster on this machine (a head and a worker raylet with
one CPU each, ``ray.cluster_utils.Cluster``): clients run on both nodes and give the in-process
engine's numbers; a lost worker node stops the run with a clear message and ``--resume`` continues
it on the remaining node, client state (LoRA error-feedback residuals) included, to the numbers of
an uninterrupted run. Every Ray and Flower process is stopped at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from fedge.engines import EngineError, run_engine
from scenarios.config import Scenario, scenario_to_toml, validate_scenario
from scenarios.results import load_run
from server.checkpoint import load_checkpoint
from tests.checkpoints import wait_for_checkpoint
from tests.test_client_state_resume import lora_scenario

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[1]


def _processes_using(path: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(path in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple]:
    """Head + worker node, each with 1 CPU, in a private temp dir: Ray's "current cluster" file
    goes there, so no other Ray user on this machine joins it by accident."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # short: Ray's socket paths must fit
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    ray_cluster = None
    try:
        ray_cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
        )
        worker = ray_cluster.add_node(num_cpus=1)
        ray_cluster.wait_for_nodes(timeout=60)
        yield ray_cluster, worker
    finally:
        if ray_cluster is not None:
            ray_cluster.shutdown()
        deadline = time.time() + 20
        while _processes_using(tmp) and time.time() < deadline:
            time.sleep(0.5)
        left = [p.pid for p in _processes_using(tmp)]
        for pid in left:  # only this cluster's processes (their command line names its dir)
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes outlived the cluster shutdown: {left}"


def crash(node) -> None:
    """The machine behind a Ray node dies: SIGKILL its raylet and the worker processes (the
    client actors) it started. Killing the raylet alone leaves running actors answering for a
    while, since actor calls go worker to worker."""
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    workers = raylet.children(recursive=True)
    node.kill_raylet()
    for proc in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def on_ray(scenario: Scenario, address: str) -> Scenario:
    engine = scenario.engine.model_copy(update={"name": "ray", "ray_address": address})
    return scenario.model_copy(update={"engine": engine})


def learning(run_dir: Path) -> list[tuple]:
    return [
        (r["round"], r["central_accuracy"], r["central_loss"], r.get("train_loss"))
        for r in load_run(run_dir).rounds
    ]


def assert_no_flower_processes(run_dir: Path) -> None:
    """The engine stopped its SuperLink, SuperExec, simulation and ``flwr run`` processes."""
    left = [p.pid for p in _processes_using(str(run_dir))]
    assert not left, f"Flower processes left running: {left}"


def test_clients_run_on_both_nodes_with_inprocess_accuracies(cluster, tmp_path: Path) -> None:
    ray_cluster, worker = cluster
    scenario = validate_scenario(
        {
            "name": "two-nodes",
            "seed": 7,
            "num_rounds": 2,
            "output_dir": str(tmp_path),
            "data": {
                "dataset": "mnist1d",
                "num_clients": 4,
                "partitioner": "dirichlet",
                "alpha": 1.0,
                "num_samples": 600,
            },
            "model": {"name": "mlp", "hidden": [32]},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.1},
            "federation": {"fraction_evaluate": 0.5, "round_timeout_s": 120},
        }
    )
    run_engine(scenario, tmp_path / "inprocess", show_progress=False)
    run_engine(on_ray(scenario, ray_cluster.address), tmp_path / "ray")
    assert_no_flower_processes(tmp_path / "ray")

    nodes = {c.get("ray_node_id") for c in load_run(tmp_path / "ray").clients}
    assert nodes == {ray_cluster.head_node.node_id, worker.node_id}  # both machines trained
    assert all("ray_node_id" not in c for c in load_run(tmp_path / "inprocess").clients)
    got, want = learning(tmp_path / "ray"), learning(tmp_path / "inprocess")
    assert [r[:2] for r in got] == [r[:2] for r in want]  # identical accuracies
    assert [r[2] for r in got] == pytest.approx([r[2] for r in want], abs=1e-6)


def spawned_by(fedge_pid: int) -> list[psutil.Process]:
    """Live processes a fedge process started through fedge/reaper.py (and their children)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FEDGE_REAPER_PARENT") == str(fedge_pid):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def lora_on_ray(tmp_path: Path, address: str) -> Scenario:
    """20 rounds (so a kill lands mid-run), bounded round timeout, LoRA error feedback."""
    scenario = lora_scenario(tmp_path).model_copy(update={"num_rounds": 20})
    federation = scenario.federation.model_copy(update={"round_timeout_s": 120})
    return on_ray(scenario.model_copy(update={"federation": federation}), address)


def test_sigkill_then_resume_restores_client_state(cluster, tmp_path: Path) -> None:
    """SIGKILL `fedge run` (ray engine, two nodes) after round 2: its Flower processes go with it
    (nothing keeps writing the folder), and `fedge run --resume` restores the clients'
    error-feedback residuals, ending exactly where an uninterrupted run ends."""
    ray_cluster, _ = cluster
    scenario = lora_on_ray(tmp_path, ray_cluster.address)
    reference = tmp_path / "reference"
    inprocess = scenario.model_copy(
        update={
            "engine": scenario.engine.model_copy(update={"name": "inprocess", "ray_address": ""})
        }
    )
    run_engine(inprocess, reference, show_progress=False)

    scenario_file = tmp_path / "lora.toml"
    scenario_file.write_text(scenario_to_toml(scenario))
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    fedge = [sys.executable, "-m", "fedge.cli"]
    proc = subprocess.Popen(
        [*fedge, "run", str(scenario_file), "--run-dir", str(run_dir), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_checkpoint(run_dir, 2, proc)  # the checkpoint's own round, read from the file
        proc.kill()  # at once: a round takes a fraction of a second
        proc.wait(timeout=30)
        # every Flower process fedge started carries its pid (fedge/reaper.py); none may survive
        deadline = time.time() + 30
        while (left := spawned_by(proc.pid)) and time.time() < deadline:
            time.sleep(0.2)
        assert not left, f"processes outlived the killed fedge: {[p.pid for p in left]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for child in spawned_by(proc.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    assert not (run_dir / "summary.json").exists()
    checkpointed = load_checkpoint(run_dir).server_round
    assert 2 <= checkpointed < scenario.num_rounds

    resumed = subprocess.run(
        [*fedge, "run", "--resume", str(run_dir), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    got, want = learning(run_dir), learning(reference)
    assert [r[0] for r in got] == list(range(scenario.num_rounds + 1))
    assert [r[1] for r in got] == [r[1] for r in want]
    assert [r[2] for r in got] == pytest.approx([r[2] for r in want], abs=1e-6)
    assert [r[3] for r in got[1:]] == pytest.approx([r[3] for r in want[1:]], abs=1e-6)


def test_lost_worker_stops_run_and_resume_matches_uninterrupted(cluster, tmp_path: Path) -> None:
    """Kill the worker raylet mid-run: the run stops with a clear message; ``--resume`` carries on
    on the head node alone, restoring every client's error-feedback residuals from the checkpoint,
    and ends exactly where an uninterrupted (in-process) run ends."""
    ray_cluster, worker = cluster
    scenario = lora_on_ray(tmp_path, ray_cluster.address)
    inprocess = scenario.model_copy(
        update={
            "engine": scenario.engine.model_copy(update={"name": "inprocess", "ray_address": ""})
        }
    )
    reference = tmp_path / "reference"
    run_engine(inprocess, reference, show_progress=False)

    run_dir = tmp_path / "ray"
    killed_at: list[int] = []

    def kill_worker_after_round_2() -> None:
        # the checkpoint's own round: metrics.jsonl runs ahead of it by up to one round
        with contextlib.suppress(AssertionError):
            killed_at.append(wait_for_checkpoint(run_dir, 2))
            crash(worker)

    killer = threading.Thread(target=kill_worker_after_round_2, daemon=True)
    killer.start()
    with pytest.raises(EngineError, match="Ray node lost") as stopped:
        run_engine(scenario, run_dir)
    killer.join(timeout=5)
    assert killed_at, "the worker was never killed"
    assert "fedge run --resume" in str(stopped.value)
    assert not (run_dir / "summary.json").exists()
    assert_no_flower_processes(run_dir)
    checkpointed = load_checkpoint(run_dir).server_round
    assert killed_at[0] <= checkpointed < scenario.num_rounds

    # the cluster notices the lost node before the resumed run sizes its actor pool
    ray_cluster.remove_node(worker, allow_graceful=False)
    ray_cluster.wait_for_nodes(timeout=60)
    run_engine(scenario, run_dir, resume=True)
    assert_no_flower_processes(run_dir)

    got, want = learning(run_dir), learning(reference)
    assert [r[0] for r in got] == list(range(scenario.num_rounds + 1))
    assert [r[1] for r in got] == [r[1] for r in want]
    assert [r[2] for r in got] == pytest.approx([r[2] for r in want], abs=1e-6)  # central loss
    assert [r[3] for r in got[1:]] == pytest.approx([r[3] for r in want[1:]], abs=1e-6)  # train
    final, ref = torch.load(run_dir / "model.pt"), torch.load(reference / "model.pt")
    assert all(torch.allclose(final[k], ref[k], atol=1e-6) for k in ref)
    after = {c["ray_node_id"] for c in load_run(run_dir).clients if c["round"] > checkpointed}
    assert after == {ray_cluster.head_node.node_id}  # the resumed rounds ran on the head alone
