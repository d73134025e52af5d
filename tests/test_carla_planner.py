"""The CARLA route planner on real ``carla.Map`` objects built from small OpenDRIVE towns (no server)."""

import math
import time

import carla
import numpy as np
import pytest

from pipeline.envs.carla_planner import RoutePlanner
from pipeline.errors import PipelineError
from tests.carla_towns import junction_town, loop_length, loop_town, straight_town

RESOLUTION = 1.0


@pytest.fixture(scope="module")
def maps():
    return {f.__name__: carla.Map(f.__name__, f()) for f in (straight_town, junction_town, loop_town)}


@pytest.fixture(scope="module")
def planners(maps):
    return {name: RoutePlanner(m, resolution=RESOLUTION) for name, m in maps.items()}


def _length(route: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(route[:, :2], axis=0), axis=1).sum())


def _assert_dense_and_connected(route: np.ndarray) -> None:
    steps = np.linalg.norm(np.diff(route[:, :2], axis=0), axis=1)
    assert steps.max() <= RESOLUTION + 1e-6, "a gap in the route"
    assert steps[:-1].min() >= 0.9 * RESOLUTION, "waypoints bunch up"


def _lane_offsets(carla_map, route: np.ndarray) -> tuple[np.ndarray, list]:
    """Distance of each route point from the centre of the driving lane it lies on, and those waypoints."""
    wps = [carla_map.get_waypoint(carla.Location(float(x), float(y), 0.0)) for x, y, _ in route]
    offsets = np.array([math.hypot(w.transform.location.x - x, w.transform.location.y - y)
                        for w, (x, y, _) in zip(wps, route)])
    return offsets, wps


def test_carla_builds_maps_from_opendrive_text_quickly():
    started = time.perf_counter()
    for town in (straight_town, junction_town, loop_town):
        carla_map = carla.Map(town.__name__, town())
        assert len(carla_map.get_topology()) > 0
    assert time.perf_counter() - started < 2.0


def test_straight_road_route_follows_its_lane_to_the_goal(planners, maps):
    route = planners["straight_town"].plan((10.0, 1.75, 0.0), (280.0, 1.75))
    _assert_dense_and_connected(route)
    np.testing.assert_allclose(route[:, 1], 1.75, atol=1e-3)  # lane -1 centre (CARLA y = +1.75)
    assert np.all(np.diff(route[:, 0]) > 0), "the route runs along the lane's direction"
    assert route[0, :2] == pytest.approx([10.0, 1.75], abs=0.6)
    assert route[-1, :2] == pytest.approx([280.0, 1.75], abs=0.6)
    assert _length(route) == pytest.approx(270.0, abs=1.5)
    # it crossed from road 0 onto road 1 at x = 150
    roads = {w.road_id for w in _lane_offsets(maps["straight_town"], route)[1]}
    assert roads == {0, 1}


def test_goal_in_the_neighbouring_lane_changes_lanes_smoothly(planners):
    route = planners["straight_town"].plan((10.0, 1.75, 0.0), (280.0, 5.25))
    _assert_dense_and_connected(route)
    assert route[0, 1] == pytest.approx(1.75, abs=1e-3) and route[-1, 1] == pytest.approx(5.25, abs=1e-3)
    assert np.all((route[:, 1] > 1.74) & (route[:, 1] < 5.26))
    # one diagonal crossing over several metres, not a sideways jump
    lateral_steps = np.abs(np.diff(route[:, 1]))
    assert lateral_steps.max() < 0.5
    crossing = np.flatnonzero((route[:, 1] > 1.8) & (route[:, 1] < 5.2))
    assert 5 <= len(crossing) <= 20 and np.all(np.diff(crossing) == 1)


def test_a_goal_behind_the_start_on_a_dead_end_road_is_a_clear_error(planners):
    with pytest.raises(PipelineError, match="no drivable route"):
        planners["straight_town"].plan((100.0, 1.75, 0.0), (50.0, 1.75))


