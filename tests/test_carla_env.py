"""The CARLA backend through its real adapter code, against an in-process stand-in of the client API
(tests/carla_standin.py) on real ``carla.Map`` towns; plus the no-server errors and a real-server test."""

import math
import os
import socket
import time

import carla
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from pipeline.envs import make_env
from pipeline.envs.carla_env import CarlaDrivingEnv, from_carla_control
from pipeline.policies import make_policy as make_scripted_policy
from pipeline.envs.routes import Route
from pipeline.envs.spec import INFO_KEYS, ObsSpec
from pipeline.envs.wrappers import FrameStack
from pipeline.errors import PipelineError, SimulatorUnavailableError
from tests import carla_standin
from tests.carla_standin import StandInServer
from tests.carla_towns import loop_town, straight_town
from tests.cli_helpers import assert_one_line_error, run_cli

# the loop's lane -1 runs along CARLA +x at y = +1.75 from x = 0 to 80, then bends (left, seen in a
# right-handed frame) around a 16.75 m radius corner
LOOP_START = (5.0, 1.75, 0.3, 0.0)


def _loop_route(goal=(80.0 + 16.75, -25.0), **kw) -> Route:
    """From the start straight, round the first corner and some way up the next straight (~110 m)."""
    return Route(name="loop", backend="carla", town="Loop", start=LOOP_START, goal=goal,
                 max_steps=kw.pop("max_steps", 600), target_speed=8.0, **kw)


@pytest.fixture
def server():
    return StandInServer({"Loop": loop_town(), "Straight": straight_town()})


def _env(server, route=None, spec=ObsSpec(), **kw) -> CarlaDrivingEnv:
    return CarlaDrivingEnv(route or _loop_route(), spec, client_factory=server.client_factory, **kw)


def _drive(env, policy, seed=0, max_steps=10_000):
    obs, info = env.reset(seed=seed)
    policy.reset(seed)
    rewards, infos = [], [info]
    for _ in range(max_steps):
        obs, reward, terminated, truncated, info = env.step(policy.act(obs, info))
        rewards.append(reward)
        infos.append(info)
        if terminated or truncated:
            break
    return np.array(rewards), infos


def test_obs_contract_and_the_same_info_keys_as_the_embedded_backend(server, racetrack_env):
    env = FrameStack(_env(server), 4)
    obs, info = env.reset(seed=0)
    assert obs["image"].shape == (4, 84, 84) and obs["image"].dtype == np.uint8
    assert obs["vector"].shape == (23,) and obs["vector"].dtype == np.float32
    assert env.observation_space.contains(obs)
    previous = obs
    obs, reward, terminated, truncated, step_info = env.step(np.array([0.0, 1.0], np.float32))
    np.testing.assert_array_equal(obs["image"][:-1], previous["image"][1:])
    assert obs["image"][-1].max() > obs["image"][-1].min(), "the camera frame is blank"
    _, embedded_info = racetrack_env.reset(seed=0)
    assert set(info) == set(step_info) == set(embedded_info)
    assert set(INFO_KEYS) <= set(info)
    assert isinstance(reward, float) and not terminated and not truncated
    env.close()


def test_gymnasium_env_checker_passes(server):
    env = _env(server)
    check_env(env, skip_render_check=True)
    env.close()


def test_vector_fields_select_from_the_full_state_vector(server):
    env = _env(server, spec=ObsSpec(vector_fields="speed,heading_error"))
    obs, info = env.reset(seed=0)
    for _ in range(10):
        obs, *_, info = env.step(np.array([0.2, 1.0], np.float32))
    assert obs["vector"].shape == (2,)
    np.testing.assert_array_equal(obs["vector"], info["state_vector"][[0, 2]])
    assert info["speed"] > 0.5 and obs["vector"][0] == pytest.approx(info["speed"], abs=1e-5)
    env.close()


