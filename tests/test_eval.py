"""`pipeline eval`: leaderboard metrics, determinism, report files, baselines, errors."""

import csv
import json
import socket
import time

import numpy as np
import pytest

from pipeline.envs import get_route, make_env
from pipeline.errors import PipelineError, SimulatorUnavailableError, SpecMismatchError, UnknownRouteError
from pipeline.eval import runner
from pipeline.eval.metrics import EpisodeMetrics, EpisodeTracker, summarize
from pipeline.eval.runner import EvalConfig, episode_seeds, evaluate, evaluate_policy
from tests.cli_helpers import assert_one_line_error, run_cli


def _tiny_agent(vector_fields=None, traffic=0):
    import torch

    from pipeline.envs.spec import ObsSpec
    from pipeline.train.td3 import TD3Agent, TD3Config

    torch.set_num_threads(1)
    spec = ObsSpec(vector_fields=vector_fields, traffic=traffic)
    return TD3Agent(spec, config=TD3Config(device="cpu", features_dim=32, hidden=32, seed=3))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    _tiny_agent().save(path)
    return path


# --------------------------------------------------------------------------- metrics

def test_driving_score_with_two_infractions():
    m = EpisodeMetrics(route="r", seed=0, route_completion=80.0, distance_m=500.0,
                       collisions_vehicle=1, red_lights=1)
    assert m.infraction_penalty == pytest.approx(0.60 * 0.70)
    assert m.driving_score == pytest.approx(80.0 * 0.42)
    assert m.infractions == 2 and m.collisions == 1
    assert m.infractions_per_km == pytest.approx(4.0)
    # a quarter of the steps outside the route's lanes scales the score by 0.75
    m.off_route_share = 0.25
    assert m.driving_score == pytest.approx(80.0 * 0.42 * 0.75)
    # every leaderboard factor, each event multiplying once more
    m2 = EpisodeMetrics(route="r", seed=0, route_completion=100.0, collisions_pedestrian=2,
                        collisions_static=1, stop_signs=1)
    assert m2.driving_score == pytest.approx(100.0 * 0.5 * 0.5 * 0.65 * 0.8)


def test_route_completion_and_events_from_step_infos():
    def info(completion, progress, speed=5.0, lateral=0.0, **events):
        state = np.zeros(23, np.float32)
        state[1] = lateral
        return {"route_completion": completion, "progress_m": progress, "speed": speed,
                "collision": False, "off_route": False, "termination": None, "state_vector": state,
                **events}

    tracker = EpisodeTracker("r", seed=4)
    tracker.reset(info(0.01, 2.0))
    steps = [
        info(0.10, 12.0, collision=True),  # one crash reported over two steps is one event
        info(0.20, 22.0, collision=True),
        info(0.30, 32.0, lateral=3.0),  # centre beyond the lane: outside the route's lanes
        info(0.40, 42.0, collision=True, collision_kind="pedestrian", red_light=True),
        info(0.50, 52.0, off_route=True, termination="off_route", speed=9.0),
    ]
    for k, step_info in enumerate(steps):
        tracker.step(reward=1.0 + k, info=step_info)
    m = tracker.finish()
    assert (m.route, m.seed, m.length, m.termination) == ("r", 4, 5, "off_route")
    assert m.route_completion == pytest.approx(50.0)
    assert m.distance_m == pytest.approx(50.0)  # from the start of the episode, not from 0
    assert m.episode_return == pytest.approx(15.0)
    assert m.mean_speed == pytest.approx((4 * 5.0 + 9.0) / 5)
    assert (m.collisions_vehicle, m.collisions_pedestrian, m.red_lights, m.off_route_events) == (1, 1, 1, 1)
    assert m.off_route_share == pytest.approx(2 / 5)
    assert m.driving_score == pytest.approx(50.0 * 0.6 * 0.5 * 0.7 * (1 - 0.4))
    assert m.infractions_per_km == pytest.approx(4 / 0.05)


def test_summary_averages_scores_and_rates_per_total_km():
    a = EpisodeMetrics(route="r", seed=0, route_completion=100.0, distance_m=300.0, termination="route_done")
    b = EpisodeMetrics(route="r", seed=1, route_completion=50.0, distance_m=200.0, collisions_vehicle=1,
                       termination="collision")
    s = summarize([a, b])
    assert s["driving_score"] == pytest.approx((100.0 + 50.0 * 0.6) / 2)  # mean of scores
    assert s["route_completion"] == pytest.approx(75.0)
    assert s["infractions_per_km"] == pytest.approx(1 / 0.5)
    assert s["collisions"] == 1 and s["terminations"] == {"collision": 1, "route_done": 1}
    # an agent that never moves: per-km rates use the leaderboard's 1 m floor, not a division by 0
    still = summarize([EpisodeMetrics(route="r", seed=0, collisions_vehicle=1)])
    assert still["infractions_per_km"] == pytest.approx(1000.0)


