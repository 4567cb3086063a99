"""Wall time of a scenario on the ray engine joined to a Ray cluster of N one-CPU nodes on this
machine (``ray.cluster_utils.Cluster``: a head and N-1 worker raylets on loopback).

    python benchmarks/ray_cluster.py --nodes 1 [--scenario scenarios/quickstart.toml] [--set k=v ...]
    python benchmarks/ray_cluster.py --nodes 2

Prints the cluster start-up time, the run's wall time (``fedge``'s ``run_engine``, Flower start-up
included) and the final accuracy, and how many clients ran on each node. The cluster lives in a
private temporary directory and is shut down before the script exits.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import tempfile
import time
from pathlib import Path

from fedge.engines import run_engine
from scenarios.config import load_scenario
from scenarios.results import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="Ray nodes, one CPU each")
    parser.add_argument("--scenario", default="scenarios/quickstart.toml")
    parser.add_argument("--set", action="append", default=[], help="key=value overrides")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="frb", dir="/tmp")  # short: Ray's socket paths must fit
    os.environ["RAY_TMPDIR"] = tmp  # Ray's "current cluster" file goes here, not /tmp/ray
    from ray.cluster_utils import Cluster

    cluster = None
    try:
        t0 = time.perf_counter()
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
        )
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(timeout=60)
        started = time.perf_counter() - t0

        scenario = load_scenario(
            Path(args.scenario),
            ["engine.name=ray", f'engine.ray_address="{cluster.address}"', *args.set],
        )
        run_dir = Path(tmp) / "run"
        t1 = time.perf_counter()
        summary = run_engine(scenario, run_dir)
        wall = time.perf_counter() - t1
        per_node = collections.Counter(
            c.get("ray_node_id", "?")[:8] for c in load_run(run_dir).clients
        )
        print(
            f"nodes={args.nodes} cluster_start_s={started:.1f} run_wall_s={wall:.1f} "
            f"final_accuracy={summary['final_accuracy']:.4f} client_runs_per_node={dict(per_node)}"
        )
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
