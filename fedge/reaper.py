"""``python -m fedge.reaper CMD ARGS...``: run a Flower process so that it, and everything it
starts, stops when the fedge process that launched it dies, even by SIGKILL.

The engines start ``flower-superlink`` & co. in sessions of their own (stopped as a group when a
run ends). A ``fedge run`` killed outright never gets to stop them, and a simulation keeps
training and writing the run folder that ``fedge run --resume`` then reuses. Linux's
``PR_SET_PDEATHSIG`` covers only a direct child, while the simulation runs two levels below the
SuperLink, in a session of its own (and it finishes its run when merely sent SIGTERM); so the
engines start each command under this small process instead. It asks the kernel for SIGUSR1 when
fedge dies and then SIGKILLs the command and all its descendants (found through ``/proc``, and its
process group): the run dies as fedge did, its last checkpoint intact. On SIGTERM (a normal stop)
it passes SIGTERM to them and SIGKILLs what is left after a grace period. It exits with the
command's status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

GRACE_S = 10.0  # as ProcessGroup.stop_all: then SIGKILL


def descendants(root: int) -> list[int]:
    """Pids below ``root`` (Linux ``/proc``; empty elsewhere), parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGUSR1)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m fedge.reaper CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = int(os.environ.get("FEDGE_REAPER_PARENT", os.getppid()))
    child: subprocess.Popen | None = None

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal below reaches us too
        _signal_all(descendants(os.getpid()), signal.SIGTERM)
        os.killpg(0, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while child is not None and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        # a fresh snapshot, never remembered pids (the kernel may have reused them meanwhile)
        _signal_all(descendants(os.getpid()), signal.SIGKILL)
        os.killpg(0, signal.SIGKILL)  # stragglers, and this process

    def parent_died(signum: int, _frame: object) -> None:
        _signal_all(descendants(os.getpid()), signal.SIGKILL)  # snapshot first: no reparenting
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, parent_died)
    _die_with_parent(parent)
    child = subprocess.Popen(argv)  # our process group (unless it makes a session of its own)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
