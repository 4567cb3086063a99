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

from fedge.cli_common import SetOpt, console, fail, preflight
from fedge.deploy_cli import deploy_app
from scenarios.config import ScenarioError, load_scenario, parse_override

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    suggest_commands=False,  # click already says "Did you mean"; typer would say it a second time
    help="fedge: federated and edge learning simulator on Flower.",
)


def _run_one(
    path: Path,
    overrides: list[str],
    run_dir: Path | None = None,
    quiet: bool = False,
    resume: bool = False,
    fail_on_failed_run: bool = True,
) -> Path:
    from clients.data import DataError
    from fedge.engines import EngineError, run_engine
    from server.app import check_resume, default_run_dir

    try:
        scenario = load_scenario(path, overrides)
        run_dir = run_dir or default_run_dir(scenario)
        summary = None
        if scenario.engine.name == "inprocess":
            pass  # the ServerApp checks everything in this process before it writes
        elif resume:  # fail (or find the run finished) before Flower processes write logs
            summary = check_resume(scenario, run_dir)
            if summary is not None:
                console.print(f"{run_dir} already finished: nothing to resume, no file changed")
        else:  # fail before Flower processes start
            preflight(scenario)
        if summary is None:
            summary = run_engine(scenario, run_dir, show_progress=not quiet, resume=resume)
    except (
        ScenarioError,
        DataError,
        EngineError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
    ) as err:
        fail(str(err))
    if summary.get("status") == "failed":
        # a run that (mostly) aggregated nothing is not "done": say why, exit non-zero
        console.print(f"[bold red]run failed:[/] {summary.get('failure')} — results: {run_dir}")
        if fail_on_failed_run:
            raise typer.Exit(1)
        return run_dir
    if not quiet:
        console.print(
            f"[green]done[/] final accuracy {100 * summary.get('final_accuracy', float('nan')):.2f}% "
            f"(best {100 * summary.get('best_accuracy', float('nan')):.2f}%) — results: [bold]{run_dir}[/]"
        )
    return run_dir


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
            fail("--resume RUN_DIR takes no scenario, --set or --run-dir: it reuses the run's own")
        if not (resume / "scenario.toml").is_file():
            fail(f"{resume} is not a run folder (no scenario.toml); pass the folder of a run")
        _run_one(resume / "scenario.toml", [], resume, quiet, resume=True)
        return
    if scenario is None:
        fail("give a scenario file (e.g. scenarios/quickstart.toml) or --resume RUN_DIR")
    _run_one(scenario, set_ or [], run_dir, quiet)


@app.command()
def validate(scenario: Annotated[Path, typer.Argument()], set_: SetOpt = None) -> None:
    """Check a scenario (schema, data, model) without training."""
    from clients.data import DataError

    try:
        sc = load_scenario(scenario, set_ or [])
        preflight(sc)
    except (ScenarioError, DataError, ValueError) as err:
        fail(str(err))
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
        fail(str(err))
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
                fail_on_failed_run=False,  # one failed run is a result of the sweep, not its end
            )
        )
    png, md = compare_runs(run_dirs, out)
    console.print(md.read_text())
    console.print(f"[green]sweep done[/]: {md} and {png}")


def _label(override: str) -> str:
    """``algorithm.name=fedprox`` -> ``fedprox``; ``data.alpha=0.1`` -> ``alpha-0.1``."""
    key, value = override.split("=", 1)
    last = key.split(".")[-1]
    label = value if last == "name" else f"{last}-{value}"
    # the label names a folder (and the run): path parts in a value must not become folders
    return label.replace("/", "_").replace("\\", "_").strip(".") or "run"


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
        fail(str(err))
    target = out or (run_dirs[0] if len(run_dirs) == 1 and run_dirs[0].is_dir() else Path("."))
    png, md = compare_runs(runs, target, metric=metric)
    console.print(md.read_text())
    console.print(f"wrote {md} and {png}")


edge_app = typer.Typer(
    help="On-device inference with exported ONNX models.",
    no_args_is_help=True,
    suggest_commands=False,
)
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
    repeats: Annotated[int, typer.Option(min=1, help="timed repetitions (median reported)")] = 5,
) -> None:
    """Classify INPUTS with onnxruntime; print the predictions and the latency."""
    from edge.runner import infer, load_inputs

    try:
        result = infer(model, load_inputs(inputs), repeats=repeats)
    except ValueError as err:
        fail(str(err))
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


app.add_typer(deploy_app, name="deploy")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
