"""The car-mounted view and the task it serves (issue: a learnable task in the embedded simulator).

The view: heading-up and fixed to the car on the embedded backend, so a frame after a 90-degree
turn looks like one before it; the road, its lines and other cars are told apart by grey level.
The task: no parking optimum (stopping and waiting returns less than leaving the road at once),
no reward for speeding past the route's target speed, and expert labels next to noisy actions.
"""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from highway_env.road.lane import CircularLane, LineType, StraightLane
from highway_env.road.road import Road, RoadNetwork

from pipeline.datasets.replay import DictReplayBuffer
from pipeline.datasets.store import TransitionStore
from pipeline.envs import bev, list_routes, make_env
from pipeline.envs.driving import REWARD_VERSION, RewardConfig, driving_reward
from pipeline.envs.embedded import STEP_SECONDS, BevCamera
from pipeline.policies import make_policy as make_scripted_policy
from pipeline.envs.spec import ObsSpec
from pipeline.errors import PipelineError, SpecMismatchError
from tests.cli_helpers import assert_one_line_error, collected_store, run_cli

LANE_WIDTH = 5.0
TURN_RADIUS = 30.0


def _bend_road() -> Road:
    """100 m east, a 90-degree left-hand bend (toward +y), then 100 m north. One lane, a dashed
    line on one side and a solid one on the other, so a mirrored picture would not match."""
    lines = (LineType.STRIPED, LineType.CONTINUOUS)
    net = RoadNetwork()
    net.add_lane("a", "b", StraightLane([0, 0], [100, 0], width=LANE_WIDTH, line_types=lines))
    net.add_lane("b", "c", CircularLane([100, TURN_RADIUS], TURN_RADIUS, -np.pi / 2, 0, clockwise=True,
                                        width=LANE_WIDTH, line_types=lines))
    net.add_lane("c", "d", StraightLane([100 + TURN_RADIUS, TURN_RADIUS], [100 + TURN_RADIUS, TURN_RADIUS + 100],
                                        width=LANE_WIDTH, line_types=lines))
    return Road(network=net, vehicles=[])


def _car(x, y, heading, length=5.0, width=2.0):
    return SimpleNamespace(position=np.array([x, y], float), heading=heading, LENGTH=length, WIDTH=width)


def test_the_view_turns_with_the_car():
    camera = BevCamera(_bend_road(), 84)
    # 50 m into the first and into the last straight: only straight road within the view
    before = _car(50.0, 0.0, 0.0)
    after = _car(100 + TURN_RADIUS, TURN_RADIUS + 50.0, np.pi / 2)
    a = camera.render(before, [before]).astype(int)
    b = camera.render(after, [after]).astype(int)
    # the tolerance covers rasterising lines along x vs along y (a pixel's shift, dash ends)
    assert np.abs(a - b).mean() < 3.0, "after a 90-degree turn the car must see the same layout"
    assert np.mean(np.abs(a - b) > 50) < 0.04
    # a world-aligned view would show the second road turned by 90 degrees: that is far off
    assert np.abs(a - np.rot90(b).astype(int)).mean() > 20.0
    # the road runs straight up the frame from the ego: road pixels ahead, off-road at the sides
    row, col = (int(v) for v in bev.ego_pixel(84))
    assert a[5, col] >= bev.ROAD - 1 and a[5, 2] == bev.OFF_ROAD and a[5, 81] == bev.OFF_ROAD


