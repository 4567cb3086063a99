"""Deployment: TLS certificates, SuperNode auth keys, and a loopback SuperLink + SuperNodes run
started exactly as the README's "Deploy on real machines" tells a user to."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

from fedge.deploy import (
    make_certs,
    make_keys,
    node_config,
    register_args,
    superlink_args,
    supernode_args,
    write_connection,
)
from fedge.engines import find_executable, flower_processes, free_port, wait_for_port
from fedge.engines.submit import submit_app
from scenarios.results import load_run
from tests.test_engines import tiny


def test_certs_have_the_sans_and_chain_to_the_ca(tmp_path: Path) -> None:
    paths = make_certs(tmp_path, hosts=["10.0.0.5", "link.example"])
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "link.example"}
    assert paths["server.key"].stat().st_mode & 0o077 == 0  # private keys are not world-readable


def test_keys_are_openssh_ec_p384(tmp_path: Path) -> None:
    (private, public), *_ = make_keys(tmp_path, 2)
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_command_lines_refuse_auth_without_tls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        superlink_args("flower-superlink", None, auth=True)
    with pytest.raises(ValueError, match="needs TLS"):
        supernode_args("flower-supernode", "h:1", 0, 2, root_cert=None, key=tmp_path / "k")
    with pytest.raises(ValueError, match="out of range"):
        node_config(3, 3, None)
    assert node_config(1, 3, "jetson") == "partition-id=1 num-partitions=3 device-profile='jetson'"


def start_auth_superlink(group, certs_dir: Path, host: str, port: int) -> None:
    """A SuperLink with TLS (``certs_dir``) and SuperNode authentication, ready on ``port``."""
    link = group.start(
        "superlink",
        superlink_args(
            find_executable("flower-superlink"),
            certs_dir,
            auth=True,
            host=host,
            port=port,
            database=FLWR_IN_MEMORY_DB_NAME,
        ),
    )
    wait_for_port(port, link, "superlink", group)


@pytest.mark.slow
def test_tls_and_supernode_auth_loopback_deployment(tmp_path: Path, tiny_scenario) -> None:
    certs = make_certs(tmp_path / "certs")
    keys = make_keys(tmp_path / "keys", 4)  # sn0..sn2 registered; sn3 is an intruder
    scenario = tiny("deployment", tiny_scenario, federation={"round_timeout_s": 120.0})
    run_dir = tmp_path / "run"
    port = free_port()
    address = f"127.0.0.1:{port}"
    with flower_processes(tmp_path / "logs") as group:
        start_auth_superlink(group, tmp_path / "certs", "127.0.0.1", port)
        write_connection(group.flwr_home, address, certs["ca.crt"])
        registrations = [  # the three `flwr supernode register` calls run side by side
            subprocess.Popen(
                register_args(find_executable("flwr"), keys[i][1], name=f"edge-{i}"),
                env=group.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(3)
        ]
        for reg in registrations:
            out, _ = reg.communicate(timeout=60)
            assert reg.returncode == 0 and "registered successfully" in out, out
        [
            group.start(
                f"supernode-{i}",
                supernode_args(
                    find_executable("flower-supernode"),
                    address,
                    i,
                    3,
                    root_cert=certs["ca.crt"],
                    key=keys[i][0],
                    device_profile="edge-cpu",
                    port=free_port(),
                ),
            )
            for i in range(3)
        ]
        group.start(
            "intruder",
            supernode_args(
                find_executable("flower-supernode"),
                address,
                0,
                3,
                root_cert=certs["ca.crt"],
                key=keys[3][0],
                port=free_port(),
            ),
        )
        summary = submit_app(scenario, run_dir, group, address, None, root_cert=certs["ca.crt"])
        deadline = time.time() + 60  # refused at activation, before any work (exit code 305)
        while "Failed to activate SuperNode" not in group.log_tail("intruder", 200):
            assert time.time() < deadline, group.log_tail("intruder")
            time.sleep(0.5)
        intruder_log = group.log_tail("intruder", 200)
        superlink_log = group.log_tail("superlink", 500)
        procs = [proc for _, proc in group.procs]
    # Every process the test started was stopped by its PID (flower_processes -> stop_all).
    assert all(proc.poll() is not None for proc in procs)

    rounds = load_run(run_dir).rounds
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["num_sampled"] == 3 and r["num_replies"] == 3 for r in rounds[1:])
    assert summary["final_accuracy"] == rounds[-1]["central_accuracy"]
    # The unregistered SuperNode was refused and never received a message.
    assert "Exit Code: 305" in intruder_log and "Receiving:" not in intruder_log
    assert "No SuperNode found with the given public key" in superlink_log


@pytest.mark.parametrize("kind", ["certs", "keys"])
def test_certs_and_keys_are_not_replaced_without_force(tmp_path: Path, kind: str) -> None:
    from typer.testing import CliRunner

    from fedge.cli import app

    runner = CliRunner()
    first = runner.invoke(app, ["deploy", kind, "--out", str(tmp_path)])
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = runner.invoke(app, ["deploy", kind, "--out", str(tmp_path)])
    assert again.exit_code == 2
    said = " ".join(again.output.split())  # rich wraps long lines
    assert "--force" in said and "already exist" in said
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched
    forced = runner.invoke(app, ["deploy", kind, "--out", str(tmp_path), "--force"])
    assert forced.exit_code == 0, forced.output
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)


def test_private_keys_are_created_0600_not_chmod_ed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chmod disabled, a key written with the usual umask then chmod-ed would stay 0644:
    the mode must come from the creating open() call itself."""
    import os

    monkeypatch.setattr(Path, "chmod", lambda *a, **k: None)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    old = os.umask(0o022)
    try:
        certs = make_certs(tmp_path / "certs")
        (private, public), *_ = make_keys(tmp_path / "keys", 1)
        make_keys(tmp_path / "keys", 1, force=True)  # a replaced key is created 0600 too
    finally:
        os.umask(old)
    for path in (certs["ca.key"], certs["server.key"], private):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert public.stat().st_mode & 0o777 == 0o644  # public halves stay readable


