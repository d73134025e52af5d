"""`pipeline train` end to end on CPU: offline + online, checkpoints, logs, resume, Ctrl-C, bad input."""

import csv
import signal
import subprocess
import time

import pytest
import torch

from pipeline.datasets.store import TransitionStore
from tests.cli_helpers import assert_one_line_error, cli_env, pipeline_cmd, run_cli

TINY = ("--batch-size", 8, "--log-every", 2, "--quiet")


@pytest.fixture(scope="module")
def expert_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "expert.zarr"
    result = run_cli("collect", "--episodes", 2, "--out", out, "--noise", 0.1, "--max-steps", 60, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def _rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_offline_plus_online_run_writes_checkpoints_csv_and_tensorboard(tmp_path, expert_store):
    run = tmp_path / "run"
    result = run_cli("train", "--data", expert_store, "--online-mix", 0.5, "--steps", 6, "--online-every", 3,
                     "--checkpoint-every", 3, "--out", run, *TINY)
    assert result.returncode == 0, result.stderr
    for name in ("last.pt", "step_3.pt", "step_6.pt", "config.json", "metrics.csv"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = _rows(run)
    assert [int(r["update"]) for r in rows] == [2, 4, 6]
    assert float(rows[-1]["rollout/env_steps"]) == 6  # two rollout chunks of --online-every steps
    for key in ("loss/critic_loss", "train/encoder_grad_norm", "perf/updates_per_s", "perf/replay_wait_s"):
        assert rows[-1][key] != ""
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["num_updates"] == 6 and state["loop"]["update"] == 6
    online = TransitionStore(str(run / "online.zarr"))  # fresh rollouts became data too
    assert online.obs_spec == TransitionStore(str(expert_store)).obs_spec


def test_pure_offline_does_no_rollouts(tmp_path, expert_store):
    run = tmp_path / "offline"
    result = run_cli("train", "--data", expert_store, "--online-mix", 0, "--bc-alpha", 2.5, "--steps", 4,
                     "--out", run, *TINY)
    assert result.returncode == 0, result.stderr
    assert not (run / "online.zarr").exists()
    assert "rollout/env_steps" not in _rows(run)[-1]


def test_resume_continues_the_same_run(tmp_path, expert_store):
    run = tmp_path / "resumed"
    common = ("--data", expert_store, "--online-every", 2, "--out", run, *TINY)
    assert run_cli("train", "--steps", 4, *common).returncode == 0
    result = run_cli("train", "--steps", 8, "--resume", *common)
    assert result.returncode == 0, result.stderr
    assert [int(r["update"]) for r in _rows(run)] == [2, 4, 6, 8]
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["num_updates"] == 8 and state["loop"]["env_steps"] == 8


def test_ctrl_c_writes_a_final_checkpoint(tmp_path, expert_store):
    run = tmp_path / "interrupted"
    args = ("train", "--data", expert_store, "--steps", 100000, "--online-every", 5, "--checkpoint-every", 100000,
            "--out", run, *TINY)
    proc = subprocess.Popen(pipeline_cmd(*args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.csv").exists():
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["loop"]["update"] >= 2


def test_checkpoint_of_another_obs_spec_is_refused(tmp_path, expert_store):
    run = tmp_path / "speed_only"
    assert run_cli("train", "--steps", 2, "--warmup-steps", 10, "--online-every", 2, "--vector-fields", "speed",
                   "--out", run, *TINY).returncode == 0
    online_meta = (run / "online.zarr" / "zarr.json").read_bytes()
    assert_one_line_error(run_cli("train", "--data", expert_store, "--steps", 4, "--resume", "--out", run, *TINY),
                          "vector_fields")
    assert (run / "online.zarr" / "zarr.json").read_bytes() == online_meta  # the refused run touched nothing


@pytest.mark.parametrize("args, needle", [
    (("--steps", 0), "--steps"),
    (("--online-mix", 1.5), "--online-mix"),
    (("--data", "nowhere.zarr"), "nowhere.zarr"),
    (("--resume",), "--out"),
    (("--device", "cuda:99"), "cuda"),
    (("--route", "town03", "--eval-every", 10), "--eval-every"),  # refused before connecting to CARLA
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    out = ("--out", tmp_path / "run") if "--resume" not in args else ()
    assert_one_line_error(run_cli("train", *args, *out, "--quiet"), needle)
    assert not (tmp_path / "run").exists()


def test_eval_every_logs_driving_metrics(tmp_path, expert_store):
    run = tmp_path / "with_eval"
    result = run_cli("train", "--data", expert_store, "--online-mix", 0, "--steps", 4, "--eval-every", 2,
                     "--eval-episodes", 1, "--out", run, *TINY)
    assert result.returncode == 0, result.stderr
    evaluated = [r for r in _rows(run) if r.get("eval/route_completion")]
    assert [int(r["update"]) for r in evaluated] == [2, 4]
    for row in evaluated:
        assert 0.0 < float(row["eval/route_completion"]) <= 100.0  # percent, as the leaderboard
        assert float(row["eval/driving_score"]) >= 0.0
