"""Red-light and stop-sign infractions (Leaderboard 1.0 rules) on the CARLA backend, against the
stand-in extended with scripted traffic lights and stop signs, through info, metrics and eval's report."""

import json

import carla
import numpy as np
import pytest

from pipeline.envs.carla_env import CarlaDrivingEnv
from pipeline.envs.carla_infractions import segments_cross
from pipeline.policies import make_policy as make_scripted_policy
from pipeline.envs.routes import Route
from pipeline.eval.metrics import EpisodeTracker
from tests.carla_standin import VEHICLE_HALF_LENGTH_M, StandInServer
from tests.carla_towns import straight_town

RED, GREEN = carla.TrafficLightState.Red, carla.TrafficLightState.Green
# straight town: lane -1 runs along CARLA +x at y = +1.75; lane 1 (the other way) at y = -1.75
ROUTE = Route(name="straight", backend="carla", town="Straight", start=(5.0, 1.75, 0.3, 0.0), goal=(160.0, 1.75),
              max_steps=700, target_speed=8.0)
LINE_X = 100.0


@pytest.fixture
def server():
    return StandInServer({"Straight": straight_town()})


class StopsBefore:
    """The expert, except that it brakes to a standstill once, when its x passes ``x``."""

    def __init__(self, env, world, x: float):
        self.expert, self.world, self.x = make_scripted_policy("expert", env), world, x
        self.stopped = False

    def reset(self, seed):
        self.expert.reset(seed)
        self.stopped = False

    def act(self, obs, info):
        hero = self.world.hero
        if not self.stopped and hero.transform.location.x > self.x:
            if hero.speed < 0.01:
                self.stopped = True
            return np.array([0.0, -1.0], np.float32)
        return self.expert.act(obs, info)


def _episode(server, policy=None):
    env = CarlaDrivingEnv(ROUTE, client_factory=server.client_factory)
    policy = policy(env) if policy else make_scripted_policy("expert", env)
    policy.reset(0)
    obs, info = env.reset(seed=0)
    tracker = EpisodeTracker(ROUTE.name, 0)
    tracker.reset(info)
    events = []
    while True:
        obs, reward, terminated, truncated, info = env.step(policy.act(obs, info))
        tracker.step(reward, info)
        if info["red_light"] or info["stop_sign"]:
            events.append(("red_light" if info["red_light"] else "stop_sign", server.world.hero.transform.location.x))
        if terminated or truncated:
            env.close()
            return tracker.finish(), events, info


def test_segments_cross():
    assert segments_cross((0, 0), (2, 0), (1, -1), (1, 1))
    assert not segments_cross((0, 0), (0.9, 0), (1, -1), (1, 1))
    assert segments_cross((0, 0), (1, 0), (1, -1), (1, 1))  # touching counts
    assert not segments_cross((0, 0), (2, 0), (0, 1), (2, 1))  # parallel


def test_running_a_red_light_is_one_infraction_when_the_tail_passes_the_stop_line(server):
    server.world.add_traffic_light((LINE_X, 1.75), state=RED)
    metrics, events, info = _episode(server)
    assert info["termination"] == "route_done"
    assert [kind for kind, _ in events] == ["red_light"]
    # counted when the tail (0.8 to 1.0 half lengths + 1 m behind the centre) is over the line
    x = events[0][1]
    assert LINE_X + 0.8 * VEHICLE_HALF_LENGTH_M - 0.5 <= x <= LINE_X + VEHICLE_HALF_LENGTH_M + 1.0 + 0.5
    assert metrics.red_lights == 1 and metrics.stop_signs == 0
    assert metrics.infraction_penalty == pytest.approx(0.70, abs=0.02)  # (x (1 - off-route share))


@pytest.mark.parametrize("stop_at, state", [((LINE_X, 1.75), GREEN), ((LINE_X, -1.75), RED)],
                         ids=["green", "red-for-the-other-direction"])
def test_a_green_light_or_a_light_of_another_lane_is_no_infraction(server, stop_at, state):
    server.world.add_traffic_light(stop_at, state=state)
    metrics, events, _ = _episode(server)
    assert events == [] and metrics.red_lights == 0


def test_a_light_turning_red_after_the_car_passed_is_no_infraction(server):
    light = server.world.add_traffic_light((LINE_X, 1.75), state=GREEN)

    class TurnsRedBehind(StopsBefore):
        def act(self, obs, info):
            if self.world.hero.transform.location.x > LINE_X + 2 * VEHICLE_HALF_LENGTH_M + 2.0:
                light.set_state(RED)
            return self.expert.act(obs, info)

    metrics, events, _ = _episode(server, lambda env: TurnsRedBehind(env, server.world, LINE_X))
    assert light.state == RED and events == []


def test_passing_a_stop_sign_without_stopping_is_one_infraction(server):
    server.world.add_stop_sign((LINE_X, 1.75))
    metrics, events, _ = _episode(server)
    assert [kind for kind, _ in events] == ["stop_sign"]
    assert events[0][1] > LINE_X  # counted when the car leaves the sign's area
    assert metrics.stop_signs == 1 and metrics.red_lights == 0
    assert metrics.infraction_penalty == pytest.approx(0.80, abs=0.02)


@pytest.mark.parametrize("brake_at", [LINE_X - 12.0, LINE_X - 2.0], ids=["before-the-area", "in-the-area"])
def test_stopping_at_a_stop_sign_is_no_infraction(server, brake_at):
    server.world.add_stop_sign((LINE_X, 1.75))
    metrics, events, info = _episode(server, lambda env: StopsBefore(env, server.world, brake_at))
    assert info["termination"] == "route_done"
    assert events == [] and metrics.stop_signs == 0


def test_stopping_far_before_the_stop_sign_does_not_count_as_stopping_for_it(server):
    server.world.add_stop_sign((LINE_X, 1.75))
    metrics, events, _ = _episode(server, lambda env: StopsBefore(env, server.world, LINE_X - 40.0))
    assert [kind for kind, _ in events] == ["stop_sign"]


def test_eval_reports_red_lights_and_stop_signs_per_route_and_in_the_leaderboard_figures(server, tmp_path):
    from pipeline.eval.runner import EvalConfig, evaluate

    server.world.add_traffic_light((LINE_X, 1.75), state=RED)
    server.world.add_stop_sign((130.0, 1.75))
    routes = tmp_path / "straight.xml"
    routes.write_text('<routes><route id="1" town="Straight">'
                      '<waypoint x="5" y="1.75" z="0" yaw="0"/><waypoint x="160" y="1.75" z="0" yaw="0"/>'
                      '</route></routes>')
    report = evaluate(EvalConfig(out=str(tmp_path / "eval"), routes=(str(routes),), episodes=1,
                                 simulator={"client_factory": server.client_factory}), progress=False)
    (row,) = report["episodes"]
    assert (row["route"], row["red_lights"], row["stop_signs"]) == (f"{routes}#1", 1, 1)
    board = report["summary"]["expert"]["leaderboard"]
    assert board["infractions"]["red_light"] == 1 and board["infractions"]["stop_infraction"] == 1
    km = board["distance_km"]
    assert board["infractions_per_km"]["red_light"] == pytest.approx(1 / km)
    assert board["infraction_penalty"] == pytest.approx(0.70 * 0.80, abs=0.02)
    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert on_disk["summary"]["expert"]["leaderboard"] == board
