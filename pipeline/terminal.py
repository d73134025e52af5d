"""Tables that read at any terminal width (80 columns included).

rich shrinks a table that is wider than the terminal by wrapping cells mid-value or cutting them
to ``3…``. :func:`print_fitted` never does: where all the columns do not fit, it prints the rows as
several tables, each with as many columns as fit and the leading key columns repeated, so every
value stays whole and every table keeps its header.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _table(title: str | None, columns: list[tuple[str, str]], rows: list[list[str]], sections: list[bool]) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    for row, end_section in zip(rows, sections):
        table.add_row(*row, end_section=end_section)
    return table


def print_fitted(console: Console, title: str | None, columns: list[tuple[str, str]], rows: list[list[str]],
                 keep: int = 1, sections: list[bool] | None = None) -> None:
    """Print ``rows`` under ``columns`` (``(header, justify)`` pairs) in as few tables as fit
    ``console``'s width, each repeating the first ``keep`` columns. ``sections``: per row, draw a
    line under it. A single column too wide on its own is printed alone, cut by the terminal."""
    sections = sections or [False] * len(rows)
    groups: list[list[int]] = []
    current = list(range(keep))
    for j in range(keep, len(columns)):
        trial = current + [j]
        # measured unclamped: console.measure would cap the answer at the console's width
        wide = console.measure(_table(title, [columns[i] for i in trial], [[row[i] for i in trial] for row in rows],
                                      sections), options=console.options.update(max_width=1 << 16)).maximum
        if wide > console.width and len(current) > keep:
            groups.append(current)
            current = list(range(keep)) + [j]
        else:
            current = trial
    groups.append(current)
    for n, group in enumerate(groups):
        part = title if len(groups) == 1 else f"{title} ({n + 1}/{len(groups)})" if title else None
        console.print(_table(part, [columns[i] for i in group], [[row[i] for i in group] for row in rows], sections))


def print_routes(routes, console: Console | None = None) -> None:
    """``pipeline routes``: one row per route under a header; descriptions wrap in their column."""
    console = console or Console()
    table = Table(title=None, box=None, header_style="bold", pad_edge=False)
    for name, justify in (("route", "left"), ("backend", "left"), ("length", "right"), ("steps", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column("description", overflow="fold")
    for r in routes:
        table.add_row(r.name, r.backend, f"{r.length_m:.0f} m", str(r.max_steps), r.description)
    console.print(table)
