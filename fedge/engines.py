"""Three engines that run the *same* ServerApp (``server.app:app``) and ClientApp (``clients.app:app``).

1. ``inprocess`` (default): :class:`InProcessGrid`, a ``flwr.serverapp.Grid`` that calls the ClientApp
   directly — no Ray, no sockets. Exceptions become Flower error replies, as on a real SuperNode.
   ``packed`` is the same grid handing a round's FedAvg/FedProx training messages to one batched
   trainer (:mod:`fedge.packed`); everything else still goes through the ClientApp.
2. ``ray``: Flower's simulation runtime, the way ``flwr run`` does it: a ``flower-superlink --simulation``
   on loopback, the app submitted with ``flwr run``, client resources from the scenario.
3. ``deployment``: a SuperLink and one ``flower-supernode`` per client on loopback (insecure: for real
   machines with TLS see the README), the app submitted with ``flwr run``.

All three pass the scenario to the apps through ``run_config`` and let the ServerApp write the results.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import tomli_w
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedge.apps import APP_DIR, stage_app
from fedge.deploy import superlink_args, supernode_args, write_connection
from scenarios.config import Scenario
from server.ray_guard import STOP_PREFIX

SERVER_NODE_ID = 1
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
}


# messages, node contexts -> {position in messages: (reply, seconds)} for those it answered
BatchTrainer = Callable[[list[Message], dict[int, Context]], dict[int, tuple[Message, float]]]


class EngineError(RuntimeError):
    """An engine could not run the scenario; the message carries the tail of the relevant log."""


# --------------------------------------------------------------------------------------------
# 1. in-process
# --------------------------------------------------------------------------------------------
class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one persistent Context per node."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict,
        seed: int = 0,
        run_id: int = 1,
        node_configs: list[dict] | None = None,
        latency_fn: Callable[[Context, Message], float] | None = None,
        batch_trainer: BatchTrainer | None = None,
    ) -> None:
        """``latency_fn(context, reply)`` adds simulated seconds to a node's measured reply time;
        replies that arrive after ``send_and_receive``'s timeout are dropped, as on a real grid.
        ``batch_trainer(messages, contexts)`` (the packed engine) may answer some of the pushed
        messages at once: {position: (reply, seconds)}; the ClientApp answers the rest."""
        rng = random.Random(seed)
        ids: list[int] = []
        while len(ids) < num_nodes:  # random 63-bit ids like a SuperLink's, but reproducible
            nid = rng.getrandbits(63)
            if nid not in ids and nid != SERVER_NODE_ID:
                ids.append(nid)
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config)
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config={
                    "partition-id": i,
                    "num-partitions": num_nodes,
                    **((node_configs or [{}] * num_nodes)[i]),
                },
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nid in enumerate(ids)
        }
        self.latency_fn = latency_fn
        self.batch_trainer = batch_trainer
        self._replies: dict[str, tuple[Message, float]] = {}  # message id -> (reply, seconds)

    # Grid API -------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = [self._assign_id(msg) for msg in messages]
        batched = self.batch_trainer(messages, self.contexts) if self.batch_trainer else {}
        for pos, (msg_id, msg) in enumerate(zip(ids, messages, strict=True)):
            if pos in batched:
                self._store(msg_id, msg, *batched[pos])
                continue
            t0 = time.perf_counter()
            reply = self._deliver(msg)
            self._store(msg_id, msg, reply, time.perf_counter() - t0)
        return ids

    @staticmethod
    def _assign_id(msg: Message) -> str:
        msg_id = str(uuid.uuid4())
        msg.metadata.__dict__["_message_id"] = msg_id  # what a SuperLink assigns on push
        return msg_id

    def _store(self, msg_id: str, msg: Message, reply: Message, seconds: float) -> None:
        """Keep ``reply`` to ``msg`` (its node took ``seconds``) for ``pull_messages``."""
        if self.latency_fn is not None and msg.metadata.dst_node_id in self.contexts:
            seconds += self.latency_fn(self.contexts[msg.metadata.dst_node_id], reply)
        self._replies[msg_id] = (reply, seconds)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i)[0] for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver and collect; nodes run "in parallel", so a reply is late when its own time
        exceeds ``timeout`` — late replies are dropped (stragglers), like Flower's Grid does."""
        ids = list(self.push_messages(messages))
        if timeout is not None:
            for msg_id in ids:
                reply, seconds = self._replies[msg_id]
                if seconds > timeout:
                    del self._replies[msg_id]
                    logging.getLogger("flwr").warning(
                        "node %d replied after %.1fs > timeout %.1fs: dropped as a straggler",
                        reply.metadata.src_node_id,
                        seconds,
                        timeout,
                    )
        return self.pull_messages(ids)

    # ------------------------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        dst = msg.metadata.dst_node_id
        if dst not in self.contexts:
            return Message(
                Error(ErrorCode.NODE_UNAVAILABLE, f"node {dst} does not exist"), reply_to=msg
            )
        try:
            return self.client_app(msg, self.contexts[dst])
        except Exception as ex:  # a failing client is an error reply, never a crashed server
            reason = f"{type(ex).__name__}: {ex}"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