def test_road_lines_and_vehicles_have_their_own_grey_levels():
    camera = BevCamera(_bend_road(), 84)
    ego, other = _car(20.0, 0.0, 0.0), _car(40.0, 0.0, 0.3)  # another car 20 m ahead, askew
    frame = camera.render(ego, [ego, other])
    ppm = bev.pixels_per_m(84)
    row, col = bev.ego_pixel(84)
    assert frame[int(row), int(col)] == bev.VEHICLE, "the ego is drawn where the view puts it"
    assert frame[int(row - 20 * ppm), int(col)] == bev.VEHICLE, "the car ahead stands out"
    assert frame[int(row - 10 * ppm), int(col)] == bev.ROAD  # open road between them
    values = set(np.unique(frame).tolist())
    assert {bev.OFF_ROAD, bev.ROAD, bev.VEHICLE} <= values
    # lane lines are brighter than the road they are painted on (anti-aliased at 1.75 px/m)
    edge_cols = [int(col + LANE_WIDTH / 2 * ppm), int(col - LANE_WIDTH / 2 * ppm)]
    assert max(frame[int(row - 15 * ppm), c] for c in edge_cols) > bev.ROAD + 20
    # the car ahead is behind the ego in a view that looks the other way
    flipped = camera.render(_car(40.0, 0.0, np.pi), [ego])
    assert flipped[int(row - 20 * ppm), int(col)] == bev.VEHICLE


def test_embedded_env_records_the_bev_camera_and_refuses_front():
    env = make_env("racetrack")
    assert env.unwrapped.obs_spec.camera == "bev"
    env.close()
    with pytest.raises(PipelineError, match="embedded backend draws only the bev camera"):
        make_env("racetrack", camera="front")


def test_specs_of_another_or_an_unrecorded_camera_are_refused_naming_both():
    with pytest.raises(SpecMismatchError, match="camera: 'front' != 'bev'"):
        ObsSpec().check_compatible(ObsSpec(camera="front"), "store a.zarr")
    old = ObsSpec.from_dict({"vector_fields": ["speed"], "traffic": 0, "frame_stack": 4, "image_size": 84})
    assert old.camera == "unrecorded"
    with pytest.raises(SpecMismatchError) as err:
        ObsSpec(vector_fields="speed").check_compatible(old, "store old.zarr")
    message = str(err.value)
    assert "camera: 'unrecorded' != 'bev'" in message and "\n" not in message and "record it again" in message


def _episode_return(env, act, seed=0):
    obs, info = env.reset(seed=seed)
    total = 0.0
    while True:
        obs, reward, terminated, truncated, info = env.step(act(obs, info))
        total += reward
        if terminated or truncated:
            return total, info["termination"], terminated


@pytest.mark.parametrize("route", [r.name for r in list_routes("embedded")])
def test_stopping_and_holding_returns_less_than_leaving_the_road_at_once(route):
    env = make_env(route)
    expert = make_scripted_policy("expert", env)

    def park(obs, info):  # the expert's steering, a speed controller aiming at 0 m/s
        return np.array([expert.act(obs, info)[0], np.clip(-0.5 * info["speed"], -1, 1)], np.float32)

    def leave_the_road(obs, info):
        return np.array([1.0, 1.0], np.float32)

    parked, parked_end, parked_terminal = _episode_return(env, park)
    left, left_end, _ = _episode_return(env, leave_the_road)
    env.close()
    assert parked_end == "stuck" and parked_terminal, "blocked is a failure that ends the route"
    assert left_end == "off_route"
    assert parked < left, f"parking returns {parked:.2f}, leaving the road {left:.2f}"


def test_speed_beyond_the_target_earns_nothing_more():
    cfg = RewardConfig()
    cap = 10.0 * STEP_SECONDS  # the racetrack's 10 m/s for one step
    at_target = driving_reward(cap, 0.0, None, cap, cfg)
    assert at_target == pytest.approx(0.1 * cap)
    assert driving_reward(3 * cap, 0.0, None, cap, cfg) == pytest.approx(at_target)
    assert driving_reward(0.5 * cap, 0.0, None, cap, cfg) < at_target
    # in the env: flooring it round the track never earns more per step than the target speed's
    env = make_env("racetrack")
    expert = make_scripted_policy("expert", env)
    obs, info = env.reset(seed=0)
    rewards, speeds = [], []
    for _ in range(40):
        obs, reward, terminated, truncated, info = env.step(
            np.array([expert.act(obs, info)[0], 1.0], np.float32))
        rewards.append(reward)
        speeds.append(info["speed"])
        if terminated or truncated:
            break
    env.close()
    assert max(speeds) > 2 * env.unwrapped.route.target_speed, "the test must actually speed"
    assert max(rewards) <= 0.1 * cap + 1e-6


