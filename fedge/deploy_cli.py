"""``fedge deploy``: TLS certificates, SuperNode keys, SuperLink/SuperNodes, and submitting a run
to real machines (see README "Deploy on real machines"; the mechanics are in ``fedge/deploy.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.cli_common import SetOpt, console, fail
from scenarios.config import ScenarioError, load_scenario, parse_override

deploy_app = typer.Typer(
    no_args_is_help=True,
    suggest_commands=False,
    help="Run on real machines: TLS certs, SuperNode keys, SuperLink/SuperNodes, submit a scenario.",
)


@deploy_app.command("certs")
def deploy_certs(
    out: Annotated[
        Path, typer.Option(help="folder for ca.crt, ca.key, server.pem, server.key")
    ] = Path("certs"),
    host: Annotated[
        list[str] | None,
        typer.Option(help="SuperLink IP or DNS name the SuperNodes dial (repeatable)"),
    ] = None,
    days: int = 365,
    force: Annotated[
        bool, typer.Option(help="replace an existing CA (every node must get the new ca.crt)")
    ] = False,
) -> None:
    """Make a test CA and a SuperLink server certificate (SANs: 127.0.0.1, localhost, --host)."""
    from fedge.deploy import make_certs

    try:
        paths = make_certs(out, host or [], days, force=force)
    except FileExistsError as err:
        fail(str(err))
    console.print(
        f"[green]wrote[/] {', '.join(str(p) for p in paths.values())}\n"
        f"SuperLink needs ca.crt, server.pem, server.key; every SuperNode and user needs ca.crt only."
    )


@deploy_app.command("keys")
def deploy_keys(
    out: Annotated[Path, typer.Option(help="folder for sn<i> / sn<i>.pub")] = Path("keys"),
    count: Annotated[int, typer.Option(min=1, help="how many SuperNodes")] = 1,
    force: Annotated[
        bool, typer.Option(help="replace existing keys (those nodes must be registered again)")
    ] = False,
) -> None:
    """Make EC P-384 key pairs (OpenSSH format) for SuperNode authentication."""
    from fedge.deploy import make_keys

    try:
        pairs = make_keys(out, count, force=force)
    except FileExistsError as err:
        fail(str(err))
    for private, public in pairs:
        console.print(
            f"[green]wrote[/] {private} (copy to its SuperNode) and {public} (register it)"
        )


@deploy_app.command("superlink")
def deploy_superlink(
    certs: Annotated[
        Path | None, typer.Option(help="folder from `fedge deploy certs` (omit: insecure HTTP)")
    ] = None,
    auth: Annotated[bool, typer.Option(help="only registered SuperNodes may connect")] = False,
    host: str = "0.0.0.0",
    port: Annotated[
        int, typer.Option(help="the one port to open: Fleet+Control+Runtime API")
    ] = 8000,
    database: Annotated[str, typer.Option(help="SuperLink state (sqlite file)")] = "state.db",
    expose_control_api: Annotated[
        bool,
        typer.Option(
            help="let any machine that reaches the port use the Control API (register keys, "
            "submit runs); default: only this machine (loopback) may"
        ),
    ] = False,
) -> None:
    """Start the SuperLink in the foreground (server machine). SuperNodes reach its Fleet API
    from anywhere; key registration and run submission only from this machine unless
    --expose-control-api."""
    from fedge.deploy import run_foreground, superlink_args
    from fedge.engines import find_executable

    if certs is not None and not (certs / "server.pem").is_file():
        fail(f"{certs}/server.pem not found; make it with `fedge deploy certs --out {certs}`")
    if expose_control_api:
        console.print(
            "[yellow]warning:[/] --expose-control-api: anyone who reaches this port can register "
            "SuperNode keys and submit runs (Flower's Control API has no credentials here)"
        )
    try:
        args = superlink_args(
            find_executable("flower-superlink"),
            certs,
            auth,
            host,
            port,
            database,
            expose_control_api,
        )
    except ValueError as err:
        fail(str(err))
    raise typer.Exit(run_foreground(args))


@deploy_app.command("supernode")
def deploy_supernode(
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port")],
    partition_id: Annotated[int, typer.Option(help="this node's data partition")],
    num_partitions: Annotated[int, typer.Option(help="data.num_clients of the scenario")],
    root_cert: Annotated[Path | None, typer.Option(help="ca.crt (omit: insecure HTTP)")] = None,
    key: Annotated[Path | None, typer.Option(help="private key for SuperNode auth")] = None,
    device_profile: Annotated[str | None, typer.Option(help="device profile name")] = None,
    port: Annotated[int, typer.Option(help="local ClientApp API port (distinct per node)")] = 9094,
) -> None:
    """Start one SuperNode in the foreground (edge machine)."""
    from fedge.deploy import run_foreground, supernode_args
    from fedge.engines import find_executable

    for path in (root_cert, key):
        if path is not None and not path.is_file():
            fail(f"{path} not found")
    try:
        args = supernode_args(
            find_executable("flower-supernode"),
            superlink,
            partition_id,
            num_partitions,
            root_cert,
            key,
            device_profile,
            port,
        )
    except ValueError as err:
        fail(str(err))
    raise typer.Exit(run_foreground(args))


@deploy_app.command("connect")
def deploy_connect(
    superlink: Annotated[str, typer.Argument(help="SuperLink address host:port")],
    root_cert: Annotated[Path | None, typer.Option(help="ca.crt (omit: insecure HTTP)")] = None,
) -> None:
    """Save the SuperLink as the `fedge` connection in $FLWR_HOME/config.toml (user machine)."""
    from fedge.deploy import flwr_home, write_connection

    if root_cert is not None and not root_cert.is_file():
        fail(f"{root_cert} not found")
    path = write_connection(flwr_home(), superlink, root_cert)
    console.print(f"[green]saved[/] connection 'fedge' -> {superlink} in {path}")


@deploy_app.command("register")
def deploy_register(
    public_key: Annotated[Path, typer.Argument(help="sn<i>.pub from `fedge deploy keys`")],
    name: Annotated[str | None, typer.Option(help="a name for the SuperNode")] = None,
) -> None:
    """Register a SuperNode's public key with the SuperLink (`flwr supernode register`)."""
    from fedge.deploy import register_args, run_foreground
    from fedge.engines import find_executable

    if not public_key.is_file():
        fail(f"{public_key} not found")
    raise typer.Exit(run_foreground(register_args(find_executable("flwr"), public_key, name)))


