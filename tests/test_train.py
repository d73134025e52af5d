"""`pipeline train` end to end on CPU: offline + online, checkpoints, logs, resume, Ctrl-C, bad input."""

import csv
import io
import json
import shutil
import signal
import sys
import time

import pytest
import torch

from pipeline.datasets.store import TransitionStore
from tests.cli_helpers import assert_one_line_error, collected_store, finish_cli, run_cli, start_cli

TINY = ("--batch-size", 8, "--log-every", 2, "--quiet")


@pytest.fixture(scope="module")
def expert_store(tmp_path_factory):
    return collected_store(tmp_path_factory.mktemp("data"), "expert.zarr",
                           "--episodes", 2, "--noise", 0.1, "--max-steps", 60)


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
    # from a dataset, TD3+BC is on by default: the run records it and logs the BC loss
    assert json.loads((run / "config.json").read_text())["bc_alpha"] == 2.5
    assert rows[-1]["loss/bc_loss"] != ""
    assert float(rows[-1]["rollout/env_steps"]) == 6  # two rollout chunks of --online-every steps
    for key in ("loss/critic_loss", "train/encoder_grad_norm", "perf/updates_per_s", "perf/replay_wait_s"):
        assert rows[-1][key] != ""
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["num_updates"] == 6 and state["loop"]["update"] == 6
    online = TransitionStore(str(run / "online.zarr"))  # fresh rollouts became data too
    assert online.obs_spec == TransitionStore(str(expert_store)).obs_spec


def test_pure_offline_does_no_rollouts_and_each_learning_rate_reaches_its_optimisers(tmp_path, expert_store):
    run = tmp_path / "offline"
    result = run_cli("train", "--data", expert_store, "--online-mix", 0, "--bc-alpha", 2.5, "--steps", 4,
                     "--encoder-lr", 1e-5, "--lr", 1e-3, "--out", run, *TINY)
    assert result.returncode == 0, result.stderr
    assert not (run / "online.zarr").exists()
    assert "rollout/env_steps" not in _rows(run)[-1]
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    lrs = {name: [g["lr"] for g in state[name]["param_groups"]] for name in ("encoder_opt", "actor_opt", "critic_opt")}
    assert lrs == {"encoder_opt": [1e-5], "actor_opt": [1e-3], "critic_opt": [1e-3]}


def test_bf16_is_the_default_wish_no_bf16_keeps_fp32_and_the_checkpoint_says_so(tmp_path, expert_store):
    amp = {}
    for flags in ((), ("--bf16",), ("--no-bf16",)):
        run = tmp_path / (flags[0].strip("-") if flags else "default")
        result = run_cli("train", "--data", expert_store, "--online-mix", 0, "--steps", 2, *flags, "--out", run, *TINY)
        assert result.returncode == 0, result.stderr
        amp[flags] = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["config"]["amp"]
    # amp is the wish; TD3Agent turns it into bf16 only where the device has native bf16
    assert amp == {(): True, ("--bf16",): True, ("--no-bf16",): False}
    # a resumed run keeps its precision without the flag, and refuses a change of it
    fp32 = tmp_path / "no-bf16"
    result = run_cli("train", "--data", expert_store, "--online-mix", 0, "--steps", 4, "--resume", "--out", fp32, *TINY)
    assert result.returncode == 0, result.stderr
    assert torch.load(fp32 / "last.pt", map_location="cpu", weights_only=True)["config"]["amp"] is False
    assert_one_line_error(run_cli("train", "--steps", 6, "--resume", "--no-bf16", "--out", tmp_path / "default",
                                  *TINY), "--bf16/--no-bf16")