@contextmanager
def outsider_namespace() -> Iterator[tuple[list[str], str] | None]:
    """A network namespace made by this test, joined to this machine by a veth pair: a process
    started with the yielded command prefix is a peer that is *not* on loopback, and it dials the
    yielded host address. No packet leaves the machine. Yields None where namespaces cannot be
    made (not root, no iproute2)."""
    import shutil

    tag = f"fx{os.getpid() % 100000}"
    host_if, ns_if = f"{tag}h", f"{tag}n"
    host_ip, ns_ip = "10.213.77.1", "10.213.77.2"
    steps = [
        ["ip", "netns", "add", tag],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["ip", "link", "set", ns_if, "netns", tag],
        ["ip", "addr", "add", f"{host_ip}/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "netns", "exec", tag, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if],
        ["ip", "netns", "exec", tag, "ip", "link", "set", ns_if, "up"],
        ["ip", "netns", "exec", tag, "ip", "link", "set", "lo", "up"],
    ]
    made = False
    try:
        if shutil.which("ip") is None or os.geteuid() != 0:
            yield None
            return
        for step in steps:
            if subprocess.run(step, capture_output=True, timeout=10).returncode != 0:
                break
            made = True
        else:
            yield ["ip", "netns", "exec", tag], host_ip
            return
        yield None
    finally:
        if made:
            subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", tag], capture_output=True, timeout=10)


def test_guard_lets_remote_peers_reach_the_fleet_api_only() -> None:
    from fedge.superlink_guard import is_loopback, is_public_path

    assert is_public_path("/v1/fleet/pull-messages") and is_public_path("/health")
    assert not is_public_path("/v1/control/register-supernode")
    assert not is_public_path("/v1/runtime/pull-messages") and not is_public_path("/v1/fleetx")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("192.0.2.2") and not is_loopback(None) and not is_loopback("host")
    assert superlink_args("flower-superlink", None)[1:3] == ["-m", "fedge.superlink_guard"]
    assert superlink_args("flower-superlink", None, expose_control_api=True)[0] == (
        "flower-superlink"
    )


@pytest.mark.slow
def test_ca_cert_alone_cannot_register_a_key_or_join(tmp_path: Path) -> None:
    """An outsider with only ca.crt who reaches the SuperLink over the network cannot register a
    key of its own, so its SuperNode is refused; the operator on the SuperLink host registers a
    key and that SuperNode joins. The outsider runs in a network namespace of its own, so its
    requests reach the SuperLink from a non-loopback address, as from another machine."""
    with outsider_namespace() as outside:
        if outside is None:
            pytest.skip("cannot make a network namespace to play the outsider from (needs root)")
        _outsider_is_refused(tmp_path, *outside)


def _outsider_is_refused(tmp_path: Path, netns: list[str], address: str) -> None:
    import json
    import shutil

    certs = make_certs(tmp_path / "certs", hosts=[address])
    (op_private, op_public), (in_private, in_public) = make_keys(tmp_path / "keys", 2)
    port = free_port()
    outsider_home = tmp_path / "outsider-flwr-home"
    outsider_home.mkdir()
    outsider_ca = Path(shutil.copy(certs["ca.crt"], outsider_home / "ca.crt"))
    write_connection(outsider_home, f"{address}:{port}", outsider_ca)
    with flower_processes(tmp_path / "logs") as group:
        start_auth_superlink(group, tmp_path / "certs", "0.0.0.0", port)
        outsider_env = {**group.env, "FLWR_HOME": str(outsider_home)}
        outsider = subprocess.run(
            [*netns, *register_args(find_executable("flwr"), in_public, name="intruder")],
            env=outsider_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        said = outsider.stdout + outsider.stderr
        assert outsider.returncode != 0 and "registered successfully" not in said, said
        assert "403" in said or "loopback" in said, said

        write_connection(group.flwr_home, f"127.0.0.1:{port}", certs["ca.crt"])
        operator = subprocess.run(
            register_args(find_executable("flwr"), op_public, name="edge-0"),
            env=group.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert operator.returncode == 0, operator.stdout + operator.stderr
        assert "registered successfully" in operator.stdout
        for name, key, prefix, dial in (
            ("intruder", in_private, netns, address),
            ("edge-0", op_private, [], "127.0.0.1"),
        ):
            group.start(
                name,
                prefix
                + supernode_args(
                    find_executable("flower-supernode"),
                    f"{dial}:{port}",
                    0,
                    2,
                    root_cert=certs["ca.crt"],
                    key=key,
                    port=free_port(),
                ),
            )
        deadline = time.time() + 60
        while "Failed to activate SuperNode" not in group.log_tail("intruder", 200):
            assert time.time() < deadline, group.log_tail("intruder")
            time.sleep(0.5)
        online: list = []
        while not online:  # the operator sees its node online
            assert time.time() < deadline, group.log_tail("edge-0")
            listing = subprocess.run(
                [find_executable("flwr"), "supernode", "ls", "fedge", "--format", "json"],
                env=group.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            nodes = json.loads(listing.stdout).get("nodes", []) if listing.stdout else []
            online = [n for n in nodes if str(n.get("status", "")).lower() == "online"]
            time.sleep(0.5)
        assert len(nodes) == 1  # only the operator's key was ever registered
        # the outsider cannot even list nodes
        peek = subprocess.run(
            [*netns, find_executable("flwr"), "supernode", "ls", "fedge"],
            env=outsider_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert peek.returncode != 0
        intruder_log = group.log_tail("intruder", 200)
    assert "Receiving:" not in intruder_log
