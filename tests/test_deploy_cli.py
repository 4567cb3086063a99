"""`fedge deploy` around the Flower processes (issue 18, items 6 and 9): signals sent to fedge reach
the Flower process and fedge exits with its status; `submit` takes any Flower app folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fedge.deploy
from fedge.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# A stand-in for flower-superlink: records its PID, then waits; with TRAP it shuts down cleanly
# on SIGTERM (exit 7, as a process that finishes its own cleanup would), otherwise SIGTERM kills it.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    out = sys.argv[1]
    if sys.argv[2] == "trap":
        def stop(signum, frame):
            open(out + ".signal", "w").write(str(signum))
            sys.exit(7)
        signal.signal(signal.SIGTERM, stop)
    open(out + ".pid.tmp", "w").write(str(os.getpid()))
    os.replace(out + ".pid.tmp", out + ".pid")  # whole or absent: the test reads it at once
    time.sleep(60)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # exited but not yet reaped: stopped all the same
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (the SigCgt mask in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.parametrize(("mode", "expected"), [("trap", 7), ("plain", 128 + signal.SIGTERM)])
def test_sigterm_reaches_the_flower_process_and_fedge_exits_with_its_status(
    mode: str, expected: int, tmp_path: Path
) -> None:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    out = tmp_path / "child"
    code = (
        "import sys; from fedge.deploy import run_foreground; "
        f"sys.exit(run_foreground([sys.executable, {str(child)!r}, {str(out)!r}, {mode!r}]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    child_pid = None
    try:
        deadline = time.time() + 30
        # the child is up, and fedge forwards SIGTERM (its handler is installed): exactly the
        # state the signal below needs, read from /proc rather than slept for
        while not (out.with_suffix(".pid").exists() and _catches_sigterm(parent.pid)):
            assert time.time() < deadline and parent.poll() is None, "child never started"
            time.sleep(0.05)
        child_pid = int(out.with_suffix(".pid").read_text())
        parent.send_signal(signal.SIGTERM)  # what systemd / docker stop send
        assert parent.wait(timeout=20) == expected
        if mode == "trap":
            assert out.with_suffix(".signal").read_text() == str(int(signal.SIGTERM))
        deadline = time.time() + 5
        while _alive(child_pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), "the Flower process outlived fedge"
    finally:
        for pid in (parent.pid, child_pid):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=5)


# ------------------------------------------------------------------ submit: any Flower app
def _user_app(path: Path, config: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True)
    lines = [
        "[project]",
        'name = "userapp"',
        'version = "1.0.0"',
        "[tool.flwr.app]",
        'publisher = "someone"',
        "[tool.flwr.app.components]",
        'serverapp = "userapp.server_app:app"',
        'clientapp = "userapp.client_app:app"',
        "[tool.flwr.app.config]",
        *(f"{k} = {v}" for k, v in (config or {"num-server-rounds": "3"}).items()),
    ]
    (path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return path


RUN_STATUS = {"status": "finished:completed"}  # what the stand-in `flwr ls` reports


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """`flwr run` stand-in: records its arguments and says it started run 7, as flwr does."""
    calls: list[list[str]] = []

    def fake_flwr_run(args: list[str], on_line=None) -> int:
        calls.append(args)
        if on_line is not None:
            on_line("Successfully started run 7\n")
        return 0

    monkeypatch.setattr(fedge.deploy, "run_foreground", fake_flwr_run)
    monkeypatch.setattr(
        fedge.deploy, "run_status", lambda exe, run_id: (RUN_STATUS["status"], "details")
    )
    return calls


@pytest.mark.parametrize(
    ("status", "code"),
    [("finished:completed", 0), ("finished:failed", 1), ("finished:stopped", 1), ("unknown", 1)],
)
def test_submit_exits_with_the_runs_final_status(
    tmp_path: Path,
    submitted: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    status: str,
    code: int,
) -> None:
    """`flwr run --stream` exits 0 even when the ServerApp failed; `submit` asks for the run's
    status and exits 1 unless it completed."""
    monkeypatch.setitem(RUN_STATUS, "status", status)
    user = _user_app(tmp_path / "userapp")
    result = runner.invoke(app, ["deploy", "submit", "--app", str(user)])
    assert result.exit_code == code, result.output
    if code:
        assert f"run 7 ended {status}" in result.output


def _run_config(args: list[str]) -> dict:
    return tomllib.loads(Path(args[args.index("--run-config") + 1]).read_text())


def test_submit_takes_a_user_app_folder(tmp_path: Path, submitted: list[list[str]]) -> None:
    user = _user_app(tmp_path / "userapp")
    result = runner.invoke(
        app, ["deploy", "submit", "--app", str(user), "--run-config", "num-server-rounds=5"]
    )
    assert result.exit_code == 0, result.output
    (args,) = submitted
    assert args[1:4] == ["run", str(user.resolve()), "fedge"] and "--stream" in args
    assert _run_config(args) == {"num-server-rounds": 5}


def test_submit_fedge_app_is_a_staged_copy(tmp_path: Path, submitted: list[list[str]]) -> None:
    scenario = ROOT / "scenarios" / "quickstart.toml"
    result = runner.invoke(app, ["deploy", "submit", str(scenario), "--run-dir", "/srv/run1"])
    assert result.exit_code == 0, result.output
    (args,) = submitted
    staged = Path(args[2])
    assert staged != ROOT and (staged / "server" / "app.py").is_file()
    pyproject = tomllib.loads((staged / "pyproject.toml").read_text())
    assert "federations" not in pyproject["tool"]["flwr"]  # flwr run would rewrite it otherwise
    config = _run_config(args)
    assert config["run-dir"] == "/srv/run1" and '"name":"quickstart"' in config["scenario"]


@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        ("none", [], "does not exist"),
        ("empty", [], "no pyproject.toml"),
        ("no-components", [], "declares no [tool.flwr.app.components]"),
        ("user", ["--run-config", "num-rounds=5"], "unknown run-config key 'num-rounds'"),
        ("user", ["--run-config", "oops"], "key=value"),
        ("user", ["SCENARIO"], "does not read a fedge scenario"),
        ("fedge", [], "give a scenario file"),
    ],
)
def test_submit_refuses_what_flwr_run_would_fail_on(
    setup: str, args: list[str], expected: str, tmp_path: Path, submitted: list[list[str]]
) -> None:
    folder = tmp_path / "app"
    if setup == "empty":
        folder.mkdir()
    elif setup == "no-components":
        folder.mkdir()
        (folder / "pyproject.toml").write_text('[tool.flwr.app]\npublisher = "x"\n')
    elif setup == "user":
        _user_app(folder)
    scenario = str(ROOT / "scenarios" / "quickstart.toml")
    cli = ["deploy", "submit"] + (["--app", str(folder)] if setup != "fedge" else [])
    cli += [scenario if a == "SCENARIO" else a for a in args]
    result = runner.invoke(app, cli)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()), result.output
    assert not submitted


# ------------------------------------------------------------------ a real submission of a user app
USER_SERVER = """
import json
from pathlib import Path
import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    result = FedAvg(fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=ArrayRecord([np.zeros(3, dtype=np.float32)]), num_rounds=rounds
    )
    weights = next(iter(result.arrays.values())).numpy().tolist()
    out = Path(context.run_config["out"])  # whole or absent: the test polls for it
    out.with_suffix(".tmp").write_text(json.dumps({"rounds": rounds, "w": weights}))
    out.with_suffix(".tmp").replace(out)
