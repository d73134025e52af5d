"""Human-readable dataset summaries for the terminal (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_summary(path: str, summary: dict, console: Console | None = None) -> None:
    """Print a store's :meth:`TransitionStore.summary` as a two-column table."""
    console = console or Console()
    table = Table(title=path, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    ret = summary.get("return", {})
    rows = [
        ("episodes", f"{summary['episodes']}"),
        ("transitions", f"{summary['transitions']}"),
        ("frames", f"{summary.get('frames', '')}"),
        ("return mean / min / max",
         f"{ret.get('mean', float('nan')):.2f} / {ret.get('min', float('nan')):.2f} / {ret.get('max', float('nan')):.2f}"),
        ("routes", ", ".join(summary.get("routes", []))),
        ("policy", str(summary.get("policy"))),
        ("obs spec", f"vector {summary['obs_spec']['vector_fields'] if len(summary['obs_spec']['vector_fields']) < 4 else str(len(summary['obs_spec']['vector_fields'])) + ' fields'}, "
                     f"traffic {summary['obs_spec'].get('traffic', 0)}, image {summary['obs_spec'].get('frame_stack', 4)}x{summary['obs_spec'].get('image_size', 84)}^2"),
        ("bytes stored", _fmt_bytes(summary.get("bytes_stored", 0))),
        ("bytes per transition", f"{summary.get('bytes_per_transition', 0):.0f}"),
        ("created", str(summary.get("created", ""))),
        ("software version", str(summary.get("software_version", ""))),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