def test_resume_continues_the_same_run(tmp_path, expert_store):
    run = tmp_path / "resumed"
    common = ("--data", expert_store, "--online-every", 2, "--out", run, *TINY)
    assert run_cli("train", "--steps", 4, *common).returncode == 0
    result = run_cli("train", "--steps", 8, "--resume", *common)
    assert result.returncode == 0, result.stderr
    assert [int(r["update"]) for r in _rows(run)] == [2, 4, 6, 8]
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["num_updates"] == 8 and state["loop"]["env_steps"] == 8


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_writes_a_final_checkpoint(tmp_path, expert_store, stop):
    run = tmp_path / "interrupted"
    proc = start_cli("train", "--data", expert_store, "--steps", 100000, "--online-every", 5,
                     "--checkpoint-every", 100000, "--out", run, *TINY)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.csv").exists():
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(stop)
    out, err = finish_cli(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["loop"]["update"] >= 2


def test_checkpoint_of_another_obs_spec_is_refused(tmp_path, expert_store):
    run = tmp_path / "speed_only"
    assert run_cli("train", "--steps", 2, "--warmup-steps", 10, "--online-every", 2, "--vector-fields", "speed",
                   "--out", run, *TINY).returncode == 0
    online_meta = (run / "online.zarr" / "zarr.json").read_bytes()
    # a dataset (of another spec) given on resume is a changed option, refused before anything opens
    assert_one_line_error(run_cli("train", "--data", expert_store, "--steps", 4, "--resume", "--out", run, *TINY),
                          "--data", "the run has unset")
    assert (run / "online.zarr" / "zarr.json").read_bytes() == online_meta  # the refused run touched nothing


@pytest.mark.parametrize("args, needle", [
    (("--steps", 0), "--steps"),
    (("--online-mix", 1.5), "--online-mix"),
    (("--data", "nowhere.zarr"), "nowhere.zarr"),
    (("--resume",), "--out"),
    (("--device", "cuda:99"), "cuda"),
    (("--route", "town03", "--eval-every", 10), "--eval-every"),  # refused before connecting to CARLA
    (("--prediction-weight", -1), "--prediction-weight"),
    (("--prediction-weight", 1, "--encoder-update", "frozen"), "--encoder-update frozen"),
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    out = ("--out", tmp_path / "run") if "--resume" not in args else ()
    assert_one_line_error(run_cli("train", *args, *out, "--quiet"), needle)
    assert not (tmp_path / "run").exists()


def test_a_refusal_after_the_run_folder_was_made_removes_it(tmp_path, expert_store):
    # the replay buffer refuses its memory budget once data and env are open and --out exists
    assert_one_line_error(run_cli("train", "--data", expert_store, "--replay-memory", "0",
                                  "--out", tmp_path / "run", *TINY), "memory")
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


def _tiny_offline_config(out, data, **options):
    from pipeline.train.loop import TrainConfig

    return TrainConfig(out=str(out), data=str(data), online_mix=0.0, batch_size=8, log_every=2, device="cpu",
                       eval_episodes=1, **options)


def _scripted_evaluation(monkeypatch, route_completions: list[float]) -> list[int]:
    """Periodic evaluations return ``route_completions`` in turn (driving score = route completion
    / 2); returns the list the seeds they were asked for are appended to."""
    import pipeline.eval.runner as runner

    asked, scores = [], iter(route_completions)

    def evaluate(agent, routes, episodes, seed, simulator=None):
        asked.append(seed)
        completion = next(scores)
        return {"route_completion": completion, "driving_score": completion / 2}

    monkeypatch.setattr(runner, "evaluate_agent", evaluate)
    return asked


def _agent_weights(path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {f"{net}.{k}": v for net in ("encoder", "actor", "critic") for k, v in state[net].items()}


def test_eval_every_keeps_the_best_policy_in_best_pt_picked_on_the_validation_seeds(tmp_path, expert_store,
                                                                                    monkeypatch):
    from pipeline.eval.seeds import VALIDATION_SEED
    from pipeline.train.loop import train

    asked = _scripted_evaluation(monkeypatch, [50.0, 80.0, 80.0, 60.0])
    run = tmp_path / "best"
    summary = train(_tiny_offline_config(run, expert_store, steps=8, eval_every=2, checkpoint_every=2), progress=False)
    assert asked == [VALIDATION_SEED] * 4  # never the test seeds (0, 1, ...) pipeline eval uses
    assert VALIDATION_SEED > 4
    # 80 at updates 4 and 6: the tie goes to the later policy, and 60 at 8 does not replace it
    assert summary["best"]["update"] == 6 and summary["best"]["route_completion"] == 80.0
    assert summary["best_checkpoint"] == str(run / "best.pt")
    best = _agent_weights(run / "best.pt")
    assert all(torch.equal(v, _agent_weights(run / "step_6.pt")[k]) for k, v in best.items())
    assert not all(torch.equal(v, _agent_weights(run / "last.pt")[k]) for k, v in best.items())


def test_a_resumed_run_replaces_best_pt_only_with_a_better_policy(tmp_path, expert_store, monkeypatch):
    from pipeline.train.loop import train

    run = tmp_path / "resumed"
    _scripted_evaluation(monkeypatch, [80.0, 50.0])
    train(_tiny_offline_config(run, expert_store, steps=4, eval_every=2), progress=False)
    _scripted_evaluation(monkeypatch, [70.0, 60.0])  # both below the 80 of update 2, before the resume
    summary = train(_tiny_offline_config(run, expert_store, steps=8, eval_every=2, resume=True), progress=False)
    assert summary["updates"] == 8 and summary["best"]["update"] == 2
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert state["loop"]["update"] == 2 and state["num_updates"] == 2


def test_which_seeds_evaluate_a_run_does_not_change_its_training(tmp_path, expert_store):
    from pipeline.train.loop import train

    for eval_seed in (0, 1000):
        train(_tiny_offline_config(tmp_path / f"eval{eval_seed}", expert_store, steps=4, eval_every=2,
                                   eval_seed=eval_seed, augment=True), progress=False)
    first, second = (_agent_weights(tmp_path / f"eval{s}" / "last.pt") for s in (0, 1000))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_at_any_update_refills_the_ring_and_keeps_the_rollout_schedule(tmp_path):
    # A pure-online run killed after its checkpoint at update 3 (not a multiple of --online-every 4),
    # having logged rows up to 6 and left a temp file of a checkpoint write.
    run = tmp_path / "online"
    common = ("--online-every", 4, "--warmup-steps", 64, "--checkpoint-every", 3, "--out", run, *TINY)
    assert run_cli("train", "--steps", 6, *common).returncode == 0
    shutil.copy(run / "step_3.pt", run / "last.pt")
    (run / ".step_6.pt.tmp4242").write_bytes(b"half a checkpoint")

    result = run_cli("train", "--steps", 10, "--resume", *common)

    assert result.returncode == 0, result.stderr  # was: "nothing to sample yet"
    assert [int(r["update"]) for r in _rows(run)] == [2, 4, 6, 8, 10]  # the killed run's 4 and 6 dropped
    assert not list(run.glob(".*.tmp*"))
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    # 64 warm-up steps, chunks of 4 at updates 0 | 4, 8: the ring was refilled from online.zarr (an
    # empty ring would have needed an extra chunk at update 3) and the schedule continued.
    assert state["loop"]["update"] == 10 and state["loop"]["env_steps"] == 64 + 3 * 4


def test_a_folder_without_checkpoint_is_reused_and_changed_learner_options_are_refused(tmp_path, expert_store):
    run = tmp_path / "killed_early"
    (run / "online.zarr").mkdir(parents=True)  # what a run killed before its first checkpoint leaves
    (run / "tensorboard").mkdir()
    (run / "metrics.csv").write_text("update,loss/critic_loss\n100,1.0\n")
    (run / "config.json").write_text("{}")
    (run / ".last.pt.tmp999").write_bytes(b"half")
    common = ("--data", expert_store, "--online-mix", 0, "--out", run, *TINY)
    result = run_cli("train", "--steps", 2, *common)
    assert result.returncode == 0, result.stderr
    assert [int(r["update"]) for r in _rows(run)] == [2]
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "last.pt", "metrics.csv", "tensorboard"]

    before = (run / "last.pt").read_bytes()
    line = assert_one_line_error(run_cli("train", "--steps", 4, "--resume", "--bc-alpha", 1.0, "--gamma", 0.9,
                                         "--encoder-update", "frozen", "--encoder-lr", 1e-4, "--lr", 1e-3, *common),
                                 "--bc-alpha 1.0 (the run has 2.5)", "--gamma 0.9")
    assert "--encoder-update frozen (the run has critic)" in line and "--encoder-lr 0.0001 (the run has 0.0003)" in line
    assert "--lr 0.001 (the run has 0.0003)" in line
    assert (run / "last.pt").read_bytes() == before
    # options not given take the run's: its --data and --online-mix 0 (the default 0.5 would roll out)
    result = run_cli("train", "--steps", 4, "--resume", "--out", run, "--quiet")
    assert result.returncode == 0, result.stderr
    assert [int(r["update"]) for r in _rows(run)] == [2, 4] and not (run / "online.zarr").exists()

    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("train", "--steps", 2, "--data", expert_store, "--out", other, *TINY), "notes.txt")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_metrics_log_drops_rows_past_the_resumed_checkpoint(tmp_path):
    from pipeline.train.loop import MetricsLog

    log = MetricsLog(tmp_path)
    for update in (2, 4, 6):
        log.log(update, {"loss/critic_loss": float(update)})
    log.close()
    resumed = MetricsLog(tmp_path, resume_update=4)
    resumed.log(6, {"loss/critic_loss": 60.0})
    resumed.close()
    assert [(int(r["update"]), float(r["loss/critic_loss"])) for r in _rows(tmp_path)] == [(2, 2.0), (4, 4.0), (6, 60.0)]


def test_defaults_by_device_and_help_says_them():
    from pipeline.train.loop import DATA_BC_ALPHA, DEVICE_DEFAULTS, TrainConfig, device_defaults

    cpu, cuda = DEVICE_DEFAULTS["cpu"], DEVICE_DEFAULTS["cuda"]
    assert cpu["batch_size"] == 64 and cuda == {"steps": 100_000, "batch_size": 256, "bf16": True}
    # bf16 convolutions wherever native (TD3Agent checks the hardware): the quick start learned in 5 of 5
    # training seeds with them, as in fp32 (quickstart-cpu.md, 2026-12-07)
    assert cpu["bf16"] is True
    assert device_defaults(TrainConfig(out="x"), "cpu").bf16 is True
    assert device_defaults(TrainConfig(out="x"), "cuda").bf16 is True
    assert device_defaults(TrainConfig(out="x", bf16=False), "cpu").bf16 is False  # asked for wins
    assert device_defaults(TrainConfig(out="x"), "cpu").steps == cpu["steps"]
    assert device_defaults(TrainConfig(out="x"), "cuda").batch_size == 256
    given = device_defaults(TrainConfig(out="x", steps=7, batch_size=5), "cuda")
    assert (given.steps, given.batch_size) == (7, 5)  # what the user set wins
    # TD3+BC by default exactly when batches hold dataset rows; a given alpha (0 too) wins
    assert device_defaults(TrainConfig(out="x", data="d.zarr"), "cpu").bc_alpha == DATA_BC_ALPHA > 0
    assert device_defaults(TrainConfig(out="x", data="d.zarr", online_mix=1.0), "cpu").bc_alpha == 0.0
    assert device_defaults(TrainConfig(out="x"), "cuda").bc_alpha == 0.0
    assert device_defaults(TrainConfig(out="x", data="d.zarr", bc_alpha=0.0), "cpu").bc_alpha == 0.0
    help_text = " ".join(run_cli("train", "--help").stdout.split())
    assert f"{cpu['steps']} on CPU, {cuda['steps']} on CUDA" in help_text
    assert f"{cpu['batch_size']} on CPU, {cuda['batch_size']} on CUDA" in help_text
    assert f"default: {DATA_BC_ALPHA:g} with --data, else 0" in help_text


def test_progress_bar_moves_on_every_update_with_an_eta_from_the_start():
    from rich.console import Console

    from pipeline.train.loop import _eta, _TrainProgress

    assert _eta(10.0, 5, 15) == "eta 0:00:30" and _eta(0.0, 0, 15) == "eta -:--:--"
    with _TrainProgress(True, total=100, done=40, console=Console(file=io.StringIO())) as bar:
        for update in (41, 42, 43):
            bar.advance(update)
            task = bar._progress.tasks[0]
            assert task.completed == update  # no waiting for a log step
        assert task.fields["eta"] not in ("", "eta -:--:--")


def _interrupt_the_final_save(monkeypatch, times: int) -> list[int]:
    """The run's save of ``last.pt`` at the end raises KeyboardInterrupt ``times`` times (a Ctrl-C
    while it writes), then saves; returns the updates of every save of last.pt tried."""
    from pipeline.train import loop

    original, tried = loop._Run.save, []

    def save(self, path, update):
        if path.name == "last.pt" and update == self.config.steps:
            tried.append(update)
            if len(tried) <= times:
                raise KeyboardInterrupt
        return original(self, path, update)

    monkeypatch.setattr(loop._Run, "save", save)
    return tried


def _note_log_closes(monkeypatch) -> list[int]:
    from pipeline.train import loop

    closed, close = [], loop.MetricsLog.close
    monkeypatch.setattr(loop.MetricsLog, "close", lambda self: (closed.append(1), close(self))[1])
    return closed


def test_an_interrupt_while_the_last_checkpoint_is_written_still_writes_it(tmp_path, expert_store, monkeypatch):
    # a Ctrl-C that lands on the final save: the save is what it asks for, so it happens; logs close
    from pipeline.train.loop import train

    tried, closed = _interrupt_the_final_save(monkeypatch, times=1), _note_log_closes(monkeypatch)
    run = tmp_path / "run"
    try:
        summary = train(_tiny_offline_config(run, expert_store, steps=4), progress=False)
    except KeyboardInterrupt:  # not pytest's to see: it would end the whole session
        pytest.fail("the interrupt escaped train, giving up the last checkpoint")
    assert summary["interrupted"] and tried == [4, 4] and closed == [1]
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["loop"]["update"] == 4


def test_a_second_interrupt_during_the_last_checkpoint_gives_up_but_closes_the_logs(tmp_path, expert_store,
                                                                                    monkeypatch):
    from pipeline.train.loop import train

    tried, closed = _interrupt_the_final_save(monkeypatch, times=2), _note_log_closes(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny_offline_config(tmp_path / "run", expert_store, steps=4), progress=False)
    assert tried == [4, 4] and closed == [1]  # TensorBoard's events are flushed on close


@pytest.mark.parametrize("saved", [True, False], ids=["after-a-checkpoint", "before-any"])
def test_an_interrupt_train_does_not_catch_is_one_line_that_says_what_to_resume(tmp_path, monkeypatch, capsys,
                                                                                saved):
    import pipeline.train.loop
    from pipeline.cli import main

    run = tmp_path / "run"
    if saved:
        run.mkdir()
        (run / "last.pt").write_bytes(b"a checkpoint")

    def interrupted(config, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.train.loop, "train", interrupted)
    monkeypatch.setattr(sys, "argv", ["pipeline", "train", "--steps", "2", "--out", str(run)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    if saved:
        assert lines == [f"interrupted: {run / 'last.pt'} is the last checkpoint saved; continue with --resume "
                         f"--out {run}"]
    else:
        assert lines == ["interrupted before the first checkpoint; nothing to resume"]