@pytest.mark.parametrize("goal, final_heading, turn_length", [
    ((1.75, -60.0), (0.0, -1.0), 0.5 * math.pi * 8.25),  # inside of the corner
    ((-60.0, -1.75), (-1.0, 0.0), 20.0),  # straight across
    ((-1.75, 60.0), (0.0, 1.0), 0.5 * math.pi * 11.75),  # outside of the corner, across the other lane
])
def test_junction_routes_take_the_right_exit_along_the_lanes(planners, maps, goal, final_heading, turn_length):
    carla_map = maps["junction_town"]
    start = (60.0, -1.75, 0.0)  # east arm, lane heading into the junction (CARLA -x)
    route = planners["junction_town"].plan(start, goal)
    _assert_dense_and_connected(route)
    offsets, wps = _lane_offsets(carla_map, route)
    assert offsets.max() < 0.35, "the route leaves the lane centres (cuts a corner?)"
    in_junction = [w for w in wps if w.is_junction]
    assert len(in_junction) >= 5, "the route does not pass through the junction"
    # where the connecting roads fan out (away from the shared entry and exit points) there is one
    inside = [w for w in in_junction if max(abs(w.transform.location.x), abs(w.transform.location.y)) < 7.0]
    connecting_roads = {w.road_id for w in inside}
    assert len(connecting_roads) == 1, f"route wanders across connecting roads {connecting_roads}"
    heading = route[-1, :2] - route[-6, :2]
    np.testing.assert_allclose(heading / np.linalg.norm(heading), final_heading, atol=1e-3)
    assert route[-1, :2] == pytest.approx(goal, abs=0.6)
    assert _length(route) == pytest.approx(50.0 + turn_length + 50.0, abs=2.0)


def test_each_junction_exit_uses_its_own_connecting_road(planners, maps):
    used = set()
    for goal in ((1.75, -60.0), (-60.0, -1.75), (-1.75, 60.0)):
        route = planners["junction_town"].plan((60.0, -1.75, 0.0), goal)
        used |= {w.road_id for w in _lane_offsets(maps["junction_town"], route)[1]
                 if w.is_junction and max(abs(w.transform.location.x), abs(w.transform.location.y)) < 7.0}
    assert len(used) == 3


def test_goal_behind_the_start_on_a_loop_goes_once_around(planners, maps):
    route = planners["loop_town"].plan((10.0, 1.75, 0.0), (5.0, 1.75))
    _assert_dense_and_connected(route)
    outer_lane = loop_length() + 2 * math.pi * 1.75  # lane -1 runs 1.75 m outside the reference line
    assert _length(route) == pytest.approx(outer_lane - 5.0, abs=2.0)
    offsets, wps = _lane_offsets(maps["loop_town"], route)
    assert offsets.max() < 0.35 and {w.lane_id for w in wps} == {-1}
    assert len({w.road_id for w in wps}) == 8


def test_via_points_are_visited_in_order(planners):
    # on the loop's far straight (CARLA y = -71.75 is lane -1 of road 5)
    via = (40.0, -71.75)
    route = planners["loop_town"].plan((10.0, 1.75, 0.0), (60.0, 1.75), via=[via])
    nearest_via = int(np.argmin(np.hypot(route[:, 0] - via[0], route[:, 1] - via[1])))
    assert np.hypot(*(route[nearest_via, :2] - via)) < 0.6
    assert 0 < nearest_via < len(route) - 1
    # without the via point the route would just drive 50 m straight on
    assert _length(route) > 300.0


def test_snap_uses_the_start_yaw_to_choose_the_lane_direction(planners):
    planner = planners["straight_town"]
    # a point on the centre line between the two directions
    forward = planner.snap((50.0, 0.2, 0.0), yaw_deg=0.0)
    backward = planner.snap((50.0, 0.2, 0.0), yaw_deg=180.0)
    assert forward.lane_id < 0 and backward.lane_id > 0
    assert abs((backward.transform.rotation.yaw - 180.0 + 180.0) % 360.0 - 180.0) < 1.0