def test_steer_plus_turns_left_in_the_ego_frame_and_world(server):
    """Our +steer is toward ego +y (left); in CARLA's left-handed frame that is a decreasing yaw."""
    env = _env(server)
    env.reset(seed=0)
    hero = server.world.hero
    yaw0 = hero.transform.rotation.yaw
    for _ in range(30):
        *_, info = env.step(np.array([0.3, 0.6], np.float32))
    assert hero.control.steer < 0, "CARLA steer must be negated"
    assert hero.transform.rotation.yaw < yaw0 - 5.0
    assert info["state_vector"][1] > 0.3, "lateral offset: left of the route is positive"
    assert info["state_vector"][2] > 0.05, "heading error: pointing left of the route is positive"


def test_waypoints_ahead_of_a_left_bend_lie_to_the_left(server):
    """In the right-handed frame the loop's first corner bends left: far waypoints have ego y > 0."""
    env = _env(server)
    obs, info = env.reset(seed=0)
    wp = info["state_vector"][3:].reshape(10, 2)
    np.testing.assert_allclose(wp[:, 0], 4.0 * np.arange(1, 11), atol=0.2)  # straight ahead, 4 m apart
    np.testing.assert_allclose(wp[:, 1], 0.0, atol=0.05)
    expert = make_scripted_policy("expert", env)
    while info["progress_m"] < 60.0:  # 15 m before the bend: the last waypoints are in it
        obs, *_, info = env.step(expert.act(obs, info))
    far = info["state_vector"][3:].reshape(10, 2)[-1]
    assert far[1] > 3.0, f"the bend should show up on the left, got ego y = {far[1]:.2f}"
    env.close()


def test_expert_drives_the_route_with_positive_reward_and_reads_the_vehicle_physics(server):
    env = _env(server)
    # defaults until a vehicle exists; the stand-in's physics differ on purpose
    assert env.vehicle_params["wheelbase_m"] == pytest.approx(2.9)
    env.reset(seed=0)
    assert env.vehicle_params["wheelbase_m"] == pytest.approx(carla_standin.WHEELBASE_M, abs=1e-3)
    assert env.vehicle_params["max_steer_rad"] == pytest.approx(math.radians(carla_standin.MAX_STEER_DEG))
    rewards, infos = _drive(env, make_scripted_policy("expert", env))
    assert infos[-1]["termination"] == "route_done" and infos[-1]["route_completion"] == pytest.approx(1.0)
    lateral = np.array([i["state_vector"][1] for i in infos])
    assert np.abs(lateral).max() < 1.0, "the expert should hold the lane through the bend"
    moving = np.array([i["speed"] for i in infos[1:]]) > 1.0
    assert np.all(rewards[moving] > 0), "making progress along the route is rewarded"
    assert rewards.sum() > 5.0
    assert infos[-1]["progress_m"] == pytest.approx(env._tracker.length, abs=1.0)
    env.close()


def test_standing_still_earns_nothing_and_random_driving_earns_less(server):
    env = _env(server)
    env.reset(seed=0)
    still = [env.step(np.array([0.0, -1.0], np.float32))[1] for _ in range(20)]
    assert max(still) <= 0.0
    random_rewards, _ = _drive(env, make_scripted_policy("random", env), max_steps=200)
    expert_rewards, _ = _drive(env, make_scripted_policy("expert", env), max_steps=200)
    assert expert_rewards.sum() > random_rewards.sum() + 1.0
    env.close()


def test_collision_terminates_with_a_penalty(server):
    env = _env(server)
    env.reset(seed=0)
    library = server.world.get_blueprint_library()
    server.world.spawn_actor(library.find("vehicle.tesla.model3"),
                             carla.Transform(carla.Location(25.0, 1.75, 0.3), carla.Rotation()))
    for _ in range(200):
        obs, reward, terminated, truncated, info = env.step(np.array([0.0, 1.0], np.float32))
        if terminated or truncated:
            break
    assert terminated and info["termination"] == "collision" and info["collision"]
    assert info["collision_kind"] == "vehicle"  # the leaderboard penalises by what was hit
    assert reward < -5.0
    env.close()


