"""What every ``fedge`` command shares: the console, failing with exit code 2, ``--set``, and the
check that builds a run before any folder or process exists."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

console = Console()

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override: key=value (dotted keys for tables)"),
]


def fail(message: str) -> None:
    # escaped: messages quote TOML tables ("[tool.flwr.app]") that rich would take for markup
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


def preflight(scenario) -> None:
    """Build the run's objects once to fail on bad input before any run folder or process exists.
    The in-process engine skips this: it builds them once, inside the ServerApp, before writing."""
    from server.setup import build_run

    build_run(scenario)
