"""Operator-facing terminal output: tables (rich), consistent across commands."""
from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence


def make_console(file=None):
    from rich.console import Console

    out = file or sys.stdout
    # Wide enough for UUID columns when piped; a terminal uses its own width.
    return Console(file=out, width=None if out.isatty() else 200, highlight=False, soft_wrap=False)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, file=None,
                right: Iterable[str] = ()) -> None:
    from rich import box
    from rich.table import Table

    right = set(right)
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_lines=False)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*("—" if v is None else str(v) for v in row))
    make_console(file).print(table)


def human_bps(value: float | None) -> str | None:
    """1234567 -> '1.23 Mb/s'."""
    if value is None:
        return None
    for unit, scale in (("Gb/s", 1e9), ("Mb/s", 1e6), ("kb/s", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} b/s"