def test_leaving_the_road_terminates_as_off_route(server):
    env = _env(server)
    env.reset(seed=0)
    for _ in range(200):
        obs, reward, terminated, truncated, info = env.step(np.array([-1.0, 1.0], np.float32))
        if terminated or truncated:
            break
    assert terminated and info["termination"] == "off_route" and info["off_route"]
    assert reward < -1.0
    env.close()


def test_traffic_walkers_weather_and_synchronous_mode(server):
    env = _env(server, _loop_route(weather="WetNoon"), ObsSpec(traffic=3), walkers=2, tm_port=8123)
    world = server.world
    assert world.settings.synchronous_mode and world.settings.fixed_delta_seconds == pytest.approx(0.05)
    assert world.weather == carla.WeatherParameters.WetNoon
    env.reset(seed=1)
    tm = server.traffic_managers[8123]
    assert tm.synchronous and tm.seed == 1
    cars = [a for a in world.alive("vehicle") if a.attributes.get("role_name") == "autopilot"]
    assert len(cars) == 3 and all(c.autopilot_port == 8123 for c in cars)
    assert all(c.transform.location.distance(carla.Location(*LOOP_START[:3])) > 15.0 for c in cars)
    controllers = world.alive("controller")
    assert len(world.alive("walker")) == 2 and all(c.started and c.destination for c in controllers)
    # a new episode replaces the old actors rather than piling them up
    env.reset(seed=2)
    assert len(world.alive("vehicle")) == 4 and len(world.alive("sensor")) == 3
    env.close()


def test_close_destroys_every_actor_and_restores_the_settings(server):
    original = server.world.get_settings()
    env = _env(server, spec=ObsSpec(traffic=2), walkers=1)
    env.reset(seed=0)
    env.step(np.zeros(2, np.float32))
    assert len(server.world.alive()) == 1 + 3 + 2 + 2  # ego, sensors, cars, walker + controller
    env.close()
    env.close()  # twice is fine
    assert server.world.alive() == []
    assert server.world.settings == original and server.world.settings_applied[-1] == original
    assert not server.traffic_managers[8000].synchronous
    with pytest.raises(PipelineError, match="closed"):
        env.reset(seed=0)


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), RuntimeError("rpc::rpc_error during call in function tick")])
def test_an_exception_in_step_cleans_up_and_propagates(server, failure):
    original = server.world.get_settings()
    env = _env(server, spec=ObsSpec(traffic=2))
    env.reset(seed=0)
    server.world.fail_next_tick = failure
    with pytest.raises(type(failure)):
        env.step(np.zeros(2, np.float32))
    assert server.world.alive() == []
    assert server.world.settings == original
    assert not server.traffic_managers[8000].synchronous
    with pytest.raises(PipelineError, match="closed"):
        env.step(np.zeros(2, np.float32))


def test_a_failing_setup_restores_the_settings(server):
    original = server.world.get_settings()
    with pytest.raises(PipelineError, match="weather"):
        _env(server, _loop_route(weather="SunnyMars"))
    assert server.world.settings == original and server.world.alive() == []


def test_a_crashed_server_is_reported_as_such(server):
    env = _env(server)
    env.reset(seed=0)
    server.crash()
    started = time.monotonic()
    with pytest.raises(SimulatorUnavailableError, match="stopped answering.*crashed or restarted"):
        env.step(np.zeros(2, np.float32))
    env.close()  # no cleanup calls against a dead server, no hang
    assert time.monotonic() - started < 1.0


def test_a_restarted_server_is_reported_as_such(server):
    env = _env(server)
    env.reset(seed=0)
    server.restart()
    with pytest.raises(SimulatorUnavailableError, match="restarted"):
        env.reset(seed=1)


