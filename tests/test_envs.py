"""Env contract on the embedded backend (DESIGN section 3)."""

import json

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from pipeline.envs import get_route, list_routes, make_env
from pipeline.policies import make_policy as make_scripted_policy
from pipeline.envs.spec import INFO_KEYS, TERMINATIONS, VECTOR_FIELDS, ObsSpec
from pipeline.errors import SpecMismatchError, UnknownRouteError


def _rollout(env, seed, actions):
    obs, info = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        obs, *_ = env.step(a)
        out.append(obs)
    return out


def test_gymnasium_env_checker_passes(racetrack_env):
    check_env(racetrack_env.unwrapped, skip_render_check=True)
    check_env(racetrack_env, skip_render_check=True)


def test_obs_and_action_contract(racetrack_env):
    obs, info = racetrack_env.reset(seed=3)
    assert obs["image"].shape == (4, 84, 84) and obs["image"].dtype == np.uint8
    assert obs["vector"].shape == (23,) and obs["vector"].dtype == np.float32
    assert len(VECTOR_FIELDS) == 23
    assert racetrack_env.action_space.shape == (2,)
    assert racetrack_env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = racetrack_env.step(np.zeros(2, np.float32))
    assert set(INFO_KEYS) <= set(info)
    assert info["termination"] is None or info["termination"] in TERMINATIONS
    assert 0.0 <= info["route_completion"] <= 1.0
    assert obs["image"].max() > obs["image"].min(), "the camera frame is blank"


def test_reset_is_deterministic_for_a_seed(racetrack_env):
    actions = [np.array([0.1, 0.5], np.float32)] * 15
    a = _rollout(racetrack_env, 7, actions)
    b = _rollout(racetrack_env, 7, actions)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["vector"], y["vector"])
    c = _rollout(racetrack_env, 8, actions[:1])
    assert not np.array_equal(a[0]["vector"], c[0]["vector"]), "different seeds should start differently"


def test_highway_envs_own_observation_is_never_computed(monkeypatch):
    """We draw our own frames and vector; highway-env's kinematics table (built with pandas) was
    computed and thrown away at every reset, ~30% of a reset."""
    from highway_env.envs.common.observation import KinematicObservation

    def fail(self):
        raise AssertionError("highway-env's observation was computed")

    env = make_env("racetrack")
    monkeypatch.setattr(KinematicObservation, "observe", fail)
    for seed in (0, 1):
        obs, _ = env.reset(seed=seed)
        for _ in range(3):
            obs, *_ = env.step(np.zeros(2, np.float32))
        assert obs["image"].shape == (4, 84, 84)
    env.close()


def test_frame_stack_invariant(racetrack_env):
    observations = _rollout(racetrack_env, 1, [np.array([0.0, 0.3], np.float32)] * 12)
    for prev, nxt in zip(observations, observations[1:]):
        np.testing.assert_array_equal(nxt["image"][:-1], prev["image"][1:])


def test_vector_fields_subset_and_traffic_option():
    env = make_env("racetrack", vector_fields="speed", traffic=3)
    obs, info = env.reset(seed=0)
    assert obs["vector"].shape == (1,)
    assert env.unwrapped.obs_spec.vector_fields == ("speed",)
    assert env.unwrapped.obs_spec.traffic == 3
    assert len(env.unwrapped._sim.road.vehicles) == 4  # ego + exactly 3 others
    assert obs["vector"][0] == pytest.approx(info["state_vector"][0])
    env.close()
    with pytest.raises(SpecMismatchError, match="unknown vector field"):
        ObsSpec(vector_fields="speed,warp_drive")


def test_obs_spec_round_trips_and_names_mismatches():
    spec = ObsSpec(vector_fields="speed,heading_error", traffic=2)
    assert ObsSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.mismatch(ObsSpec()) == ["vector_fields", "traffic"]
    with pytest.raises(SpecMismatchError, match="traffic"):
        spec.check_compatible(ObsSpec(vector_fields="speed,heading_error"), "store x")


def test_unknown_route_lists_known_routes():
    with pytest.raises(UnknownRouteError) as err:
        get_route("town99")
    assert "racetrack" in str(err.value) and "racetrack-oval" in str(err.value)


