"""``fedge``: run, sweep and compare scenarios.

fedge run scenarios/quickstart.toml --set num_rounds=5 --set data.alpha=0.1
fedge sweep scenarios/quickstart.toml --grid algorithm.name=fedavg,fedprox --seeds 0,1,2
fedge report results/sweep-quickstart-20261123-101500
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from scenarios.config import ScenarioError, load_scenario, parse_override

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="fedge: federated and edge learning simulator on Flower.",
)
console = Console()

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override: key=value (dotted keys for tables)"),
]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _run_one(
    path: Path,
    overrides: list[str],
    run_dir: Path | None = None,
    quiet: bool = False,
    resume: bool = False,
) -> Path:
    from clients.data import DataError
    from fedge.engines import EngineError, run_engine
    from server.app import default_run_dir

    try:
        scenario = load_scenario(path, overrides)
        run_dir = run_dir or default_run_dir(scenario)
        if scenario.engine.name != "inprocess":  # fail before Flower processes start
            _preflight(scenario)
        summary = run_engine(scenario, run_dir, show_progress=not quiet, resume=resume)
    except (ScenarioError, DataError, EngineError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if not quiet:
        console.print(
            f"[green]done[/] final accuracy {100 * summary.get('final_accuracy', float('nan')):.2f}% "
            f"(best {100 * summary.get('best_accuracy', float('nan')):.2f}%) — results: [bold]{run_dir}[/]"
        )
    return run_dir


def _preflight(scenario) -> None:
    """Build the run's objects once to fail on bad input before any run folder or process exists.
    The in-process engine skips this: it builds them once, inside the ServerApp, before writing."""
    from server.setup import build_run

    build_run(scenario)


@app.command()
def run(
    scenario: Annotated[Path | None, typer.Argument(help="scenario TOML file")] = None,
    set_: SetOpt = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="results folder (default: <output_dir>/<name>-s<seed>-<time>)"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="continue this run folder from its last checkpoint (uses its scenario.toml)"
        ),
    ] = None,
) -> None:
    """Run one scenario on the engine it names (engine.name), or --resume an interrupted run."""
    if resume is not None:
        if scenario is not None or set_ or run_dir is not None:
            _fail("--resume RUN_DIR takes no scenario, --set or --run-dir: it reuses the run's own")
        if not (resume / "scenario.toml").is_file():
            _fail(f"{resume} is not a run folder (no scenario.toml); pass the folder of a run")
        _run_one(resume / "scenario.toml", [], resume, quiet, resume=True)
        return
    if scenario is None:
        _fail("give a scenario file (e.g. scenarios/quickstart.toml) or --resume RUN_DIR")
    _run_one(scenario, set_ or [], run_dir, quiet)


@app.command()
def validate(scenario: Annotated[Path, typer.Argument()], set_: SetOpt = None) -> None:
    """Check a scenario (schema, data, model) without training."""
    from clients.data import DataError

    try:
        sc = load_scenario(scenario, set_ or [])
        _preflight(sc)
    except (ScenarioError, DataError, ValueError) as err:
        _fail(str(err))
    console.print(
        f"[green]ok[/] {scenario}: {sc.algorithm.name} on {sc.data.dataset} ({sc.data.num_clients} clients, {sc.engine.name} engine)"
    )


@app.command()
def sweep(
    scenario: Annotated[Path, typer.Argument()],
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", "-g", help="key=v1,v2,... (cartesian product over all --grid)"),
    ] = None,
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0",
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="sweep folder (default: <output_dir>/sweep-<name>-<time>)")
    ] = None,
) -> None:
    """Run the scenario over a grid of overrides × seeds, then write a comparison report."""
    from fedge.report import compare_runs

    try:
        base = load_scenario(scenario, set_ or [])
        axes = []
        for item in grid or []:
            path, value = parse_override(item)
            values = value if isinstance(value, list) else str(value).split(",")
            axes.append([f"{'.'.join(path)}={v}" for v in values])
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except (ScenarioError, ValueError) as err:
        _fail(str(err))
    out = out or base.resolved_output_dir() / f"sweep-{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    combos = list(itertools.product(*axes)) or [()]
    total = len(combos) * len(seed_list)
    run_dirs = []
    for i, (combo, seed) in enumerate(itertools.product(combos, seed_list), 1):
        label = "_".join(_label(c) for c in combo) or base.name
        console.print(f"[bold]sweep {i}/{total}[/] {label} seed={seed}")
        run_dirs.append(
            _run_one(
                scenario,
                [*(set_ or []), *combo, f"seed={seed}", f"name={label}"],
                out / f"{label}-s{seed}",
                quiet=False,
            )
        )
    png, md = compare_runs(run_dirs, out)
    console.print(md.read_text())
    console.print(f"[green]sweep done[/]: {md} and {png}")


def _label(override: str) -> str:
    """``algorithm.name=fedprox`` -> ``fedprox``; ``data.alpha=0.1`` -> ``alpha-0.1``."""
    key, value = override.split("=", 1)
    last = key.split(".")[-1]
    return value if last == "name" else f"{last}-{value}"


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders, or folders containing runs")],
    out: Annotated[
        Path | None, typer.Option(help="where to write comparison.md/.png (default: first folder)")
    ] = None,
    metric: str = "central_accuracy",
) -> None:
    """Compare runs: one plot and a markdown table (mean ± std over seeds)."""
    from fedge.report import compare_runs, expand_run_dirs

    try:
        runs = expand_run_dirs(run_dirs)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    target = out or (run_dirs[0] if len(run_dirs) == 1 and run_dirs[0].is_dir() else Path("."))
    png, md = compare_runs(runs, target, metric=metric)
    console.print(md.read_text())
    console.print(f"wrote {md} and {png}")


edge_app = typer.Typer(help="On-device inference with exported ONNX models.", no_args_is_help=True)
app.add_typer(edge_app, name="edge")


@edge_app.command("infer")
def edge_infer(
    model: Annotated[Path, typer.Argument(help="an exported .onnx model (e.g. <run>/model.onnx)")],
    inputs: Annotated[
        Path,
        typer.Argument(
            help=".npy array of raw inputs, batch first (how to build them: the model's "
            "sidecar JSON, input.how_to_build)"
        ),
    ],
    repeats: Annotated[int, typer.Option(help="timed repetitions (median reported)")] = 5,
) -> None:
    """Classify INPUTS with onnxruntime; print the predictions and the latency."""
    from edge.runner import infer, load_inputs

    try:
        result = infer(model, load_inputs(inputs), repeats=repeats)
    except ValueError as err:
        _fail(str(err))
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print("predictions: " + " ".join(str(int(p)) for p in result.predictions))
    if result.class_names is not None:
        console.print(
            "classes: " + " ".join(result.class_names[int(p)] for p in result.predictions)
        )
    console.print(
        f"latency: {result.batch_latency_ms:.3f} ms for {len(result.predictions)} inputs "
        f"({result.per_sample_ms:.4f} ms/input, median of {repeats})"
    )


# --------------------------------------------------------------------------------------------
# fedge deploy: real machines (see README "Deploy on real machines")
# --------------------------------------------------------------------------------------------
deploy_app = typer.Typer(
    no_args_is_help=True,
    help="Run on real machines: TLS certs, SuperNode keys, SuperLink/SuperNodes, submit a scenario.",
)
app.add_typer(deploy_app, name="deploy")


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
) -> None:
    """Make a test CA and a SuperLink server certificate (SANs: 127.0.0.1, localhost, --host)."""
    from fedge.deploy import make_certs

    paths = make_certs(out, host or [], days)
    console.print(
        f"[green]wrote[/] {', '.join(str(p) for p in paths.values())}\n"
        f"SuperLink needs ca.crt, server.pem, server.key; every SuperNode and user needs ca.crt only."
    )


@deploy_app.command("keys")
def deploy_keys(
    out: Annotated[Path, typer.Option(help="folder for sn<i> / sn<i>.pub")] = Path("keys"),
    count: Annotated[int, typer.Option(min=1, help="how many SuperNodes")] = 1,
) -> None:
    """Make EC P-384 key pairs (OpenSSH format) for SuperNode authentication."""
    from fedge.deploy import make_keys

    for private, public in make_keys(out, count):
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
) -> None:
    """Start the SuperLink in the foreground (server machine)."""
    from fedge.deploy import run_foreground, superlink_args
    from fedge.engines import _exe

    if certs is not None and not (certs / "server.pem").is_file():
        _fail(f"{certs}/server.pem not found; make it with `fedge deploy certs --out {certs}`")
    try:
        args = superlink_args(_exe("flower-superlink"), certs, auth, host, port, database)
    except ValueError as err:
        _fail(str(err))
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
    from fedge.engines import _exe

    for path in (root_cert, key):
        if path is not None and not path.is_file():
            _fail(f"{path} not found")
    try:
        args = supernode_args(
            _exe("flower-supernode"),
            superlink,
            partition_id,
            num_partitions,
            root_cert,
            key,
            device_profile,
            port,
        )
    except ValueError as err:
        _fail(str(err))
    raise typer.Exit(run_foreground(args))


@deploy_app.command("connect")
def deploy_connect(
    superlink: Annotated[str, typer.Argument(help="SuperLink address host:port")],
    root_cert: Annotated[Path | None, typer.Option(help="ca.crt (omit: insecure HTTP)")] = None,
) -> None:
    """Save the SuperLink as the `fedge` connection in $FLWR_HOME/config.toml (user machine)."""
    from fedge.deploy import flwr_home, write_connection

    if root_cert is not None and not root_cert.is_file():
        _fail(f"{root_cert} not found")
    path = write_connection(flwr_home(), superlink, root_cert)
    console.print(f"[green]saved[/] connection 'fedge' -> {superlink} in {path}")


@deploy_app.command("register")
def deploy_register(
    public_key: Annotated[Path, typer.Argument(help="sn<i>.pub from `fedge deploy keys`")],
    name: Annotated[str | None, typer.Option(help="a name for the SuperNode")] = None,
) -> None:
    """Register a SuperNode's public key with the SuperLink (`flwr supernode register`)."""
    from fedge.deploy import register_args, run_foreground
    from fedge.engines import _exe

    if not public_key.is_file():
        _fail(f"{public_key} not found")
    raise typer.Exit(run_foreground(register_args(_exe("flwr"), public_key, name)))


@deploy_app.command("submit")
def deploy_submit(
    scenario: Annotated[Path, typer.Argument(help="scenario TOML file")],
    set_: SetOpt = None,
    run_dir: Annotated[
        str | None,
        typer.Option(help="absolute results folder *on the SuperLink machine* (default: auto)"),
    ] = None,
) -> None:
    """Submit a scenario to the `fedge` connection with `flwr run --stream` (user machine)."""
    import tempfile

    import tomli_w

    from clients.data import DataError
    from fedge.deploy import run_foreground, submit_args
    from fedge.engines import APP_DIR, _exe

    try:
        sc = load_scenario(scenario, set_ or [])
        _preflight(sc)
    except (ScenarioError, DataError, ValueError) as err:
        _fail(str(err))
    config = Path(tempfile.mkdtemp(prefix="fedge-submit-")) / "run_config.toml"
    config.write_text(tomli_w.dumps({**sc.to_run_config(), "run-dir": run_dir or ""}))
    raise typer.Exit(run_foreground(submit_args(_exe("flwr"), APP_DIR, config)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