def test_the_route_town_is_loaded_and_the_old_settings_come_back(server):
    server = StandInServer({"Loop": loop_town(), "Straight": straight_town()}, town="Straight")
    original = server.world.get_settings()
    env = _env(server)
    assert server.world.town == "Loop"
    env.reset(seed=0)
    env.close()
    assert server.world.settings == original and server.world.alive() == []


def test_autopilot_records_the_control_that_carla_applied(server):
    env = FrameStack(_env(server), 4)
    policy = make_scripted_policy("autopilot", env)
    obs, info = env.reset(seed=0)
    hero = server.world.hero
    tm = server.traffic_managers[8000]
    assert hero.autopilot_port == 8000 and tm.synchronous
    assert tm.desired_speed_kmh[hero.id] == pytest.approx(3.6 * 8.0) and hero.id in tm.paths
    completions = []
    for _ in range(400):
        action = policy.act(obs, info)
        applied = from_carla_control(hero.get_control())  # what moved the car in the tick just run
        np.testing.assert_array_equal(action, applied)
        # the env ignores the action passed to step: the TrafficManager drives
        obs, reward, terminated, truncated, info = env.step(np.array([1.0, -1.0], np.float32))
        completions.append(info["route_completion"])
        if terminated or truncated:
            break
    assert info["termination"] == "route_done", "the autopilot follows our route to its end"
    assert np.all(np.diff(completions) >= 0)
    env.close()