def test_route_files_lengths_match_the_tracks():
    for route in list_routes("embedded"):
        env = make_env(route)
        env.reset(seed=0)
        measured = env.unwrapped._tracker.length
        assert measured == pytest.approx(route.length_m, rel=0.2), route.name
        env.close()


def _drive(env, policy, seed):
    obs, info = env.reset(seed=seed)
    policy.reset(seed)
    total, steps = 0.0, 0
    while True:
        obs, reward, terminated, truncated, info = env.step(policy.act(obs, info))
        total += reward
        steps += 1
        if terminated or truncated:
            return info, total, steps


def test_expert_completes_a_racetrack_lap_and_beats_random(racetrack_env):
    expert = make_scripted_policy("expert", racetrack_env, noise=0.1, seed=0)
    info, expert_return, steps = _drive(racetrack_env, expert, seed=0)
    assert info["route_completion"] >= 0.9
    assert info["termination"] == "route_done"
    random_info, random_return, _ = _drive(racetrack_env, make_scripted_policy("random", racetrack_env), seed=0)
    assert random_info["route_completion"] < info["route_completion"]
    assert expert_return > random_return + 10.0


def test_leaving_the_road_terminates_with_a_penalty(racetrack_env):
    racetrack_env.reset(seed=0)
    for _ in range(200):
        obs, reward, terminated, truncated, info = racetrack_env.step(np.array([1.0, 1.0], np.float32))
        if terminated or truncated:
            break
    assert terminated and info["termination"] in ("off_route", "collision")
    assert reward < -1.0


# -- the expert keeps its distance to traffic ---------------------------------------------------


def test_lead_vehicle_is_the_nearest_one_ahead_in_the_route_corridor():
    from pipeline.envs.driving import RouteTracker

    tracker = RouteTracker(np.array([[0.0, 0.0], [200.0, 0.0]]))  # a straight route along +x
    positions = [[30.0, 0.5],    # ahead, in the lane: 20 m ahead of the ego at x = 10
                 [25.0, 4.0],    # nearer, but in the next lane
                 [5.0, 0.0],     # in the lane, behind
                 [70.0, 0.0],    # in the lane, beyond the horizon
                 [45.0, -1.0]]   # in the lane, further than the first
    speeds = [3.0, 9.0, 9.0, 9.0, 5.0]
    assert tracker.lead_vehicle(10.0, positions, speeds) == pytest.approx((20.0, 3.0))
    assert tracker.lead_vehicle(10.0, positions[1:], speeds[1:]) == pytest.approx((35.0, 5.0))
    assert tracker.lead_vehicle(10.0, positions[1:4], speeds[1:4]) == (float("inf"), float("inf"))
    assert tracker.lead_vehicle(10.0, np.zeros((0, 2)), [])[0] == float("inf")
    # on a closed route the stretch ahead continues across the finish line
    loop = RouteTracker(np.array([[0.0, 0.0], [100.0, 0.0], [100.0, 100.0], [0.0, 100.0], [0.0, 0.0]]), closed=True)
    assert loop.lead_vehicle(390.0, [[5.0, 0.0]], [1.0])[0] == pytest.approx(15.0)


def _stopped_car_ahead(env, metres: float):
    """A car standing still in the ego's lane ``metres`` ahead (after ``env.reset``)."""
    from highway_env.vehicle.kinematics import Vehicle

    base = env.unwrapped
    ego, road = base._sim.vehicle, base._sim.road
    lane = road.network.get_lane(ego.lane_index)
    s, _ = lane.local_coordinates(ego.position)
    road.vehicles.append(Vehicle(road, lane.position(s + metres, 0.0), lane.heading_at(s + metres), speed=0.0))


@pytest.mark.parametrize("sees_traffic", [True, False])
def test_the_expert_stops_behind_a_car_in_its_lane_where_blind_it_drove_into_it(sees_traffic):
    # before the expert read info["lead_distance_m"] it drove into slower cars: datasets recorded
    # with traffic taught crashing into them
    env = make_env("racetrack", traffic=0)
    expert = make_scripted_policy("expert", env)
    expert.reset(0)
    obs, info = env.reset(seed=0)
    _stopped_car_ahead(env, 30.0)
    obs, _, _, _, info = env.step(np.zeros(2, np.float32))
    assert 30.0 - info["speed"] * 0.2 - 1.0 < info["lead_distance_m"] < 30.0  # the ego drove one step on
    assert info["lead_speed"] == 0.0
    for _ in range(45):
        seen = info if sees_traffic else {k: v for k, v in info.items() if not k.startswith("lead_")}
        obs, reward, terminated, truncated, info = env.step(expert.act(obs, seen))
        if terminated or truncated:
            break
    if sees_traffic:
        assert not terminated and info["speed"] < 0.5
        assert 5.0 + 1.0 < info["lead_distance_m"] < 5.0 + 3.0 + 4.0  # bumpers 1-7 m apart, stopped
    else:
        assert terminated and info["termination"] == "collision"
    env.close()


