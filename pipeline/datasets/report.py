"""Human-readable dataset summaries for the terminal (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipeline.terminal import print_fitted


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
    return (f"camera {spec.get('camera', 'unrecorded')}; vector: {vector}; traffic {spec.get('traffic', 0)}; "
            f"image {spec.get('frame_stack', 4)}x{size}x{size}")


def _describe_reward(reward: dict | None) -> str:
    if not reward:
        return "version 1 (unrecorded: uncapped progress, stuck truncates)"
    return (f"version {reward['version']}: progress x{reward['progress_weight']} capped at the target speed, "
            f"penalties collision {reward['collision_penalty']}, off-route {reward['off_route_penalty']}, "
            f"stuck {reward['stuck_penalty']}")


def print_summary(path: str, summary: dict, console: Console | None = None) -> None:
    """Print a store's :meth:`TransitionStore.summary` as a two-column table."""
    console = console or Console()
    table = Table(title=path, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("episodes", f"{summary['episodes']}"),
        ("transitions", f"{summary['transitions']}"),
        ("frames", f"{summary.get('frames', '')}"),
        ("return mean / min / max", " / ".join(_number(summary.get(k), ".2f")
                                               for k in ("return_mean", "return_min", "return_max"))),
        ("mean length", f"{_number(summary.get('length_mean'), '.1f')} steps"),
        ("endings", ", ".join(f"{k or 'none'}: {v}" for k, v in summary.get("terminations", {}).items())),
        ("routes", ", ".join(f"{name} ({count} episodes)" for name, count in summary.get("routes", {}).items())),
        ("policy", _policy(summary.get("meta") or {}) or ("see provenance" if summary.get("sources") else "unknown")),
        ("obs spec", _describe_spec(summary["obs_spec"])),
        ("reward", _describe_reward(summary.get("reward"))),
        ("expert labels", f"{summary['labelled_transitions']} transitions"
                          if summary.get("labelled_transitions") is not None else "none (format 1)"),
        ("bytes stored", _fmt_bytes(summary.get("bytes_stored", 0))),
        ("bytes per transition", _number(summary.get("bytes_per_transition"), ".0f")),
        ("created", str(summary.get("created", ""))),
        ("software version", str(summary.get("software_version", ""))),
    ]
    rows += _card_rows(summary)
    if summary.get("unfinished"):  # first, in red: this store is not whole
        rows.insert(0, ("[red]unfinished merge[/red]", summary["unfinished"]))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if summary.get("sources"):
        console.print(_sources_table(summary))


def _number(value, spec: str) -> str:
    """``value`` formatted, or "-" where there is none (a store with no committed episode)."""
    return "-" if value is None else format(value, spec)


def _who(meta: dict) -> str:
    by, on = meta.get("recorded_by"), meta.get("recorded_on")
    return f"{by or '?'}@{on or '?'}" if by or on else ""


def _policy(meta: dict) -> str:
    policy = meta.get("policy")
    if policy is None:
        return ""
    return f"{policy} (noise {meta['noise']})" if meta.get("noise") else str(policy)


def _card_rows(summary: dict) -> list[tuple[str, str]]:
    """The dataset card: who recorded it where, with what, and how it was extended since."""
    meta = summary.get("meta") or {}
    rows = [
        ("format", f"{summary.get('format')} v{summary.get('format_version')}"),
        ("recorded by", _who(meta)),
        ("backend", str(meta.get("backend", ""))),
        ("resumed / appended", f"{len(summary.get('appends') or [])} time(s)"),
    ]
    if summary.get("sources"):
        rows.append(("merged from", f"{len(summary['sources'])} source(s), "
                                    f"{summary.get('recorded_here', 0)} episode(s) recorded here"))
    return [(k, v) for k, v in rows if v]


def _sources_table(summary: dict) -> Table:
    table = Table(title="provenance (episodes/source)", title_justify="left")
    for column in ("#", "source", "created", "recorded by", "policy", "episodes here"):
        table.add_column(column)
    for i, source in enumerate(summary["sources"]):
        meta = source.get("meta") or {}
        table.add_row(str(i), str(source.get("url")), str(source.get("created")), _who(meta),
                      _policy(meta), str(source.get("episodes_here", "")))
    return table


