"""Flower processes (``flower-superlink``, ``flower-supernode``, ``flwr``) started on loopback for
one run, and stopped with it: what the Ray and deployment engines, and ``fedge deploy``, share."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedge.engines.errors import EngineError

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise EngineError(
            f"`{name}` not found; install fedge with `pip install -e .` (it brings flwr)"
        )
    return found


@contextmanager
def flower_processes(log_dir: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(log_dir)
    try:
        yield group
    finally:
        group.stop_all()


class ProcessGroup:
    """Flower processes started for one run; every one is stopped by its PID (whole process group)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.flwr_home = Path(tempfile.mkdtemp(prefix="fedge-flwr-home-"))
        # Flower's processes spawn `flower-superexec` & co. by name: put this interpreter's bin first.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(self.flwr_home), "PATH": path}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115  (closed with the process)
        # under fedge/reaper.py: the process and its descendants stop when fedge dies, even by
        # SIGKILL, so nothing keeps writing a run folder that --resume reuses
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedge.reaper", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, "FEDGE_REAPER_PARENT": str(os.getpid())},
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.time() + 10
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.flwr_home, ignore_errors=True)


def wait_for_port(
    port: int, proc: subprocess.Popen, what: str, group: ProcessGroup, timeout: float = 60
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise EngineError(f"{what} exited with code {proc.returncode}:\n{group.log_tail(what)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise EngineError(
        f"{what} did not open port {port} within {timeout:.0f}s:\n{group.log_tail(what)}"
    )
