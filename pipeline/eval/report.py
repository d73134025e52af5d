"""Evaluation outputs: ``report.json``, ``episodes.csv``, ``summary.png``, videos, ``steps.csv``, and the
terminal table.

All of them read the report dict that :func:`pipeline.eval.runner.evaluate` builds:
``summary[label]["overall" | "by_route"][route]`` summaries and one ``episodes`` row per episode.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

VIDEO_SCALE = 4  # 84x84 camera frames are too small to watch; nearest-neighbour upscaling

#: (summary key, axis title) of the four panels of ``summary.png``.
PLOTTED = (
    ("route_completion", "route completion (%)"),
    ("driving_score", "driving score"),
    ("infractions_per_km", "infractions per km"),
    ("mean_speed", "mean speed (m/s)"),
)


def short_labels(labels) -> dict[str, str]:
    """Policy labels as the fewest trailing path parts (at least two) that still tell them apart
    (``runs/a/last.pt``, ``runs/b/last.pt`` -> ``a/last.pt``, ``b/last.pt``; ``expert`` stays)."""
    labels = list(labels)
    for n in range(2, max(len(Path(label).parts) for label in labels) + 1):
        short = {label: "/".join(Path(label).parts[-n:]) for label in labels}
        if len(set(short.values())) == len(labels):
            return short
    return {label: label for label in labels}


def display_route(name: str) -> str:
    """A route as tables and plots show it: a route file's ``dir/file.xml#ID`` as ``file.xml#ID``."""
    return os.path.basename(name) if "#" in name else name


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label.replace(".pt", "")).strip("_") or "policy"