def copy_line(result: dict) -> str:
    """One line about a :func:`~pipeline.datasets.remote.copy_store` result."""
    return (f"{result['episodes']} episodes in {result['destination']}: {result['copied']} objects copied "
            f"({_fmt_bytes(result['bytes_copied'])}), {result['skipped']} already there "
            f"({_fmt_bytes(result['bytes_skipped'])}); verified {result['verify']['chunks_checked']} chunks")


def print_verify(report: dict, console: Console | None = None) -> None:
    """Print a :class:`~pipeline.datasets.remote.VerifyReport` (as a dict): one line per problem."""
    console = console or Console(highlight=False, soft_wrap=True)  # one problem, one line
    for problem in report["problems"]:
        console.print(f"[red]{problem['kind']}[/red] {problem['where']}: {problem['message']}")
    for note in report["notes"]:
        console.print(f"[yellow]note[/yellow] {note}")
    checked = f"{report['chunks_checked']} chunks ({_fmt_bytes(report['bytes_checked'])})"
    if report["problems"]:
        console.print(f"{report['url']}: {len(report['problems'])} problem(s); {checked} checked")
    else:
        console.print(f"{report['url']}: OK, {report['episodes']} episodes; {checked} match their checksums")


def print_stats(stats: dict, console: Console | None = None) -> None:
    """Print :func:`~pipeline.datasets.stats.dataset_stats` output as tables."""
    console = console or Console()
    console.print(f"{stats['url']}: {stats['episodes']} episodes, {stats['transitions']} transitions, "
                  f"{stats['terminated']} terminated, {stats['truncated']} truncated")
    if not stats["transitions"]:
        return
    fields = Table(title="vector", title_justify="left")
    for column in ("field", "mean", "std", "non-finite"):
        fields.add_column(column, justify="right" if column != "field" else "left")
    v = stats["vector"]
    for name, mean, std, bad in zip(v["fields"], v["mean"], v["std"], v["nonfinite"]):
        fields.add_row(name, f"{mean:.4g}", f"{std:.4g}", str(bad))
    console.print(fields)
    # one row per quantity, in as many tables as fit: at 80 columns no value is wrapped or cut
    r, a = stats["reward"], stats["action"]
    rows = [["reward", *(f"{r[k]:.4g}" for k in ("mean", "std", "min", "max")),
             _sparkline(r["hist"]["counts"]), f"[{r['min']:.3g}, {r['max']:.3g}]"]]
    rows += [[f"action {name}", f"{a['mean'][j]:.3g}", f"{a['std'][j]:.3g}", "", "",
              _sparkline(a["hist"][j]["counts"]), f"[-1, 1], {a['outside'][j]} outside"]
             for j, name in enumerate(a["fields"])]
    rows += [[f"episode {key}", *(f"{stats[key][k]:.4g}" for k in ("mean", "std", "min", "max")), "", ""]
             for key in ("return", "length")]
    columns = [("", "left"), *((name, "right") for name in ("mean", "std", "min", "max")),
               ("histogram", "left"), ("histogram range", "left")]
    print_fitted(console, "values", columns, rows)
    if stats.get("png"):
        console.print(f"plot: {stats['png']}")


def _sparkline(counts: list[int]) -> str:
    blocks = " ▁▂▃▄▅▆▇█"
    top = max(counts) or 1
    return "".join(blocks[round(c / top * (len(blocks) - 1))] for c in counts)


def merge_lines(result: dict) -> list[str]:
    """What a :func:`~pipeline.datasets.merge.merge_stores` result says: the merged store, and
    one line per source that repeated episodes of another (written once)."""
    lines = [f"{d['store']} repeats {d['episodes']} episode(s) already taken from {d['of']}: "
             "written once (deduplicated)"
             for d in result["duplicates"]]
    resumed = f", resumed after {result['resumed']}" if result.get("resumed") is not None else ""
    return lines + [f"{result['episodes']} episodes ({result['transitions']} transitions) from "
                    f"{len(result['sources'])} source(s) in {result['out']}{resumed}"]