def test_reward_definition_is_versioned():
    definition = RewardConfig().to_dict()
    assert definition["version"] == REWARD_VERSION >= 2
    assert definition["stuck"] == "terminates" and definition["stuck_penalty"] >= definition["off_route_penalty"]


# -- what the store keeps: expert labels, the camera, the reward's definition ------------------

@pytest.fixture(scope="module")
def noisy_expert_store(tmp_path_factory):
    return collected_store(tmp_path_factory.mktemp("labels"), "noisy.zarr",
                           "--episodes", 2, "--noise", 0.2, "--max-steps", 40)


def test_noisy_expert_stores_the_applied_action_and_the_experts_label(noisy_expert_store):
    store = TransitionStore(str(noisy_expert_store))
    n = store.num_transitions
    applied, label = np.asarray(store.action[:n]), np.asarray(store.expert_action[:n])
    assert np.isfinite(label).all()
    noise = applied - label
    assert 0.1 < noise[:, 0].std() < 0.3, "applied = label + N(0, 0.2), clipped to [-1, 1]"
    assert np.abs(label).max() <= 1.0
    assert store.obs_spec.camera == "bev"
    assert store.reward_definition == RewardConfig().to_dict()
    # replay hands the label to behaviour cloning and the applied action to the critic
    with DictReplayBuffer(store, online_capacity=0, n_step=1, prefetch=0, seed=0) as replay:
        batch = replay.sample(16)
        rows = [int(np.flatnonzero((applied == a).all(1))[0]) for a in batch["action"].numpy()]
        np.testing.assert_array_equal(batch["bc_action"].numpy(), label[rows])


def test_stores_without_labels_or_camera_stay_readable_and_are_refused_for_training(tmp_path, noisy_expert_store):
    random_store = tmp_path / "random.zarr"
    assert run_cli("collect", "--episodes", 1, "--policy", "random", "--out", random_store,
                   "--quiet").returncode == 0
    store = TransitionStore(str(random_store))
    assert np.isnan(np.asarray(store.expert_action[: store.num_transitions])).all()
    with DictReplayBuffer(store, online_capacity=0, n_step=1, prefetch=0) as replay:
        batch = replay.sample(4)  # no labels: BC falls back on the applied actions
        np.testing.assert_array_equal(batch["bc_action"].numpy(), batch["action"].numpy())

    old = tmp_path / "old.zarr"
    shutil.copytree(noisy_expert_store, old)
    group = zarr.open_group(str(old), mode="r+")
    del group["expert_action"]
    spec = dict(group.attrs["obs_spec"])
    spec.pop("camera")
    group.update_attributes({"obs_spec": spec, "format_version": 1})
    group.attrs.pop("reward")
    store = TransitionStore(str(old))
    assert store.expert_action is None and store.episode(0).expert_action is None
    assert store.reward_definition is None and store.obs_spec.camera == "unrecorded"
    assert run_cli("datasets", "info", old).returncode == 0
    line = assert_one_line_error(run_cli("train", "--data", old, "--steps", 2, "--batch-size", 8,
                                         "--out", tmp_path / "run", "--quiet"), "camera", "'unrecorded' != 'bev'")
    assert "record it again" in line and not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_camera_is_refused_naming_both(tmp_path):
    from pipeline.train.td3 import TD3Agent

    agent = TD3Agent(ObsSpec())
    state = agent.state_dict()
    state["obs_spec"] = {**state["obs_spec"], "camera": "front"}
    path = tmp_path / "front.pt"
    torch.save(state, path)
    line = assert_one_line_error(run_cli("eval", "--checkpoint", path, "--episodes", 1, "--out",
                                         tmp_path / "eval", "--quiet"), "camera")
    assert "front" in line and "bev" in line
