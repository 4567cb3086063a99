"""``fedge``: run, sweep and compare scenarios.

fedge run scenarios/quickstart.toml --set num_rounds=5 --set data.alpha=0.1
fedge sweep scenarios/quickstart.toml --grid algorithm.name=fedavg,fedprox --seeds 0,1,2
fedge report results/sweep-quickstart-20261123-101500
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.cli_common import SetOpt, console, fail
from fedge.deploy_cli import deploy_app
from scenarios.config import ScenarioError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    suggest_commands=False,  # click already says "Did you mean"; typer would say it a second time
    help="fedge: federated and edge learning simulator on Flower.",
)


def _user_errors() -> tuple[type[Exception], ...]:
    """What a scenario or a run raises that is the user's to fix: exit 2 with the message."""
    from clients.datasets import DataError
    from fedge.engines.errors import EngineError

    return (ScenarioError, DataError, EngineError, ValueError, FileNotFoundError, FileExistsError)


def _report_done(result) -> None:
    console.print(
        f"[green]done[/] final accuracy {100 * result.summary.get('final_accuracy', float('nan')):.2f}% "
        f"(best {100 * result.summary.get('best_accuracy', float('nan')):.2f}%) — results: "
        f"[bold]{result.run_dir}[/]"
    )


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
    from fedge import api

    if resume is not None and (scenario is not None or set_ or run_dir is not None):
        fail("--resume RUN_DIR takes no scenario, --set or --run-dir: it reuses the run's own")
    if resume is None and scenario is None:
        fail("give a scenario file (e.g. scenarios/quickstart.toml) or --resume RUN_DIR")
    try:
        if resume is not None:
            result = api.resume(resume, progress=not quiet)
        else:
            result = api.run(scenario, set_ or [], run_dir, progress=not quiet)
    except api.RunFailed as failed:
        # a run that (mostly) aggregated nothing is not "done": say why, exit non-zero
        console.print(
            f"[bold red]run failed:[/] {failed.run.summary.get('failure')} — results: "
            f"{failed.run.run_dir}"
        )
        raise typer.Exit(1) from None
    except _user_errors() as err:
        fail(str(err))
    if not quiet:
        _report_done(result)


@app.command()
def validate(scenario: Annotated[Path, typer.Argument()], set_: SetOpt = None) -> None:
    """Check a scenario (schema, data, model) without training."""
    from fedge import api

    try:
        sc = api.validate(scenario, set_ or [])
    except _user_errors() as err:
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
    from fedge import api

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        result = api.sweep(scenario, grid or [], seed_list, set_ or [], out)
    except _user_errors() as err:
        fail(str(err))
    for failed in (r for r in result.runs if r.failed):
        console.print(
            f"[bold red]run failed:[/] {failed.summary.get('failure')} — results: {failed.run_dir}"
        )
    console.print(result.report.read_text())
    console.print(f"[green]sweep done[/]: {result.report} and {result.plot}")


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