def test_episode_seeds():
    route = get_route("racetrack")
    assert episode_seeds(route, 3, seed=10) == [10, 11, 12]
    assert episode_seeds(route, 2) == list(route.seeds[:2])
    assert episode_seeds(route, len(route.seeds) + 2)[-2:] == [max(route.seeds) + 1, max(route.seeds) + 2]


# --------------------------------------------------------------------------- end to end

def test_cli_reports_expert_above_random_on_racetrack(tmp_path):
    out = tmp_path / "eval"
    result = run_cli("eval", "--policy", "expert", "--policy", "random", "--route", "racetrack",
                     "--episodes", 2, "--out", out, "--video", "--trace")
    assert result.returncode == 0, result.stderr
    assert "route_done" in result.stdout and "random" in result.stdout  # the terminal table

    report = json.loads((out / "report.json").read_text())
    assert {"format", "software_version", "created", "config", "scoring", "routes", "policies", "summary",
            "episodes", "files"} <= set(report)
    assert report["routes"]["racetrack"]["scenario"] == "racetrack-v0"
    assert report["scoring"]["penalty_per_event"]["collisions_vehicle"] == 0.60
    expert, random_ = (report["summary"][p]["by_route"]["racetrack"] for p in ("expert", "random"))
    for key in ("route_completion", "driving_score", "infractions_per_km", "collisions", "off_route_events",
                "episode_return", "length", "mean_speed", "terminations"):
        assert key in expert
    assert expert["route_completion"] > random_["route_completion"] + 50
    assert expert["driving_score"] > random_["driving_score"]
    assert expert["terminations"] == {"route_done": 2}

    with open(out / "episodes.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and [r["policy"] for r in rows] == ["expert", "expert", "random", "random"]
    assert {"route_completion", "driving_score", "infractions_per_km", "termination", "seed"} <= set(rows[0])
    assert [float(r["driving_score"]) for r in rows] == [e["driving_score"] for e in report["episodes"]]
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import imageio.v3 as iio

    video = iio.imread(report["files"]["videos"]["expert"], index=None)
    assert len(video) == report["episodes"][0]["length"] + 1  # every observation of the first episode
    with open(report["files"]["steps_csv"]) as f:  # --trace: one row per step of every episode
        assert len(list(csv.DictReader(f))) == sum(e["length"] for e in report["episodes"])


def test_the_trace_has_one_row_per_step_and_adds_up_to_each_episode(tmp_path):
    """steps.csv (--trace) agrees with episodes.csv: its rows count the steps, its rewards sum to the
    return, its collision flags to the collisions, and its last row holds the ending and completion."""
    config = EvalConfig(out=str(tmp_path / "eval"), policies=("expert", "random"), routes=("racetrack",),
                        episodes=2, seed=3, traffic=3, trace=True)
    report = evaluate(config, progress=False)
    with open(report["files"]["steps_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["policy", "route", "seed", "step"]
    assert list(rows[0])[3:] == list(runner.TRACE_FIELDS)
    for episode in report["episodes"]:
        mine = [r for r in rows if r["policy"] == episode["policy"] and int(r["seed"]) == episode["seed"]]
        assert [int(r["step"]) for r in mine] == list(range(episode["length"]))
        assert sum(float(r["reward"]) for r in mine) == pytest.approx(episode["episode_return"], abs=1e-6)
        assert mine[-1]["termination"] == episode["termination"]
        assert all(r["termination"] == "" for r in mine[:-1])
        assert float(mine[-1]["route_completion"]) == pytest.approx(episode["route_completion"])
        flags = [r["collision"] == "True" for r in mine]
        assert sum(now and not before for before, now in zip([False] + flags, flags)) == episode["collisions"]
        assert all(-1.0 <= float(r["steer"]) <= 1.0 and float(r["speed"]) >= 0.0 for r in mine)
    # seed 3 at traffic 3 puts a car in the expert's lane ahead of it: the gap is traced where there is one
    expert_gaps = [r["lead_distance_m"] for r in rows if r["policy"] == "expert" and r["seed"] == "3"]
    assert any(gap == "" for gap in expert_gaps) and any(gap != "" and float(gap) > 0 for gap in expert_gaps)


def test_without_trace_there_is_no_steps_file(tmp_path):
    report = evaluate(EvalConfig(out=str(tmp_path / "eval"), episodes=1), progress=False)
    assert "steps_csv" not in report["files"] and not (tmp_path / "eval" / "steps.csv").exists()


def test_same_policy_route_and_seed_give_identical_results(tmp_path, checkpoint):
    def run(out, workers=0):
        config = EvalConfig(out=str(tmp_path / out), policies=(str(checkpoint), "random"),
                            routes=("racetrack",), episodes=2, seed=7, max_steps=25, workers=workers)
        return evaluate(config, progress=False)["episodes"]

    first, second = run("a"), run("b")
    assert first == second
    assert [e["seed"] for e in first] == [7, 8, 7, 8]
    assert len({e["episode_return"] for e in first}) > 1  # not a degenerate constant
    # the training loop's in-process path gives the same numbers for the same agent
    from pipeline.policies import load_agent

    summary = evaluate_policy(load_agent(str(checkpoint)), ["racetrack"], episodes=2, seed=7, max_steps=25)
    mine = [e for e in first if e["policy"] == str(checkpoint)]
    assert summary["driving_score"] == pytest.approx(np.mean([e["driving_score"] for e in mine]))
    assert summary["by_route"]["racetrack"]["length"] == pytest.approx(np.mean([e["length"] for e in mine]))
    runner.close_envs()


def test_dask_workers_give_the_same_results_as_local(tmp_path):
    def run(out, workers):
        config = EvalConfig(out=str(tmp_path / out), policies=("expert", "random"), routes=("racetrack",),
                            episodes=2, seed=0, max_steps=30, workers=workers)
        return evaluate(config, progress=False)["episodes"]

    assert run("local", 0) == run("dask", 2)


def test_checkpoint_gets_the_vector_fields_it_was_trained_on(tmp_path):
    path = tmp_path / "speed-only.pt"
    _tiny_agent(vector_fields="speed").save(path)
    report = evaluate(EvalConfig(out=str(tmp_path / "eval"), policies=(str(path),), episodes=1, max_steps=5),
                      progress=False)
    assert report["policies"][0]["obs_spec"]["vector_fields"] == ["speed"]
    assert report["episodes"][0]["length"] >= 1

    from pipeline.policies import CheckpointPolicy

    env = make_env("racetrack", max_steps=5)  # all 23 fields: not what the checkpoint reads
    with pytest.raises(SpecMismatchError, match="vector_fields"):
        CheckpointPolicy(str(path), env)
    env.close()


# --------------------------------------------------------------------------- errors

def test_unknown_route_lists_known_routes(tmp_path):
    result = run_cli("eval", "--route", "nowhere", "--out", tmp_path / "eval")
    assert_one_line_error(result, "nowhere", "racetrack", "racetrack-oval", "racetrack-large")
    assert not (tmp_path / "eval").exists()
    with pytest.raises(UnknownRouteError):
        evaluate(EvalConfig(out=str(tmp_path / "x"), routes=("nowhere",)), progress=False)


def test_simulator_error_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    def no_server(*args, **kwargs):
        raise SimulatorUnavailableError("cannot reach a CARLA server at somehost:2999\n  start one with ...")

    monkeypatch.setattr(runner, "make_env", no_server)
    with pytest.raises(SimulatorUnavailableError) as err:
        evaluate(EvalConfig(out=str(tmp_path / "eval")), progress=False)
    message = str(err.value)
    assert "\n" not in message and "somehost:2999" in message and "racetrack-oval" in message
    assert not (tmp_path / "eval").exists()


def test_bad_checkpoint_and_unwritable_out_are_one_line_errors(tmp_path, checkpoint):
    result = run_cli("eval", "--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "eval")
    assert_one_line_error(result, "missing.pt")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PipelineError, match="cannot write the evaluation report"):
        evaluate(EvalConfig(out=str(blocker / "eval"), episodes=1, max_steps=3), progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_carla_route_without_server_is_one_clear_line(tmp_path):
    port = _free_port()
    started = time.monotonic()
    result = run_cli("eval", "--route", "town03", "--carla-host", "127.0.0.1", "--carla-port", port,
                     "--out", tmp_path / "eval", timeout=60)
    elapsed = time.monotonic() - started
    assert_one_line_error(result, "127.0.0.1", str(port), "0.9.16", "racetrack")
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert not (tmp_path / "eval").exists()


def test_checkpoints_with_the_same_file_name_keep_distinct_labels():
    from pipeline.eval.report import short_labels

    short = short_labels(["runs/a/last.pt", "runs/b/last.pt", "expert"])
    assert short == {"runs/a/last.pt": "a/last.pt", "runs/b/last.pt": "b/last.pt", "expert": "expert"}
    assert len(set(short_labels(["x/a/run/last.pt", "y/a/run/last.pt"]).values())) == 2


def test_ctrl_c_during_eval_says_in_one_line_that_no_report_was_written(tmp_path):
    import signal

    from tests.cli_helpers import finish_cli, start_cli

    out = tmp_path / "eval"
    proc = start_cli("eval", "--policy", "expert", "--episodes", 40, "--out", out, "--quiet")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not out.exists():  # driving from now on
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "eval finished before the signal: " + proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, stderr = finish_cli(proc)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: no new report in "), stderr
    assert not (out / "report.json").exists()
