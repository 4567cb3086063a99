"""What every ``fedge`` command shares: the console, failing with exit code 2, and ``--set``."""

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
