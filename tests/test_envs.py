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