def test_autopilot_on_an_embedded_route_is_a_one_line_error(racetrack_env):
    with pytest.raises(PipelineError, match="CARLA route") as err:
        make_scripted_policy("autopilot", racetrack_env)
    assert "\n" not in str(err.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_fails_fast_with_one_helpful_line():
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(SimulatorUnavailableError) as err:
        env = make_env("town03", host="127.0.0.1", port=port)
        env.reset(seed=0)
    assert time.monotonic() - started < 5.0
    message = str(err.value)
    assert "\n" not in message
    for needle in (f"127.0.0.1:{port}", "0.9.16", "CarlaUE4.sh -RenderOffScreen", "carlasim/carla:0.9.16", "racetrack"):
        assert needle in message


def test_collect_on_a_carla_route_without_a_server_is_one_line(tmp_path):
    port = _closed_port()
    result = run_cli("collect", "--route", "town03", "--episodes", "1", "--out", tmp_path / "a.zarr",
                     "--carla-host", "127.0.0.1", "--carla-port", port, "--quiet", timeout=120)
    assert_one_line_error(result, f"127.0.0.1:{port}", "0.9.16")
    assert not (tmp_path / "a.zarr").exists(), "no store may be created when the server is unreachable"


@pytest.mark.carla
@pytest.mark.skipif(not os.environ.get("CARLA_HOST"), reason="needs a CARLA 0.9.16 server: set CARLA_HOST")
def test_collect_and_eval_against_a_real_server(tmp_path):
    out = tmp_path / "carla.zarr"
    result = run_cli("collect", "--route", "town03", "--episodes", "1", "--max-steps", "40", "--policy", "autopilot",
                     "--out", out, "--quiet", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "1/1 episodes" in result.stdout
    result = run_cli("eval", "--policy", "expert", "--route", "town03", "--episodes", "1", "--max-steps", "40",
                     "--out", tmp_path / "eval", "--quiet", timeout=600)
    assert result.returncode == 0, result.stderr
    env = make_env("town03", max_steps=5)
    try:
        obs, info = env.reset(seed=0)
        assert obs["image"].shape == (4, 84, 84) and obs["image"].std() > 0
        obs, reward, *_ = env.step(np.array([0.0, 0.5], np.float32))
        assert np.isfinite(reward)
    finally:
        env.close()


def test_collision_kinds_follow_the_other_actors_blueprint():
    from pipeline.envs.carla_env import collision_kind

    assert collision_kind("walker.pedestrian.0001") == "pedestrian"
    assert collision_kind("vehicle.audi.tt") == "vehicle"
    assert collision_kind("static.prop.streetbarrier") == "static"
    assert collision_kind("") == "static"  # buildings, poles and the like come without a blueprint


def _camera_sensor(server):
    world = server.world
    return next(a for a in world.alive("sensor.camera"))


def test_bev_camera_is_a_semantic_camera_looking_down_from_above_the_ego(server):
    from pipeline.envs import bev

    env = FrameStack(_env(server), 4)
    obs, _ = env.reset(seed=0)
    camera = _camera_sensor(server)
    assert camera.type_id == "sensor.camera.semantic_segmentation"
    assert camera.parent is server.world.hero, "attached to the ego, so it turns with the car"
    x, height = bev.carla_camera_placement(84, 90.0)
    loc, rot = camera.transform.location, camera.transform.rotation
    assert (loc.x, loc.y, loc.z) == pytest.approx((x, 0.0, height))
    assert (rot.pitch, rot.yaw, rot.roll) == pytest.approx((-90.0, 0.0, 0.0))
    assert float(camera.attributes["fov"]) == 90.0 and camera.attributes["image_size_x"] == "168"
    # its ground footprint is the embedded view's: 48 m across, the ego 38 m from the top edge
    assert 2 * height * math.tan(math.radians(45.0)) == pytest.approx(bev.VIEW_SIZE_M)
    assert x + bev.VIEW_SIZE_M / 2 == pytest.approx(bev.VIEW_AHEAD_M)
    # CARLA's semantic tags come out as the embedded view's grey levels
    frame = obs["image"][-1]
    assert frame[:, 2].max() == bev.OFF_ROAD and frame[:, 30].min() == bev.ROAD
    assert frame[:, 42].max() >= bev.LANE_MARKING - 1 and frame.max() == bev.VEHICLE
    assert env.unwrapped.obs_spec.camera == "bev"
    env.close()


def test_front_camera_keeps_the_bonnet_rgb_camera(server):
    from pipeline.envs.carla_env import FRONT_CAMERA_TRANSFORM

    env = _env(server, spec=ObsSpec(camera="front"))
    env.reset(seed=0)
    camera = _camera_sensor(server)
    assert camera.type_id == "sensor.camera.rgb"
    (x, y, z), (pitch, _, _) = FRONT_CAMERA_TRANSFORM
    assert (camera.transform.location.x, camera.transform.location.z) == pytest.approx((x, z))
    assert camera.transform.rotation.pitch == pytest.approx(pitch)
    env.close()


def test_the_expert_stops_behind_a_traffic_car_standing_in_its_lane(server):
    # info["lead_distance_m"] comes from the TrafficManager's cars (the client's copy of their
    # poses): the expert keeps its gap where, blind, it drove into them
    env = _env(server, spec=ObsSpec(traffic=1))
    expert = make_scripted_policy("expert", env)
    expert.reset(0)
    obs, info = env.reset(seed=0)
    car = next(a for a in server.world.alive("vehicle") if a.attributes.get("role_name") == "autopilot")
    car.set_autopilot(False)
    car.speed, car.control = 0.0, carla.VehicleControl(brake=1.0)
    car.transform = carla.Transform(carla.Location(35.0, 1.75, 0.3), carla.Rotation())
    obs, _, _, _, info = env.step(np.zeros(2, np.float32))
    assert info["lead_distance_m"] == pytest.approx(30.0, abs=1.0) and info["lead_speed"] == 0.0
    for _ in range(300):
        obs, reward, terminated, truncated, info = env.step(expert.act(obs, info))
        if terminated or truncated:
            break
    assert not info["collision"] and info["speed"] < 0.5
    assert 5.0 < info["lead_distance_m"] < 5.0 + 3.0 + 4.0
    env.close()
