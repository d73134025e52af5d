"""Leaderboard route files (1.0 and 2.x XML, written by the tests) as routes: parsing, the CARLA env
driving them on the stand-in, and `pipeline routes --file [--xodr]` on an OpenDRIVE town the tests write."""

import json

import carla
import numpy as np
import pytest

from pipeline.envs import get_route, resolve_routes
from pipeline.envs.carla_env import CarlaDrivingEnv
from pipeline.envs.route_files import read_route_file, scenario_note
from pipeline.errors import PipelineError, UnknownRouteError
from tests.carla_standin import StandInServer
from tests.carla_towns import junction_town
from tests.cli_helpers import assert_one_line_error, run_cli

# In the junction town (CARLA frame), the west arm's lane toward the junction runs along +x at
# y = +1.75, and so does the east arm's lane away from it: a straight drive through the junction.
STRAIGHT_THROUGH = [(-60.0, 1.75), (-20.0, 1.75), (40.0, 1.75), (65.0, 1.75)]
# the east arm's outbound lane is a dead end: nothing leads back to the west arm's westbound lane
DEAD_END_THEN_BACK = [(-60.0, 1.75), (40.0, 1.75), (-40.0, -1.75)]

LB1 = """<?xml version="1.0"?>
<routes>
  <route id="0" town="Junction">
{straight}
  </route>
  <route id="7" town="Junction">
    <weather cloudiness="30.0" precipitation="10.0" sun_altitude_angle="45.0" wetness="5.0"/>
{dead_end}
  </route>
  <route id="9" town="Town01">
    <waypoint x="0" y="0" z="0" pitch="0" roll="0" yaw="0"/>
    <waypoint x="10" y="0" z="0" pitch="0" roll="0" yaw="0"/>
  </route>
</routes>
"""

LB2 = """<?xml version="1.0"?>
<routes>
  <route id="12" town="Junction">
    <weathers>
      <weather route_percentage="100" cloudiness="90.0" precipitation="80.0" sun_altitude_angle="10.0"/>
      <weather route_percentage="0" cloudiness="5.0" precipitation="0.0" sun_altitude_angle="60.0"
               fog_density="2.0"/>
    </weathers>
    <waypoints>
{positions}
    </waypoints>
    <scenarios>
      <scenario name="Accident_1" type="Accident"><trigger_point x="-20" y="1.75" z="0" yaw="0"/></scenario>
      <scenario name="Crossing_1" type="SignalizedJunctionLeftTurn"><trigger_point x="0" y="0" z="0" yaw="0"/></scenario>
    </scenarios>
  </route>
</routes>
"""


def _waypoints(points, yaw=0.0) -> str:
    return "\n".join(f'    <waypoint x="{x}" y="{y}" z="0.0" pitch="0.0" roll="0.0" yaw="{yaw}"/>'
                     for x, y in points)


def _positions(points) -> str:
    return "\n".join(f'      <position x="{x}" y="{y}" z="0.0"/>' for x, y in points)


@pytest.fixture
def lb1(tmp_path):
    path = tmp_path / "lb1.xml"
    path.write_text(LB1.format(straight=_waypoints(STRAIGHT_THROUGH), dead_end=_waypoints(DEAD_END_THEN_BACK)))
    return str(path)


@pytest.fixture
def lb2(tmp_path):
    path = tmp_path / "lb2.xml"
    path.write_text(LB2.format(positions=_positions(STRAIGHT_THROUGH)))
    return str(path)


@pytest.fixture
def xodr(tmp_path):
    path = tmp_path / "Junction.xodr"
    path.write_text(junction_town())
    return str(path)


def test_leaderboard_1_0_file_parses_every_route_in_order_in_the_map_frame(lb1):
    routes = read_route_file(lb1)
    assert [r.id for r in routes] == ["0", "7", "9"]
    assert [r.format for r in routes] == ["1.0"] * 3
    assert routes[0].town == "Junction" and routes[2].town == "Town01"
    assert routes[0].waypoints == tuple((x, y, 0.0, 0.0) for x, y in STRAIGHT_THROUGH)  # as the file gives them
    assert routes[0].length_m == pytest.approx(125.0)
    assert routes[0].weather == {} and routes[0].scenarios == 0
    assert routes[1].weather == {"cloudiness": 30.0, "precipitation": 10.0, "sun_altitude_angle": 45.0, "wetness": 5.0}


