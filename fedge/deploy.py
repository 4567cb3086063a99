"""Deployment on real machines: TLS certificates, SuperNode keys, and the Flower commands per machine.

``fedge deploy`` wraps these (see the README, "Deploy on real machines")::

    fedge deploy certs --out certs --host 10.0.0.5         # test CA + server cert (SANs: 127.0.0.1, localhost, hosts)
    fedge deploy keys --out keys --count 3                 # EC P-384 keys (OpenSSH) for SuperNode auth
    fedge deploy superlink --certs certs --auth            # server machine: flower-superlink with TLS (+ auth)
    fedge deploy connect 127.0.0.1:8000 --root-cert certs/ca.crt  # operator, on the SuperLink machine
    fedge deploy register keys/sn0.pub                     # operator: flwr supernode register
    fedge deploy supernode --superlink 10.0.0.5:8000 --root-cert certs/ca.crt --key keys/sn0 \\
        --partition-id 0 --num-partitions 3 --device-profile jetson   # each edge machine
    fedge deploy submit scenarios/quickstart.toml          # user machine: flwr run with the scenario

The argument lists are built by plain functions so that the loopback test starts exactly what the
README tells a user to start.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import tomli_w

CONNECTION = "fedge"  # name of the SuperLink connection fedge writes into $FLWR_HOME/config.toml
DEFAULT_PORT = (
    8000  # flower-superlink's HTTP(S) port: Fleet, Control and Runtime APIs (flwr >= 1.41)
)
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"


# --------------------------------------------------------------------------------------------
# certificates and keys
# --------------------------------------------------------------------------------------------
def refuse_overwrite(paths: list[Path], what: str, force: bool) -> None:
    """Replacing a CA or a node key silently cuts every machine that trusts the old one: only
    with ``force``."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); replacing {what} would cut off every machine "
            "that uses the current ones. Pick another --out, or pass --force to replace them"
        )


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only *from the first byte*: the file is created
    0600 (``os.open`` with a mode) rather than chmod-ed after the key is already on disk."""
    path = Path(path)
    if path.exists():  # --force: a new inode, so no old, looser mode survives
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_certs(
    out_dir: Path, hosts: list[str] | None = None, days: int = 365, force: bool = False
) -> dict[str, Path]:
    """A self-signed test CA and a server certificate it signs, valid for 127.0.0.1, localhost and
    ``hosts`` (IP addresses or DNS names of the SuperLink machine). For testing: use your
    organisation's CA in production. Existing files are only replaced with ``force``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir = Path(out_dir)
    refuse_overwrite(
        [out_dir / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)], "the CA", force
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in ["127.0.0.1", "localhost", *(hosts or [])]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge superlink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem, key_fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    paths = {name: out_dir / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    paths[CA_CERT].write_bytes(ca_cert.public_bytes(pem))
    paths[SERVER_CERT].write_bytes(server_cert.public_bytes(pem))
    for name, key in ((CA_KEY, ca_key), (SERVER_KEY, server_key)):
        write_private(paths[name], key.private_bytes(pem, key_fmt, serialization.NoEncryption()))
    return paths


def make_keys(
    out_dir: Path, count: int, prefix: str = "sn", force: bool = False
) -> list[tuple[Path, Path]]:
    """``count`` EC (NIST P-384) key pairs in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``
    makes them: ``<prefix><i>`` (private, stays on the SuperNode) and ``<prefix><i>.pub``.
    Existing keys are only replaced with ``force``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out_dir = Path(out_dir)
    names = [f"{prefix}{i}{ext}" for i in range(count) for ext in ("", ".pub")]
    refuse_overwrite([out_dir / n for n in names], "SuperNode keys", force)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = out_dir / f"{prefix}{i}", out_dir / f"{prefix}{i}.pub"
        write_private(
            private,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + f" fedge-{prefix}{i}\n".encode()
        )
        pairs.append((private, public))
    return pairs


# --------------------------------------------------------------------------------------------
# command lines
# --------------------------------------------------------------------------------------------
def superlink_args(
    exe: str,
    certs: Path | None,
    auth: bool = False,
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    database: str = "state.db",
    expose_control_api: bool = False,
) -> list[str]:
    """``flower-superlink`` with TLS from ``certs`` (``--insecure`` when None) and, with ``auth``,
    SuperNode authentication (Flower refuses auth without TLS).

    By default it runs under :mod:`fedge.superlink_guard`: the Control API (key registration,
    run submission) and the Runtime API answer loopback clients only, so holding ``ca.crt`` and
    reaching the port is not enough to register a node. ``expose_control_api=True`` runs the
    plain ``exe`` with every API open to whoever reaches ``host:port``."""
    if auth and certs is None:
        raise ValueError("SuperNode authentication needs TLS: pass the certificates folder")
    launcher = [exe] if expose_control_api else [sys.executable, "-m", "fedge.superlink_guard"]
    args = [*launcher, "--host", host, "--port", str(port), "--database", database]
    args += ["--disable-runtime-dependency-installation"]  # SuperNodes/SuperLink are pre-installed
    if certs is None:
        args.append("--insecure")
    else:
        certs = Path(certs).resolve()
        args += [
            "--ssl-ca-certfile",
            str(certs / CA_CERT),
            "--ssl-certfile",
            str(certs / SERVER_CERT),
            "--ssl-keyfile",
            str(certs / SERVER_KEY),
        ]
    if auth:
        args.append("--enable-supernode-auth")
    return args


def node_config(partition_id: int, num_partitions: int, device_profile: str | None) -> str:
    """The ``--node-config`` string: who this SuperNode is (and, optionally, what device it is)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"--partition-id {partition_id} is out of range for --num-partitions {num_partitions}"
        )
    text = f"partition-id={partition_id} num-partitions={num_partitions}"
    if device_profile:
        if "'" in device_profile or " " in device_profile:
            raise ValueError(
                f"--device-profile {device_profile!r}: use a name without spaces/quotes"
            )
        text += f" device-profile='{device_profile}'"
    return text


