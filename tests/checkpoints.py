"""What kill-and-resume tests wait for: the round of the checkpoint on disk, read from the file
itself. A metrics line or the file's existence is not enough: the round's metrics are logged
before its checkpoint is written, so a kill right then finds the previous round's checkpoint."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from server.checkpoint import CheckpointError, load_checkpoint


def checkpointed_round(run_dir: Path) -> int | None:
    """The round of ``run_dir``'s checkpoint, or None while there is none that reads whole (it is
    replaced atomically, but a reader can still meet a file system mid-rename or a first write)."""
    try:
        return load_checkpoint(run_dir).server_round
    except (FileNotFoundError, CheckpointError, OSError):
        return None


def wait_for_checkpoint(
    run_dir: Path,
    min_round: int,
    proc: subprocess.Popen | None = None,
    timeout: float = 150.0,
    poll_s: float = 0.05,
) -> int:
    """Block until ``run_dir``'s checkpoint is of round ``min_round`` or later; return that round.
    Fails when ``proc`` (the run) exits first or ``timeout`` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = checkpointed_round(run_dir)
        if found is not None and found >= min_round:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the run exited (code {proc.returncode}) before checkpointing round {min_round}"
            )
        time.sleep(poll_s)
    raise AssertionError(f"no checkpoint of round {min_round} within {timeout:g}s")