def test_leaderboard_2_file_parses_positions_first_weather_and_counts_scenarios(lb2):
    (route,) = read_route_file(lb2)
    assert route.format == "2.x" and route.id == "12"
    assert route.waypoints == tuple((x, y, 0.0) for x, y in STRAIGHT_THROUGH)
    # the weather at the route's start (route_percentage 0), whatever the order in the file
    assert route.weather == {"cloudiness": 5.0, "precipitation": 0.0, "sun_altitude_angle": 60.0, "fog_density": 2.0}
    assert route.scenarios == 2
    note = scenario_note(lb2)
    assert note is not None and "2 Leaderboard scenario(s) ignored" in note and "\n" not in note


def test_route_specs_name_one_route_or_every_route_of_a_file(lb1, lb2):
    assert [r.name for r in resolve_routes(lb1)] == [f"{lb1}#0", f"{lb1}#7", f"{lb1}#9"]
    route = get_route(f"{lb1}#0")
    # start = first waypoint with its yaw; goal = last; every waypoint between is a via point, in order
    assert route.backend == "carla" and route.town == "Junction"
    assert route.start == (-60.0, 1.75, 0.0, 0.0) and route.goal == (65.0, 1.75)
    assert route.waypoints == ((-20.0, 1.75), (40.0, 1.75))
    # the Leaderboard's timeout: 8 s + 0.4 s per metre, in 0.05 s ticks
    assert route.max_steps == int(np.ceil((8.0 + 0.4 * 125.0) / 0.05))
    assert get_route(lb2).name == f"{lb2}#12"  # a file with a single route needs no #ID
    assert get_route(lb2).start == (-60.0, 1.75, 0.0)  # 2.x positions have no yaw
    with pytest.raises(UnknownRouteError, match="has no route '5'; its routes: 0, 7, 9"):
        get_route(f"{lb1}#5")
    with pytest.raises(UnknownRouteError, match="holds 3 routes; name one"):
        get_route(lb1)


@pytest.mark.parametrize("text, message", [
    ("<routes><route id='1' town='T'><waypoint x='1' y='oops' z='0'/><waypoint x='2' y='0'/></route></routes>",
     "y='oops' is not a number"),
    ("<routes><route id='1' town='T'><waypoint x='1' y='0'/></route></routes>", "needs at least two waypoints"),
    ("<routes><route town='T'/></routes>", "needs id and town"),
    ("<scenarios/>", "is not a Leaderboard route file"),
    ("<routes><route id='1'", "is not valid XML"),
])
def test_a_bad_route_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=message):
        read_route_file(str(path))


def test_the_env_plans_through_every_waypoint_and_applies_the_file_weather(lb1, lb2):
    server = StandInServer({"Junction": junction_town()})
    env = CarlaDrivingEnv(get_route(f"{lb1}#0"), client_factory=server.client_factory)
    route = env._route_xyz  # the planned route, CARLA frame
    for x, y in STRAIGHT_THROUGH:
        assert np.min(np.hypot(route[:, 0] - x, route[:, 1] - y)) < 1.0, (x, y)
    assert route[0, 0] < route[-1, 0]  # driven west to east, in the file's order
    env.close()
    env = CarlaDrivingEnv(get_route(lb2), client_factory=server.client_factory)
    weather = server.world.weather
    assert isinstance(weather, carla.WeatherParameters)
    assert (weather.cloudiness, weather.sun_altitude_angle, weather.fog_density) == (5.0, 60.0, 2.0)
    env.close()


def test_routes_file_lists_id_town_waypoints_and_length(lb1):
    result = run_cli("routes", "--file", lb1)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["id", "town", "format", "waypoints", "length", "m"]
    assert lines[1].split() == ["0", "Junction", "1.0", "4", "125.0"]
    assert lines[3].split() == ["9", "Town01", "1.0", "2", "10.0"]