@pytest.mark.parametrize("route", ["racetrack", "racetrack-oval", "racetrack-large"])
def test_nearest_lane_index_gives_highway_envs_answer(route):
    """Our nearest-lane query measures fewer lanes; it must name the lane highway-env names, for
    any position and heading, on and off the road (and with no heading)."""
    from highway_env.road.road import RoadNetwork

    from pipeline.envs.lanes import NearestLaneIndex

    env = make_env(route)
    env.reset(seed=0)
    network = env.unwrapped._sim.road.network  # the env answers its queries with a NearestLaneIndex
    assert isinstance(network.get_closest_lane_index, NearestLaneIndex)
    fast = NearestLaneIndex(network)
    assert len(fast.lanes) >= 18
    rng = np.random.default_rng(0)
    lo, hi = fast.lo.min(axis=0) - 30.0, fast.hi.max(axis=0) + 30.0
    on_lanes = [lane.position(rng.uniform(0, lane.length), rng.uniform(-3, 3)) for lane in fast.lanes for _ in range(40)]
    positions = list(rng.uniform(lo, hi, size=(3000, 2))) + on_lanes + [np.array([np.nan, 1.0])]
    for position in positions:
        for heading in (rng.uniform(-np.pi, np.pi), None):
            assert fast(position, heading) == RoadNetwork.get_closest_lane_index(network, position, heading)
    env.close()


def driven(seed: int = 3, traffic: int = 3) -> list:
    """(obs, reward) of every step of one episode driven by fixed random actions."""
    actions = np.random.default_rng(1).uniform(-1, 1, size=(120, 2)).astype(np.float32)
    env = make_env("racetrack", traffic=traffic)
    obs, _ = env.reset(seed=seed)
    steps = [(obs, None)]
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        steps.append((obs, reward))
        if terminated or truncated:
            break
    env.close()
    return steps


def assert_same_episode(run: list, other: list) -> None:
    assert len(run) == len(other) > 10
    for (obs, reward), (other_obs, other_reward) in zip(run, other):
        np.testing.assert_array_equal(obs["image"], other_obs["image"])
        np.testing.assert_array_equal(obs["vector"], other_obs["vector"])
        assert reward == other_reward


def test_episodes_are_the_same_with_highway_envs_nearest_lane_query(monkeypatch):
    from pipeline.envs.lanes import NearestLaneIndex

    fast = driven()
    monkeypatch.setattr(NearestLaneIndex, "install", staticmethod(lambda network: False))
    assert_same_episode(fast, driven())


def test_episodes_are_the_same_with_highway_envs_whole_step(monkeypatch):
    # we skip the reward, flags and info highway-env's step computes; the simulation must not change
    from pipeline.envs import embedded

    ours = driven()
    monkeypatch.setattr(embedded, "_advance", lambda sim, action: sim.step(action))
    assert_same_episode(ours, driven())


