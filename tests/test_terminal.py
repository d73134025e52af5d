"""Terminal output reads at 80 columns: no value cut or wrapped, headers present, whole plot titles."""

from __future__ import annotations

import json

import matplotlib
import pytest
from rich.console import Console

from pipeline.envs import list_routes
from pipeline.terminal import print_fitted, print_routes

matplotlib.use("Agg")


def render(fn, *args, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    fn(console, *args) if fn is print_fitted else fn(*args, console=console)
    return console.export_text().splitlines()


def test_a_wide_table_splits_by_column_and_keeps_every_value_whole():
    columns = [("name", "left")] + [(f"metric{j}", "right") for j in range(12)]
    rows = [[f"row{i}", *(f"{1234.5678 * (i + 1) * (j + 1):.4f}" for j in range(12))] for i in range(3)]
    lines = render(print_fitted, "t", columns, rows)
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 80
    assert "…" not in text
    for row in rows:
        for value in row:
            assert value in text  # whole, on one line
    assert text.count("name") >= 2  # the key column repeats in each part, headers included
    assert "(1/" in text


def test_a_table_that_fits_is_one_table():
    lines = render(print_fitted, "t", [("a", "left"), ("b", "right")], [["x", "1"]])
    assert not any("(1/" in line for line in lines)


def test_routes_have_a_header_and_fit_80_columns():
    lines = render(print_routes, list_routes())
    assert lines[0].split()[:4] == ["route", "backend", "length", "steps"]
    assert max(map(len, lines)) <= 80
    for route in list_routes():
        assert any(line.startswith(route.name + " ") for line in lines)


def test_the_collect_bar_keeps_its_figures_at_80_columns():
    from pipeline.datasets.collect import _progress_bar

    bar = _progress_bar(True, total=2000, done=1234)
    with bar:
        bar.update(sps=259.3, ret=36.12)
        console = Console(width=80, record=True, color_system=None)
        console.print(bar._progress.make_tasks_table(bar._progress.tasks))
    line = console.export_text().splitlines()[0]
    assert "1234/2000" in line and "259 steps/s" in line and "36.12" in line


@pytest.mark.parametrize("routes, labels", [(["racetrack"], ["expert"]), (["racetrack", "racetrack-oval"],
                                                                          ["expert", "random", "a/last.pt"])])
def test_eval_summary_png_title_and_labels_are_inside_the_figure(tmp_path, monkeypatch, routes, labels):
    import matplotlib.pyplot as plt

    from pipeline.eval import report as eval_report

    metrics = {key: 50.0 for key, _ in eval_report.PLOTTED}
    metrics.update({f"{key}_std": 5.0 for key, _ in eval_report.PLOTTED})
    report = {"summary": {label: {"by_route": {r: metrics for r in routes}} for label in labels},
              "routes": {r: {} for r in routes}, "config": {"episodes": 3}}
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    eval_report.plot_summary(json.loads(json.dumps(report)), tmp_path / "summary.png")
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [fig._suptitle] + [ax.title for ax in fig.axes] + [t for ax in fig.axes for t in ax.get_xticklabels()]
    for text in texts:
        extent = text.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, text.get_text()
        assert box.y0 <= extent.y0 and extent.y1 <= box.y1, text.get_text()