def supernode_args(
    exe: str,
    superlink: str,
    partition_id: int,
    num_partitions: int,
    root_cert: Path | None = None,
    key: Path | None = None,
    device_profile: str | None = None,
    port: int = 9094,
) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` (host:port) over TLS (``--insecure`` when
    ``root_cert`` is None), authenticating with private ``key`` when given. ``port`` is the node's
    local ClientApp API: co-located SuperNodes need distinct ones."""
    args = [exe, "--superlink", superlink, "--port", str(port)]
    args += ["--node-config", node_config(partition_id, num_partitions, device_profile)]
    args += (
        ["--insecure"]
        if root_cert is None
        else ["--root-certificates", str(Path(root_cert).resolve())]
    )
    if key is not None:
        if root_cert is None:
            raise ValueError("SuperNode authentication needs TLS: pass --root-cert too")
        args += ["--auth-supernode-private-key", str(Path(key).resolve())]
    return args


def flwr_home(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("FLWR_HOME") or Path.home() / ".flwr")


def write_connection(
    home: Path, address: str, root_cert: Path | None, name: str = CONNECTION, default: bool = True
) -> Path:
    """Add/replace the SuperLink connection ``name`` in ``<home>/config.toml``, keeping the others
    (the flwr CLI reads its connections from there since flwr 1.41)."""
    path = Path(home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    links = data.setdefault("superlink", {})
    conn: dict[str, object] = {"address": address}
    if root_cert is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_cert).resolve())
    links[name] = conn
    if default or "default" not in links:
        links["default"] = name
    path.write_text(tomli_w.dumps(data))
    return path


def register_args(exe: str, public_key: Path, name: str | None = None) -> list[str]:
    """``flwr supernode register <key.pub> fedge``: allow the SuperNode holding the private key."""
    args = [exe, "supernode", "register", str(Path(public_key).resolve()), CONNECTION]
    return [*args, "--name", name] if name else args


def running_as_root() -> bool:
    """Whether this process runs with root's effective user id (False where there is none)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def exec_env() -> dict[str, str]:
    """Flower's processes start ``flower-superexec`` & co. by name: put this interpreter's bin first."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_foreground(args: list[str], on_line: Callable[[str], None] | None = None) -> int:
    """Run a Flower process in the foreground until it exits; return its exit status (128 + N
    when signal N ended it, as a shell reports it). ``on_line`` sees each line of its stdout
    (which is still printed).

    SIGTERM, SIGINT (Ctrl-C) and SIGHUP sent to fedge are passed on to the Flower process, which
    shuts down its own children; fedge waits for it, so a service manager that stops fedge stops
    Flower too. The child runs in its own session so that a Ctrl-C reaches it once (from fedge),
    not twice (from the terminal and from fedge).
    """
    print("$ " + " ".join(args), flush=True)
    piped = subprocess.PIPE if on_line is not None else None
    proc = subprocess.Popen(args, env=exec_env(), start_new_session=True, stdout=piped, text=True)

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        if on_line is not None and proc.stdout is not None:
            for line in proc.stdout:
                print(line, end="", flush=True)
                on_line(line)
        code = proc.wait()  # resumed after each handler (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def submit_args(exe: str, app_dir: Path, run_config: Path | None, stream: bool = True) -> list[str]:
    """``flwr run <app> fedge [--run-config <file>] [--stream]``."""
    args = [exe, "run", str(app_dir), CONNECTION]
    args += ["--run-config", str(run_config)] if run_config is not None else []
    return [*args, "--stream"] if stream else args


STARTED_RUN = re.compile(r"Successfully started run (\d+)")


def run_status(exe: str, run_id: int, timeout_s: float = 60.0) -> tuple[str, str]:
    """``(status, details)`` of run ``run_id`` from ``flwr ls fedge --run-id N --format json``,
    once it is final (``finished:completed``, ``finished:failed``, ``finished:stopped``): the log
    stream may close just before the SuperLink records the ServerApp's end. ``("unknown", why)``
    when it cannot be read within ``timeout_s``."""
    args = [exe, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]
    deadline = time.monotonic() + timeout_s
    status, details = "unknown", "flwr ls gave no answer"
    while True:
        done = subprocess.run(args, env=exec_env(), capture_output=True, text=True, check=False)
        try:
            run = json.loads(done.stdout)["runs"][0]
            status, details = str(run["status"]), str(run.get("status-details", ""))
        except (ValueError, KeyError, IndexError, TypeError):
            details = (done.stdout + done.stderr).strip()[-300:] or details
        if status.startswith("finished") or time.monotonic() >= deadline:
            return status, details
        time.sleep(1.0)


def submit_and_wait(exe: str, app_dir: Path, run_config: Path | None) -> int:
    """``flwr run --stream`` (streaming the server's log), then the exit status of the *run*:
    ``flwr run`` exits 0 whenever it could submit, even when the ServerApp failed (fedge's raises
    when the run's summary says failed), so the run's final status decides: 0 for
    ``finished:completed``, 1 otherwise (failed, stopped, or never known)."""
    started: list[int] = []

    def watch(line: str) -> None:
        if match := STARTED_RUN.search(line):
            started.append(int(match.group(1)))

    code = run_foreground(submit_args(exe, app_dir, run_config), on_line=watch)
    if code != 0 or not started:
        return code or 1
    status, details = run_status(exe, started[-1])
    if status == "finished:completed":
        return 0
    print(f"fedge: run {started[-1]} ended {status}: {details}", file=sys.stderr, flush=True)
    return 1