def reference_frame(camera, ego, vehicles) -> np.ndarray:
    """The car-mounted view computed plainly: each sub-pixel's map pixel by 2-D indexing, the
    vehicles painted, each 2 x 2 block averaged by a reshape (float32 maths as the camera's)."""
    from pipeline.envs import bev
    from pipeline.envs.embedded import SUPERSAMPLE

    c, s = np.float32(np.cos(ego.heading)), np.float32(np.sin(ego.heading))
    x0, y0 = ((np.asarray(ego.position) - camera.origin) * camera.scale).astype(np.float32)
    x = (x0 + camera._forward_px * c)[:, None] + (-camera._left_px * s)[None, :]
    y = (y0 + camera._forward_px * s)[:, None] + (camera._left_px * c)[None, :]
    rows = np.clip(x, 0, camera.map.shape[0] - 1).astype(np.int64)
    cols = np.clip(y, 0, camera.map.shape[1] - 1).astype(np.int64)
    view = camera.map.astype(np.uint16)[rows, cols]
    footprints = [camera._footprint(0.0, 0.0, 0.0, ego.LENGTH, ego.WIDTH)]
    cos, sin = np.cos(ego.heading), np.sin(ego.heading)
    for vehicle in vehicles:
        if vehicle is not ego:
            dx, dy = np.asarray(vehicle.position, np.float64) - ego.position
            fwd, lft = cos * dx + sin * dy, -sin * dx + cos * dy  # its centre in the ego's frame
            if max(abs(fwd), abs(lft)) <= bev.VIEW_SIZE_M:
                heading = vehicle.heading - ego.heading
                footprints.append(camera._footprint(fwd, lft, heading, vehicle.LENGTH, vehicle.WIDTH))
    for footprint in footprints:
        if footprint is not None:
            r, k, inside = footprint
            view[r, k][inside] = bev.VEHICLE
    n = view.shape[0] // SUPERSAMPLE
    sums = view.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).sum(axis=(1, 3))
    return ((sums + SUPERSAMPLE**2 // 2) // SUPERSAMPLE**2).astype(np.uint8)


def test_the_camera_draws_what_the_plain_reference_draws_anywhere_with_traffic():
    env = make_env("racetrack", traffic=4)
    env.reset(seed=1)
    sim = env.unwrapped._sim
    camera, ego = env.unwrapped._camera, sim.vehicle
    rng = np.random.default_rng(0)
    extent = np.asarray(camera.map.shape) / camera.scale
    for _ in range(60):  # on and off the map (edges clamp), any heading, the traffic about
        ego.position = camera.origin + rng.uniform(-20, extent + 20)
        ego.heading = rng.uniform(-4, 4)
        for vehicle in sim.road.vehicles:
            if vehicle is not ego:
                vehicle.position = ego.position + rng.uniform(-25, 25, 2)
        frame = camera.render(ego, sim.road.vehicles)
        assert frame.dtype == np.uint8 and frame.shape == (84, 84)
        np.testing.assert_array_equal(frame, reference_frame(camera, ego, sim.road.vehicles))
    env.close()


def sampled_lap(network, lane_id: int) -> np.ndarray:
    """The lap's centre line sampled from scratch, as every reset did before it was kept."""
    points, node = [], "a"
    for _ in range(len(network.graph)):
        following = next(iter(network.graph[node]))
        lane = network.graph[node][following][min(lane_id, len(network.graph[node][following]) - 1)]
        points.extend(lane.position(s, 0.0) for s in np.arange(0.0, lane.length, 1.0))
        node = following
        if node == "a":
            break
    return np.asarray(points)


@pytest.mark.parametrize("route", ["racetrack", "racetrack-large", "racetrack-oval"])
def test_the_kept_lap_centre_line_is_the_one_sampled_anew_for_every_lane_and_reset(route):
    from pipeline.envs import lanes

    env = make_env(route)
    for seed in range(3):
        env.reset(seed=seed)
        network = env.unwrapped._sim.road.network
        for lane_id in range(4):  # past the roads' lane counts too: the highest lane is taken
            kept = lanes.lap_centre_line(network, lane_id)
            assert_bits_equal_arrays(kept, sampled_lap(network, lane_id))
            assert not kept.flags.writeable  # shared by every reset: nobody may change it
            assert lanes.lap_centre_line(network, lane_id) is kept  # sampled once
    env.close()


def assert_bits_equal_arrays(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_a_lap_of_lanes_of_another_shape_is_sampled_every_time():
    from highway_env.road.lane import SineLane, StraightLane
    from highway_env.road.road import RoadNetwork

    from pipeline.envs import lanes

    network = RoadNetwork()
    network.add_lane("a", "b", StraightLane([0, 0], [40, 0]))
    network.add_lane("b", "a", SineLane([40, 0], [0, 0], amplitude=2.0, pulsation=0.3, phase=0.0))
    first = lanes.lap_centre_line(network, 0)
    assert_bits_equal_arrays(first, sampled_lap(network, 0))
    assert lanes.lap_centre_line(network, 0) is not first