def write_all(report: dict, out: Path, videos: dict[str, tuple[np.ndarray, float]],
              steps: list[dict] | None = None) -> dict:
    """Write every output into ``out``; ``videos`` maps policy label -> (frames uint8 ``(T, H, W)``,
    fps); ``steps`` (``--trace``) are the per-step rows of every episode, written to ``steps.csv``.
    Returns the written paths (what the report's ``files`` entry holds)."""
    files = {"report": str(out / "report.json"), "episodes_csv": str(out / "episodes.csv"),
             "summary_png": str(out / "summary.png"), "videos": {}}
    try:
        write_csv(report["episodes"], out / "episodes.csv")
        if steps is not None:
            write_csv(steps, out / "steps.csv")
            files["steps_csv"] = str(out / "steps.csv")
        plot_summary(report, out / "summary.png")
        short = short_labels(report["summary"])
        for label, (frames, fps) in videos.items():
            files["videos"][label] = str(write_video(frames, out / f"video_{_slug(short[label])}", fps))
        report = {**report, "files": files}
        tmp = out / ".report.json.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out / "report.json")  # readers never see half a report
    except OSError as exc:
        raise PipelineError(f"cannot write the evaluation report to {out}: {exc.strerror or exc}") from None
    return files


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_summary(report: dict, path: Path) -> None:
    """Grouped bars: one group per route, one bar per policy (mean with std whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["summary"])
    short = short_labels(labels)
    routes = list(report["routes"])
    width = 0.8 / len(labels)
    x = np.arange(len(routes))
    fig, axes = plt.subplots(2, 2, figsize=(4 + 1.6 * len(routes) * max(1, len(labels) / 2), 7), squeeze=False)
    for ax, (key, title) in zip(axes.flat, PLOTTED):
        for i, label in enumerate(labels):
            per_route = [report["summary"][label]["by_route"][r] for r in routes]
            means = [s[key] for s in per_route]
            stds = [s[f"{key}_std"] for s in per_route] if f"{key}_std" in per_route[0] else None
            ax.bar(x + (i - (len(labels) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                   label=short[label])
        ax.set_title(title)
        ax.set_xticks(x, [display_route(r) for r in routes], rotation=30 if len(routes) > 3 else 0)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[:2]:
        ax.set_ylim(0, 105)
    axes.flat[0].legend(fontsize="small")
    episodes = report["config"]["episodes"]
    # two short lines: one long line was wider than a one-route figure and lost both ends
    fig.suptitle(f"pipeline eval: {episodes} episode(s) per policy and route\nbars: mean, whiskers: std")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_video(frames: np.ndarray, stem: Path, fps: float) -> Path:
    """Frames uint8 ``(T, H, W)`` -> ``stem.mp4`` when an ffmpeg backend is installed, else ``stem.gif``."""
    import imageio.v3 as iio

    big = np.repeat(np.repeat(frames, VIDEO_SCALE, axis=1), VIDEO_SCALE, axis=2)
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        path = stem.with_suffix(".mp4")
        iio.imwrite(path, big, fps=fps, codec="libx264", macro_block_size=1)
    else:
        path = stem.with_suffix(".gif")
        iio.imwrite(path, big, duration=1000.0 / fps, loop=0)
    return path


def print_table(report: dict, console=None) -> None:
    """One row per policy and route (plus an all-routes row per policy when there are several)."""
    from rich.console import Console

    from pipeline.terminal import print_fitted

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes get the whole table, not an 80-column squeeze
            console = Console(width=200)
    columns = [(name, "left" if name in ("policy", "route", "endings") else "right")
               for name in ("policy", "route", "eps", "RC %", "DS", "penalty", "collisions", "off-route",
                            "infr/km", "return", "steps", "m/s", "endings")]
    many_routes = len(report["routes"]) > 1
    short = short_labels(report["summary"])
    rows, sections = [], []
    for label, summaries in report["summary"].items():
        by_route = list(summaries["by_route"].items()) + ([("all", summaries["overall"])] if many_routes else [])
        for route, s in by_route:
            rows.append([
                short[label], display_route(route), str(s["episodes"]),
                f"{s['route_completion']:.1f}", f"{s['driving_score']:.1f}", f"{s['infraction_penalty']:.2f}",
                str(s["collisions"]), str(s["off_route_events"]), f"{s['infractions_per_km']:.2f}",
                f"{s['episode_return']:.2f}", f"{s['length']:.0f}", f"{s['mean_speed']:.1f}",
                ", ".join(f"{k} {v}" for k, v in s["terminations"].items()),
            ])
            sections.append(route == "all" or not many_routes)
    # at 80 columns the 13 columns split into tables that repeat policy and route
    print_fitted(console, "evaluation (means over episodes; counts are totals)", columns, rows, keep=2,
                 sections=sections)
    if many_routes or any(r.get("backend") == "carla" for r in report["routes"].values()):
        print_leaderboard(report, console)


def print_leaderboard(report: dict, console) -> None:
    """The Leaderboard's global figures, one column per policy (narrow: the kinds are rows)."""
    from rich.table import Table

    from pipeline.eval.metrics import LEADERBOARD_INFRACTIONS

    short = short_labels(report["summary"])
    boards = {short[label]: s["leaderboard"] for label, s in report["summary"].items()}
    first = next(iter(boards.values()))
    table = Table(title=f"Leaderboard: {first['routes']} routes",
                  title_justify="left")
    table.add_column("figure")
    for label in boards:
        table.add_column(label, justify="right")
    for key, name in (("driving_score", "driving score"), ("route_completion", "route completion %"),
                      ("infraction_penalty", "infraction penalty")):
        table.add_row(name, *(f"{b[key]:.3f}" if key == "infraction_penalty" else f"{b[key]:.1f}"
                              for b in boards.values()))
    for i, kind in enumerate(LEADERBOARD_INFRACTIONS):
        table.add_row(f"{kind} /km", *(f"{b['infractions_per_km'][kind]:.2f}" for b in boards.values()),
                      end_section=i == len(LEADERBOARD_INFRACTIONS) - 1)
    table.add_row("km driven", *(f"{b['distance_km']:.2f}" for b in boards.values()))
    console.print(table)