"""

USER_CLIENT = """
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.train()
def train(msg: Message, context: Context) -> Message:
    w = next(iter(msg.content["arrays"].values())).numpy() + 1.0
    content = RecordDict(
        {"arrays": ArrayRecord([w]), "metrics": MetricRecord({"num-examples": 1})}
    )
    return Message(content, reply_to=msg)
"""


def connected_simulation_superlink(group) -> tuple[list[str], dict[str, str]]:
    """A loopback simulation SuperLink (2 simulated SuperNodes, Flower's default) in ``group``,
    saved as the `fedge` connection; returns the `fedge deploy` command and its environment."""
    from fedge.engines import find_executable, free_port, wait_for_port

    port = free_port()
    link = group.start(
        "superlink",
        [
            find_executable("flower-superlink"), "--insecure", "--simulation",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
            "--port", str(port), "--database", ":flwr-in-memory:",
        ],
    )  # fmt: skip
    wait_for_port(port, link, "superlink", group)
    cli = [sys.executable, "-m", "fedge.cli", "deploy"]
    env = {**group.env, "PYTHONPATH": str(ROOT)}
    connect = subprocess.run(
        [*cli, "connect", f"127.0.0.1:{port}"], env=env, capture_output=True, text=True
    )
    assert connect.returncode == 0, connect.stdout + connect.stderr
    return cli, env


@pytest.mark.slow
def test_submit_of_a_failed_fedge_run_exits_1(tmp_path: Path) -> None:
    """Every reply rejected (update-norm bound far below any update): the summary says failed,
    fedge's ServerApp raises so Flower records `finished:failed`, and `submit` exits 1 (before:
    0, since `flwr run --stream` reports nothing of the run's status)."""
    from fedge.engines import ProcessGroup

    scenario = tmp_path / "fails.toml"
    scenario.write_text(
        textwrap.dedent(
            """
            name = "fails"
            num_rounds = 1
            [data]
            dataset = "mnist1d"
            num_clients = 2
            num_samples = 400
            [model]
            name = "mlp"
            hidden = [8]
            [federation]
            fraction_evaluate = 0.0
            [robustness]
            max_update_norm = 1e-12
            """
        )
    )
    run_dir = tmp_path / "run"
    group = ProcessGroup(tmp_path / "logs")
    try:
        cli, env = connected_simulation_superlink(group)
        submit = subprocess.run(
            [*cli, "submit", str(scenario), "--run-dir", str(run_dir)],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        out = submit.stdout + submit.stderr
        assert submit.returncode == 1, out[-3000:]
        assert "ended finished:failed" in out and "run FAILED" in out, out[-3000:]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    finally:
        group.stop_all()


@pytest.mark.slow
def test_submit_runs_a_user_flower_app_on_a_superlink(tmp_path: Path) -> None:
    from fedge.engines import ProcessGroup

    user = _user_app(tmp_path / "userapp", {"num-server-rounds": "1", "out": '""'})
    (user / "userapp").mkdir()
    (user / "userapp" / "__init__.py").write_text("")
    (user / "userapp" / "server_app.py").write_text(USER_SERVER)
    (user / "userapp" / "client_app.py").write_text(USER_CLIENT)
    out = tmp_path / "result.json"
    group = ProcessGroup(tmp_path / "logs")
    try:
        cli, env = connected_simulation_superlink(group)
        submit = subprocess.run(
            [*cli, "submit", "--app", str(user), "--run-config", "num-server-rounds=2",
             "--run-config", f"out='{out}'"],
            env=env, capture_output=True, text=True, timeout=150,
        )  # fmt: skip
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        deadline = time.time() + 30  # the ServerApp writes its file as the stream closes
        while not out.exists() and time.time() < deadline:
            time.sleep(0.5)
        result = json.loads(out.read_text())
        assert result == {"rounds": 2, "w": [2.0, 2.0, 2.0]}  # each round adds 1 on every client
    finally:
        group.stop_all()


# ------------------------------------------------------------------ superlink: never root by accident
@pytest.mark.parametrize(("root", "flags", "starts"), [
    (True, [], False), (True, ["--allow-root"], True), (False, [], True),
])  # fmt: skip
def test_superlink_refuses_root_unless_allowed(
    monkeypatch: pytest.MonkeyPatch, root: bool, flags: list[str], starts: bool
) -> None:
    """Every submitted ServerApp runs as the SuperLink's user, and any local user can submit
    one: as root that hands root to every local user (README "Trust model")."""
    started: list[list[str]] = []
    monkeypatch.setattr(fedge.deploy.os, "geteuid", lambda: 0 if root else 1000)
    monkeypatch.setattr(fedge.deploy, "run_foreground", lambda args: started.append(args) or 0)
    result = runner.invoke(app, ["deploy", "superlink", "--host", "127.0.0.1", *flags])
    assert bool(started) == starts, result.output
    if starts:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2
        assert "refusing to run the SuperLink as root" in " ".join(result.output.split())
        assert "--allow-root" in result.output