def test_routes_file_with_xodr_plans_offline_and_names_the_unreachable_waypoint(lb1, xodr):
    result = run_cli("routes", "--file", lb1, "--xodr", xodr, "--json")
    assert result.returncode == 1, result.stderr  # one route cannot be planned
    rows = {row["id"]: row for row in json.loads(result.stdout)["routes"]}
    assert rows["0"]["planned_m"] == pytest.approx(125.0, abs=2.0)
    assert rows["7"]["planned_m"] is None and rows["7"]["unplannable_waypoint"] == 2
    assert "waypoint 2 cannot be reached from waypoint 1" in rows["7"]["unplannable"]
    assert "planned_m" not in rows["9"]  # another town: not planned on this map
    text = run_cli("routes", "--file", lb1, "--xodr", xodr).stdout.strip().splitlines()
    assert text[1].split()[-1] == rows["0"]["planned_m"].__format__(".1f")
    assert "unplannable: waypoint 2" in text[2] and len(text) == 4


def test_routes_file_errors_are_one_line(tmp_path, lb1):
    assert_one_line_error(run_cli("routes", "--file", str(tmp_path / "missing.xml")), "cannot read route file")
    bad_map = tmp_path / "Junction.xodr"
    bad_map.write_text("not OpenDRIVE")
    assert_one_line_error(run_cli("routes", "--file", lb1, "--xodr", str(bad_map)), "not an OpenDRIVE map")
    assert_one_line_error(run_cli("routes", "--xodr", str(bad_map)), "go with --file")


TWO_ROUTES = """<routes>
  <route id="east" town="Straight"><waypoint x="5" y="1.75" z="0" yaw="0"/><waypoint x="120" y="1.75" z="0" yaw="0"/></route>
  <route id="west" town="Straight"><waypoint x="290" y="-1.75" z="0" yaw="180"/><waypoint x="150" y="-1.75" z="0" yaw="180"/></route>
</routes>"""


@pytest.fixture
def straight_routes(tmp_path):
    path = tmp_path / "straight.xml"
    path.write_text(TWO_ROUTES)
    return str(path)


def test_collect_over_a_route_file_drives_each_route_for_a_block_of_episodes(tmp_path, straight_routes):
    from pipeline.datasets.collect import CollectConfig, collect
    from pipeline.datasets.store import TransitionStore
    from tests.carla_standin import StandInServer
    from tests.carla_towns import straight_town

    server = StandInServer({"Straight": straight_town()})
    summary = collect(CollectConfig(out=str(tmp_path / "a.zarr"), episodes=4, route=straight_routes, max_steps=15,
                                    simulator={"client_factory": server.client_factory}), progress=False)
    assert summary["episodes_committed"] == 4
    store = TransitionStore(str(tmp_path / "a.zarr"))
    routes = [store.routes[i] for i in store.episodes["route"]]
    assert routes == [f"{straight_routes}#east"] * 2 + [f"{straight_routes}#west"] * 2
    assert store.summary()["meta"]["route"] == straight_routes  # what was asked for
    assert len(server.world.alive("vehicle")) == 1  # one env at a time: the first route's was closed


def test_make_env_on_a_route_file_drives_its_routes_in_turn_one_env_at_a_time(straight_routes):
    from pipeline.envs import make_env
    from tests.carla_standin import StandInServer
    from tests.carla_towns import straight_town

    server = StandInServer({"Straight": straight_town()})
    env = make_env(straight_routes, client_factory=server.client_factory)
    driven = []
    for seed in range(3):
        obs, info = env.reset(seed=seed)
        driven.append(env.unwrapped.route.name.split("#")[1])
        hero = server.world.hero.transform.location
        assert (hero.x < 150) == (driven[-1] == "east")  # the ego really is on that route's start
        assert len(server.world.alive("vehicle")) == 1
        env.step(np.zeros(2, np.float32))
    assert driven == ["east", "west", "east"]
    env.close()
    assert server.world.alive() == [] and server.world.settings.synchronous_mode is False


def test_a_route_file_with_scenarios_says_so_in_one_line(tmp_path, lb2):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("eval", "--route", lb2, "--carla-host", "127.0.0.1", "--carla-port", port,
                     "--out", tmp_path / "eval", timeout=60)
    notes = [line for line in result.stdout.splitlines() if "scenario" in line]
    assert notes == [f"note: {lb2}: 2 Leaderboard scenario(s) ignored; pipeline drives the routes' "
                     f"waypoints, weather and --traffic only"]
    assert_one_line_error(result, "127.0.0.1", str(port))  # no server: the usual one line