def run_inprocess(
    scenario: Scenario, run_dir: Path, show_progress: bool = True, resume: bool = False
) -> dict:
    """Run the scenario with :class:`InProcessGrid`; return the run summary. With
    ``engine.name = "packed"`` the grid hands training messages to :mod:`fedge.packed`."""
    from clients.app import MODS
    from clients.app import app as client_app
    from clients.node import resolve_device
    from server.app import run_server

    # Per-round news goes to the progress line and the results folder; keep Flower's INFO chatter out.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_config = {**scenario.to_run_config(), "run-dir": str(run_dir)}
    packer = None
    if scenario.engine.name == "packed":
        from fedge.packed import PackedTrainer

        packer = PackedTrainer(scenario, resolve_device(scenario.engine.device), MODS)
    grid = InProcessGrid(
        client_app,
        scenario.data.num_clients,
        run_config,
        seed=scenario.seed,
        batch_trainer=packer,
    )
    TaskIdentity.run_id = grid.run.run_id
    TaskIdentity.node_id = SERVER_NODE_ID
    TaskIdentity.task_id = 1
    summary = run_server(grid, scenario, run_dir, show_progress=show_progress, resume=resume)
    if packer is not None:
        print(packer.report(), flush=True)
    return summary


# --------------------------------------------------------------------------------------------
# 2 & 3. Flower runtimes started as real processes on loopback
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
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