@deploy_app.command("submit")
def deploy_submit(
    scenario: Annotated[
        Path | None, typer.Argument(help="scenario TOML file (fedge's app, or an app reading one)")
    ] = None,
    set_: SetOpt = None,
    run_dir: Annotated[
        str | None,
        typer.Option(help="absolute results folder *on the SuperLink machine* (default: auto)"),
    ] = None,
    app_dir: Annotated[
        Path | None,
        typer.Option(
            "--app",
            help="a Flower app folder (pyproject.toml with [tool.flwr.app]) to submit instead "
            "of fedge's own",
        ),
    ] = None,
    run_config: Annotated[
        list[str] | None,
        typer.Option(
            "--run-config", help="key=value for the app's [tool.flwr.app.config] (repeatable)"
        ),
    ] = None,
) -> None:
    """Submit a scenario (fedge's app) or any Flower app to the `fedge` connection with
    `flwr run --stream` (user machine)."""
    import tempfile

    import tomli_w

    from clients.data import DataError
    from fedge import deploy
    from fedge.apps import APP_DIR, app_config_keys, stage_app
    from fedge.engines import find_executable
    from scenarios.config import RUN_CONFIG_KEY

    staging = Path(tempfile.mkdtemp(prefix="fedge-submit-"))
    values: dict = {}
    try:
        if app_dir is None:  # fedge's own app: the scenario is its whole configuration
            if scenario is None:
                fail("give a scenario file to run fedge's app, or --app DIR for your Flower app")
            if run_config:
                fail("fedge's app reads everything from the scenario: use --set, not --run-config")
            submit_dir = stage_app(staging / "app", APP_DIR)  # never rewrite the repository
            declared = {RUN_CONFIG_KEY, "run-dir"}
        else:
            submit_dir = app_dir.resolve()
            declared = app_config_keys(submit_dir)
            if scenario is not None and RUN_CONFIG_KEY not in declared:
                fail(
                    f"{app_dir} does not read a fedge scenario (no {RUN_CONFIG_KEY!r} key in its "
                    "[tool.flwr.app.config]); drop the scenario and pass --run-config key=value"
                )
        if scenario is not None:
            sc = load_scenario(scenario, set_ or [])
            from fedge.api import check_scenario

            check_scenario(sc)
            values.update(sc.to_run_config())
            if "run-dir" in declared:
                values["run-dir"] = run_dir or ""
        for item in run_config or []:
            path, value = parse_override(item)
            key = ".".join(path)
            if key not in declared:
                fail(
                    f"unknown run-config key {key!r} for {submit_dir}; it declares: "
                    f"{', '.join(sorted(declared)) or 'none'}"
                )
            node = values
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    except (ScenarioError, DataError, ValueError) as err:
        fail(str(err))
    config = None
    if values:
        config = staging / "run_config.toml"
        config.write_text(tomli_w.dumps(values))
    raise typer.Exit(
        deploy.run_foreground(deploy.submit_args(find_executable("flwr"), submit_dir, config))
    )
