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


def _describe_spec(spec: dict) -> str:
    fields = spec["vector_fields"]
    vector = ", ".join(fields) if len(fields) <= 3 else f"{len(fields)} fields"
    size = spec.get("image_size", 84)
    return f"vector: {vector}; traffic {spec.get('traffic', 0)}; image {spec.get('frame_stack', 4)}x{size}x{size}"


def print_summary(path: str, summary: dict, console: Console | None = None) -> None:
    """Print a store's :meth:`TransitionStore.summary` as a two-column table."""
    console = console or Console()
    table = Table(title=path, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    nan = float("nan")
    rows = [
        ("episodes", f"{summary['episodes']}"),
        ("transitions", f"{summary['transitions']}"),
        ("frames", f"{summary.get('frames', '')}"),
        ("return mean / min / max", f"{summary.get('return_mean', nan):.2f} / {summary.get('return_min', nan):.2f}"
                                    f" / {summary.get('return_max', nan):.2f}"),
        ("mean length", f"{summary.get('length_mean', nan):.1f} steps"),
        ("endings", ", ".join(f"{k or 'none'}: {v}" for k, v in summary.get("terminations", {}).items())),
        ("routes", ", ".join(f"{name} ({count} episodes)" for name, count in summary.get("routes", {}).items())),
        ("policy", str(summary.get("policy"))),
        ("obs spec", _describe_spec(summary["obs_spec"])),
        ("bytes stored", _fmt_bytes(summary.get("bytes_stored", 0))),
        ("bytes per transition", f"{summary.get('bytes_per_transition', 0):.0f}"),
        ("created", str(summary.get("created", ""))),
        ("software version", str(summary.get("software_version", ""))),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
