"""Start-up times, each in a fresh process: ``fedge --help``, ``fedge validate`` and the quickstart's
time before its first round.

    python benchmarks/startup.py [--repeats 3]

``before round 1`` is the time from starting ``fedge run scenarios/quickstart.toml`` (a new
Python process) to the moment the ServerApp enters its round loop: imports, scenario checks, the
data split (cached on disk after the first run), the model, the strategy, the initial central
evaluation is *not* included (it is round 0 inside the loop). The first repeat of each command
may pay for cold disk caches (e.g. generating mnist1d or partitioning the data once); the median
of the repeats is what a user sees on the second and later runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.toml"
# Run by the child: fedge's CLI, with the round loop replaced by a clock that stops the process.
CHILD = """
import os, sys, time
import server.app as server_app

def first_round(*args, **kwargs):
    print(f"ENTERED {time.time():.6f}", flush=True)
    os._exit(0)

server_app.run_rounds = first_round
sys.argv = ["fedge", "run", sys.argv[1], "--run-dir", sys.argv[2], "--quiet"]
from fedge.cli import main
main()
"""


def child_seconds(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall, CPU of the child, stdout) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    script = Path(sys.executable).parent / "fedge"  # the installed console script, as users run it
    fedge = [str(script)] if script.exists() else [sys.executable, "-m", "fedge.cli"]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; wall / CPU seconds per repeat")
    for name, cmd in (
        ("fedge --help", [*fedge, "--help"]),
        ("fedge validate quickstart", [*fedge, "validate", str(QUICKSTART)]),
    ):
        runs = [child_seconds(cmd, env)[:2] for _ in range(args.repeats)]
        _report(name, runs)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            run_dir = str(Path(tmp) / f"run{i}")
            t0 = time.time()
            wall, cpu, out = child_seconds(
                [sys.executable, "-c", CHILD, str(QUICKSTART), run_dir], env
            )
            entered = float(out.split("ENTERED ")[1].split()[0])
            runs.append((entered - t0, cpu))
    _report("quickstart: start to round 1", runs)


def _report(name: str, runs: list[tuple[float, float]]) -> None:
    walls = ", ".join(f"{w:.2f}/{c:.2f}" for w, c in runs)
    median_wall = statistics.median(w for w, _ in runs)
    median_cpu = statistics.median(c for _, c in runs)
    print(f"{name:<30} median {median_wall:5.2f} s wall, {median_cpu:5.2f} s CPU   ({walls})")


if __name__ == "__main__":
    main()
