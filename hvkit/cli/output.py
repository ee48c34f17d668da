"""Printing for humans (rich tables) and for programs (--json), side by side."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

import click
from rich.console import Console
from rich.table import Table

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def console() -> Console:
    """For results on stdout; piped output is not cut to 80 columns."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def status_console() -> Console:
    """For spinners and progress: stderr, so stdout stays clean for --json."""
    return Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(columns: list[str], rows: Iterable[list[Any]], title: str | None = None) -> None:
    table = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c, justify="right" if c.endswith(("MiB", "s", "pid", "cpus")) else "left")
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    console().print(table)