def _wait_for_port(
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


def _submit(
    scenario: Scenario,
    run_dir: Path,
    group: ProcessGroup,
    address: str,
    federation_config: str | None,
    resume: bool = False,
    root_cert: Path | None = None,
) -> dict:
    """``flwr run <app> fedge --stream`` against the SuperLink at ``address`` (TLS verified with
    ``root_cert``; plain HTTP when None) with the scenario as run config; wait for the results."""
    write_connection(group.flwr_home, address, root_cert)
    overrides = group.log_dir / "run_config.toml"
    overrides.write_text(
        tomli_w.dumps({**scenario.to_run_config(), "run-dir": str(run_dir), "resume": resume})
    )
    # A staged copy: `flwr run` would rewrite the repository's pyproject.toml (fedge/apps.py).
    app = stage_app(group.flwr_home / "fedge-app", APP_DIR)
    args = [_exe("flwr"), "run", str(app), "fedge", "--stream", "--run-config", str(overrides)]
    if federation_config:
        args += ["--federation-config", federation_config]
    proc = group.start("flwr-run", args)
    summary_file = run_dir / "summary.json"
    deadline = time.time() + scenario.federation.round_timeout_s * (scenario.num_rounds + 1)
    # `flwr run --stream` keeps streaming after the run ends; the summary file marks completion.
    while not summary_file.exists():
        if time.time() > deadline:
            raise EngineError(
                f"run did not finish in time; flwr log:\n{group.log_tail('flwr-run')}"
            )
        if proc.poll() is not None and not summary_file.exists():
            time.sleep(2)  # the file may land just after the stream closes
            if not summary_file.exists():
                _raise_stop_reason(group.log_dir / "flwr-run.log")
                raise EngineError(
                    f"flwr run ended without results (code {proc.returncode}):\n{group.log_tail('flwr-run')}"
                )
        time.sleep(0.5)
    time.sleep(0.5)
    import json

    return json.loads(summary_file.read_text())


def resolve_ray_address(address: str) -> str:
    """The ``RAY_ADDRESS`` the simulation runtime gets for ``engine.ray_address``.

    Flower's Ray backend calls ``ray.init()`` without an address, and Ray then reads
    ``RAY_ADDRESS``; unset, it would silently join whatever cluster ``ray start`` last made on this
    machine. So an empty ``ray_address`` pins ``local`` (a private runtime, as the engine always
    meant), ``HOST:PORT`` is checked to be listening, and ``auto`` is resolved here so a missing
    cluster fails now with a message instead of inside the simulation process.
    """
    if not address:
        return "local"
    if address.startswith("ray://"):
        return address  # Ray Client: Ray itself reports an unreachable server
    if address == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:
            found = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            found = None
        if not found:
            raise EngineError(
                "engine.ray_address='auto' but no Ray cluster runs on this machine: start one "
                "with `ray start --head --port 6379` (and `ray start --address HEAD:6379` on the "
                "other machines), or give its address as engine.ray_address='HOST:PORT'"
            )
        return found
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.settimeout(5)
        if s.connect_ex((host, int(port))) != 0:
            raise EngineError(
                f"engine.ray_address={address!r}: nothing listens there. Start the head node "
                f"with `ray start --head --port {port}` on {host} (and `ray start --address "
                f"{address}` on the other machines), or fix the address"
            )
    return address


def _raise_stop_reason(log: Path) -> None:
    """A run the ServerApp stopped on purpose (a lost Ray node, server/ray_guard.py) ends with
    its own message, not a log tail to dig through."""
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        at = line.find(STOP_PREFIX)
        if at >= 0:
            raise EngineError(line[at:].strip().rstrip("'\"").strip())


def run_ray(scenario: Scenario, run_dir: Path, resume: bool = False) -> dict:
    """Flower's simulation runtime (Ray) behind a loopback SuperLink, driven by ``flwr run``; on
    a private local Ray runtime, or joining the cluster at ``engine.ray_address``."""
    eng = scenario.engine
    ray_address = resolve_ray_address(eng.ray_address)
    with flower_processes(run_dir / "logs") as group:
        # inherited by the SuperLink's simulation process, whose Ray backend honours it
        group.env["RAY_ADDRESS"] = ray_address
        port = eng.port or free_port()
        link = group.start(
            "superlink",
            [
                _exe("flower-superlink"),
                "--insecure",
                "--simulation",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                FLWR_IN_MEMORY_DB_NAME,
            ],
        )
        _wait_for_port(port, link, "superlink", group)
        federation = (
            f"num-supernodes={scenario.data.num_clients} client-resources-num-cpus={eng.num_cpus} "
            f"client-resources-num-gpus={eng.num_gpus}"
        )
        return _submit(scenario, run_dir, group, f"127.0.0.1:{port}", federation, resume)


def run_deployment(scenario: Scenario, run_dir: Path, resume: bool = False) -> dict:
    """A SuperLink plus one SuperNode per client on loopback (insecure), driven by ``flwr run``."""
    eng = scenario.engine
    n = scenario.data.num_clients
    with flower_processes(run_dir / "logs") as group:
        port = eng.port or free_port()
        link = group.start(
            "superlink",
            superlink_args(
                _exe("flower-superlink"),
                certs=None,
                host="127.0.0.1",
                port=port,
                database=FLWR_IN_MEMORY_DB_NAME,
            ),
        )
        _wait_for_port(port, link, "superlink", group)
        for i in range(n):
            group.start(
                f"supernode-{i}",
                supernode_args(
                    _exe("flower-supernode"), f"127.0.0.1:{port}", i, n, port=free_port()
                ),
            )
        return _submit(scenario, run_dir, group, f"127.0.0.1:{port}", None, resume)


def run_engine(
    scenario: Scenario, run_dir: Path, show_progress: bool = True, resume: bool = False
) -> dict:
    """Run ``scenario`` on the engine it names; results land in ``run_dir``; return the summary.
    ``resume=True`` continues ``run_dir`` from its last checkpoint."""
    if scenario.engine.name in ("inprocess", "packed"):
        return run_inprocess(scenario, run_dir, show_progress=show_progress, resume=resume)
    if scenario.engine.name == "ray":
        return run_ray(scenario, run_dir, resume)
    if scenario.engine.name == "deployment":
        return run_deployment(scenario, run_dir, resume)
    raise ValueError(f"unknown engine {scenario.engine.name!r}")
