"""The Leaderboard's global figures over routes (eval/metrics.leaderboard_summary) and their table."""

import pytest
from rich.console import Console

from pipeline.eval.metrics import EpisodeMetrics, leaderboard_summary, summarize
from pipeline.eval.report import print_table


def _episode(route, completion, distance_m, termination="route_done", **counts):
    return EpisodeMetrics(route=route, seed=0, length=10, route_completion=completion, distance_m=distance_m,
                          termination=termination, **counts)


BY_ROUTE = {
    "a.xml#1": [_episode("a.xml#1", 100.0, 500.0), _episode("a.xml#1", 50.0, 250.0, red_lights=1)],
    "a.xml#2": [_episode("a.xml#2", 20.0, 250.0, termination="stuck", stop_signs=1, collisions_static=1)],
}


def test_global_figures_are_means_over_routes_and_infractions_per_km_by_kind():
    board = leaderboard_summary(BY_ROUTE)
    # route 1: DS 100 and 50 * 0.7 = 35, mean 67.5; route 2: 20 * 0.8 * 0.65 = 10.4
    assert board["driving_score"] == pytest.approx((67.5 + 10.4) / 2)
    assert board["route_completion"] == pytest.approx((75.0 + 20.0) / 2)
    assert board["infraction_penalty"] == pytest.approx(((1.0 + 0.7) / 2 + 0.8 * 0.65) / 2)
    # a mean over episodes would weigh route 1 twice
    assert summarize([e for es in BY_ROUTE.values() for e in es])["driving_score"] != pytest.approx(board["driving_score"])
    assert board["distance_km"] == pytest.approx(1.0) and board["routes"] == 2 and board["episodes"] == 3
    assert board["infractions_per_km"] == {
        "collisions_pedestrian": 0.0, "collisions_vehicle": 0.0, "collisions_layout": 1.0, "red_light": 1.0,
        "stop_infraction": 1.0, "route_dev": 0.0, "vehicle_blocked": 1.0, "route_timeout": 0.0}


def test_the_summary_table_shows_the_global_figures_within_80_columns():
    episodes = [e for es in BY_ROUTE.values() for e in es]
    report = {"routes": {name: {"backend": "carla"} for name in BY_ROUTE},
              "summary": {"expert": {"overall": summarize(episodes),
                                     "by_route": {name: summarize(es) for name, es in BY_ROUTE.items()},
                                     "leaderboard": leaderboard_summary(BY_ROUTE)}}}
    console = Console(record=True, width=80)
    print_table(report, console)
    text = console.export_text()
    board = text[text.index("Leaderboard: 2 routes"):]
    assert max(len(line) for line in board.splitlines()) <= 80
    row = next(line for line in board.splitlines() if "driving score" in line)
    assert f"{(67.5 + 10.4) / 2:.1f}" in row
    assert "red_light /km" in board and "vehicle_blocked /km" in board
