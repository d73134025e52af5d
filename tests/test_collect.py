"""`pipeline collect` and `pipeline datasets info` end to end on the embedded backend."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from pipeline.datasets.store import TransitionStore
from pipeline.envs import make_env
from pipeline.policies import make_policy as make_scripted_policy
from tests.cli_helpers import assert_one_line_error, cli_env, finish_cli, pipeline_cmd, run_cli, start_cli


def test_collect_records_exactly_what_the_env_produced(tmp_path):
    out = tmp_path / "a.zarr"
    result = run_cli("collect", "--episodes", 2, "--out", out, "--noise", 0.1, "--seed", 5, "--max-steps", 60,
                     "--quiet")
    assert result.returncode == 0, result.stderr
    store = TransitionStore(str(out))
    assert store.num_episodes == 2
    env = make_env("racetrack", max_steps=60)
    policy = make_scripted_policy("expert", env, noise=0.1)
    for i, seed in enumerate((5, 6)):
        episode = store.episode(i)
        assert episode.seed == seed
        policy.reset(seed)
        obs, info = env.reset(seed=seed)
        steps = [obs]
        while True:
            action = policy.act(obs, info)
            obs, reward, terminated, truncated, info = env.step(action)
            steps.append(obs)
            if terminated or truncated:
                break
        assert episode.length == len(steps) - 1
        assert len(episode.frames) == 3 + episode.length + 1
        for t, expected in enumerate(steps):
            got = episode.observation(t)
            np.testing.assert_array_equal(got["image"], expected["image"])
            np.testing.assert_array_equal(got["vector"], expected["vector"])


def test_datasets_info_reports_the_store(tmp_path):
    out = tmp_path / "b.zarr"
    assert run_cli("collect", "--episodes", 2, "--out", out, "--max-steps", 30, "--quiet").returncode == 0
    result = run_cli("datasets", "info", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["episodes"] == 2 and summary["transitions"] == 60
    assert summary["routes"] == {"racetrack": 2} and summary["policy"] == "expert"
    assert 0 < summary["bytes_per_transition"] < 56448 / 8
    table = run_cli("datasets", "info", out)
    assert table.returncode == 0 and "bytes per transition" in table.stdout


def test_sigkill_leaves_whole_episodes_and_resume_completes(tmp_path):
    out = tmp_path / "killed.zarr"
    # enough short episodes that the run is still going after its first commit (about one a second)
    args = ("collect", "--episodes", 300, "--out", out, "--policy", "random", "--max-steps", 40, "--quiet")
    proc = subprocess.Popen(pipeline_cmd(*args), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            committed = zarr.open_group(str(out), mode="r").attrs.get("committed_episodes", 0)
        except Exception:
            committed = 0
        if committed >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "collect finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = TransitionStore(str(out))
    assert 2 <= store.num_episodes < 300
    for i in range(store.num_episodes):  # every visible episode is whole and reconstructs
        episode = store.episode(i)
        assert len(episode.frames) == 3 + episode.length + 1
        assert len(episode.vector) == episode.length + 1
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr
    resumed = TransitionStore(str(out))
    assert resumed.num_episodes == 300
    assert sorted(int(s) for s in resumed.episodes["seed"]) == list(range(300))


@pytest.mark.parametrize("stop, to_group, workers", [(signal.SIGINT, False, 0), (signal.SIGINT, True, 0),
                                                     (signal.SIGTERM, False, 0), (signal.SIGINT, True, 2)],
                         ids=["ctrl-c", "ctrl-c-to-process-group", "sigterm", "ctrl-c-to-group-with-dask-workers"])
def test_a_stop_signal_keeps_every_finished_episode(tmp_path, stop, to_group, workers):
    # a terminal's Ctrl-C reaches the whole process group: the store's writer process and the dask
    # workers too, which leave it to collect (they printed tracebacks); `kill` and schedulers send
    # SIGTERM, which collect handles as Ctrl-C
    out = tmp_path / "interrupted.zarr"
    # enough that the signal lands while driving: the first commit comes ~1 s in, and 300 random
    # episodes had all been driven by then on a fast box (the signal then met the last commit)
    requested = 3000
    proc = start_cli("collect", "--episodes", requested, "--out", out, "--policy", "random", "--max-steps", 40,
                     "--workers", workers, "--quiet", new_session=to_group)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if zarr.open_group(str(out), mode="r").attrs.get("committed_episodes", 0) >= 1:
                break
        except Exception:
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "collect finished before the signal: " + proc.stderr.read()
    if to_group:
        os.killpg(proc.pid, stop)
    else:
        proc.send_signal(stop)
    stdout, stderr = finish_cli(proc)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    recorded = int(stdout.split("/")[0])  # "N/3000 episodes in ...": what the summary says it kept
    store = TransitionStore(str(out))
    assert 1 <= store.num_episodes == recorded < requested


def test_an_interrupt_during_the_last_commit_still_commits_every_episode(tmp_path, monkeypatch):
    # Ctrl-C (or SIGTERM) that lands after the last episode, while collect waits for the last
    # commit: the episodes are finished, so they are kept, and the call says it was interrupted
    from pipeline.datasets.collect import CollectConfig, collect
    from pipeline.datasets.writer_process import StoreWriterProcess

    original, calls = StoreWriterProcess.finish, []

    def interrupted_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(StoreWriterProcess, "finish", interrupted_once)
    out = tmp_path / "a.zarr"
    try:
        summary = collect(CollectConfig(out=str(out), episodes=6, policy="random", max_steps=20), progress=False)
    except KeyboardInterrupt:  # not pytest's to see: it would end the whole session
        pytest.fail("the interrupt escaped collect, giving up the episodes being committed")
    assert summary["interrupted"] and len(calls) == 2
    assert summary["episodes_committed"] == TransitionStore(str(out)).num_episodes == 6


def test_a_second_interrupt_while_the_last_episodes_are_committed_gives_up(tmp_path, monkeypatch):
    # the first Ctrl-C stops the driving, a second one during the wait for the last commit ends collect
    from pipeline.datasets import collect as collect_module
    from pipeline.datasets.collect import CollectConfig, collect
    from pipeline.datasets.writer_process import StoreWriterProcess

    def interrupted_after_two(config, seeds, stop):
        for seed in list(seeds)[:2]:
            yield collect_module.run_episode(config, seed)
        raise KeyboardInterrupt

    original, calls = StoreWriterProcess.finish, []

    def interrupted_once(self):  # the second Ctrl-C; a retry of the wait would then succeed
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(collect_module, "_episodes_local", interrupted_after_two)
    monkeypatch.setattr(StoreWriterProcess, "finish", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        collect(CollectConfig(out=str(tmp_path / "a.zarr"), episodes=6, policy="random", max_steps=20), progress=False)
    assert len(calls) == 1  # not waited for again


def test_an_interrupt_collect_does_not_catch_is_still_the_resume_line(tmp_path, monkeypatch, capsys):
    # a second Ctrl-C during the last commit, or one while a dask cluster closes, reaches the
    # command: one line that says what is kept, not click's bare "aborted"
    import pipeline.datasets.collect
    from pipeline.cli import main

    def interrupted(config, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.datasets.collect, "collect", interrupted)
    monkeypatch.setattr(sys, "argv", ["pipeline", "collect", "--episodes", "2", "--out", str(tmp_path / "a.zarr")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["interrupted: committed episodes are kept; continue with --resume"]


def test_dask_workers_commit_the_same_episodes(tmp_path):
    """40 short episodes: after the first of each worker, tasks carry several episodes each."""
    single, multi = tmp_path / "single.zarr", tmp_path / "multi.zarr"
    common = ("--episodes", 40, "--policy", "random", "--max-steps", 30, "--quiet")
    assert run_cli("collect", "--out", single, *common).returncode == 0
    result = run_cli("collect", "--out", multi, "--workers", 2, *common)
    assert result.returncode == 0, result.stderr
    a, b = TransitionStore(str(single)), TransitionStore(str(multi))
    assert a.num_episodes == b.num_episodes == 40
    assert sorted(b.episodes["seed"].tolist()) == list(range(40))
    returns_a = dict(zip(a.episodes["seed"].tolist(), a.episodes["return"].tolist()))
    returns_b = dict(zip(b.episodes["seed"].tolist(), b.episodes["return"].tolist()))
    assert returns_a == pytest.approx(returns_b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the writer listens for workers where it forks")
def test_local_dask_workers_deliver_their_episodes_to_the_writer_not_through_the_collector(tmp_path, monkeypatch):
    # moving episodes through the collector cost it ~19 us of CPU a step, ~5% of a core the workers need
    from pipeline.datasets.collect import CollectConfig, collect
    from pipeline.datasets.writer_process import Delivered, StoreWriterProcess

    handed_over, put = [], StoreWriterProcess.put

    def noted(self, item):
        handed_over.append(item)
        return put(self, item)

    monkeypatch.setattr(StoreWriterProcess, "put", noted)
    out = tmp_path / "a.zarr"
    summary = collect(CollectConfig(out=str(out), episodes=12, policy="random", max_steps=30, workers=2),
                      progress=False)
    assert handed_over and all(isinstance(item, Delivered) for item in handed_over)
    assert sum(item.episodes for item in handed_over) == 12
    store = TransitionStore(str(out))
    assert sorted(store.episodes["seed"].tolist()) == list(range(12))
    assert summary["episodes_committed"] == summary["episodes_recorded"] == 12
    assert summary["steps"] == sum(item.steps for item in handed_over) == store.num_transitions


def test_where_the_writer_cannot_listen_local_workers_send_episodes_through_the_collector(tmp_path, monkeypatch):
    # a socket path longer than the kernel takes (a deep TMPDIR): collect still works, the old way
    from pipeline.datasets import writer_process
    from pipeline.datasets.collect import CollectConfig, collect
    from pipeline.datasets.writer_process import StoreWriterProcess

    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    mkdtemp = writer_process.tempfile.mkdtemp
    monkeypatch.setattr(writer_process.tempfile, "mkdtemp",  # the writer's folder only (dask makes its own)
                        lambda *args, prefix=None, **kwargs: str(deep) if prefix == "pipeline-writer-"
                        else mkdtemp(*args, prefix=prefix, **kwargs))
    handed_over, put = [], StoreWriterProcess.put

    def noted(self, item):
        handed_over.append((self.address, type(item).__name__))
        return put(self, item)

    monkeypatch.setattr(StoreWriterProcess, "put", noted)
    out = tmp_path / "a.zarr"
    collect(CollectConfig(out=str(out), episodes=6, policy="random", max_steps=20, workers=2), progress=False)
    assert handed_over and set(handed_over) == {(None, "Episode")}
    assert sorted(TransitionStore(str(out)).episodes["seed"].tolist()) == list(range(6))


def test_dask_tasks_carry_about_a_second_of_episodes_and_shrink_at_the_end():
    from pipeline.datasets.collect import TASK_EPISODES, TASK_STEPS, task_size

    assert task_size(None, 1000, 2) == 1  # no episode back yet: their length is unknown
    assert task_size(260.0, 1000, 2) == TASK_STEPS // 260  # expert laps: a few per task
    assert task_size(11.0, 100_000, 2) == TASK_EPISODES  # short random episodes: capped
    assert task_size(5000.0, 1000, 2) == 1  # episodes longer than a task (CARLA): one each
    assert task_size(11.0, 40, 2) == 5  # near the end: a quarter of each worker's share
    assert task_size(11.0, 3, 2) == 1


def test_ctrl_c_keeps_the_episodes_of_the_dask_tasks_running():
    """A dask task drives several episodes and returns them together: on Ctrl-C collect waits for
    the tasks in flight, so that the episodes the workers finished are kept, not dropped."""
    import threading

    from pipeline.cluster import dask_client
    from pipeline.datasets.collect import CollectConfig, _episodes_on

    config = CollectConfig(out="unused", episodes=40, policy="random", max_steps=30)
    with dask_client(1, None) as client:
        episodes = _episodes_on(client)(config, list(range(40)), threading.Event())
        first = next(episodes)
        try:  # Ctrl-C while the driver waits in the source
            kept = [episodes.throw(KeyboardInterrupt)]
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C dropped the episodes of the dask tasks in flight")
        with pytest.raises(KeyboardInterrupt):  # ... which is raised again once they are in
            while True:
                kept.append(next(episodes))
    seeds = [first.seed] + [e.seed for e in kept]
    assert len(set(seeds)) == len(seeds) and len(kept) >= 1  # the window's other task came back
    assert all(len(e.vector) == e.length + 1 for e in kept)  # whole episodes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the writer listens for workers where it forks")
def test_ctrl_c_keeps_the_episodes_workers_delivered_for_the_tasks_running(tmp_path):
    """The same with a local cluster, whose workers deliver to the writer: the receipts of the tasks
    in flight count, so the writer commits their episodes before it closes."""
    import threading

    from pipeline.cluster import dask_client
    from pipeline.datasets.collect import CollectConfig, _episodes_on
    from pipeline.envs import obs_spec_for
    from pipeline.datasets.writer_process import Delivered, StoreWriterProcess

    config = CollectConfig(out=str(tmp_path / "a.zarr"), episodes=40, policy="random", max_steps=30)
    spec = obs_spec_for(config.routes[0], config.vector_fields, config.traffic, config.camera)
    with StoreWriterProcess(listen=True) as writer, dask_client(1, None) as client:
        writer.open(config.out, spec)
        receipts = _episodes_on(client, writer.address)(config, list(range(40)), threading.Event())
        kept = [next(receipts)]
        try:  # Ctrl-C while the driver waits in the source
            kept.append(receipts.throw(KeyboardInterrupt))
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C dropped the receipts of the dask tasks in flight")
        with pytest.raises(KeyboardInterrupt):  # ... which is raised again once they are in
            while True:
                kept.append(next(receipts))
        assert all(isinstance(receipt, Delivered) for receipt in kept)
        for receipt in kept:
            writer.put(receipt)
        writer.finish()
    store = TransitionStore(config.out)
    seeds = store.episodes["seed"].tolist()
    assert len(set(seeds)) == len(seeds) >= sum(receipt.episodes for receipt in kept) >= 2
    assert store.num_transitions >= sum(receipt.steps for receipt in kept)


def test_our_local_cluster_runs_its_workers_without_the_profiler_or_dasks_malloc_trim(monkeypatch):
    """dask's statistical profiler samples each worker every 10 ms under the GIL, and dask's
    MALLOC_TRIM_THRESHOLD_=65536 made an env loop's heap fault back in at every step (a worker drove
    ~20% slower); the cluster that `collect --workers N` starts turns both off in its workers, keeps
    one thread per worker, and leaves the caller's config and environment as they were."""
    import dask

    from pipeline.cluster import dask_client

    for name in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "PYTHONHASHSEED"):
        monkeypatch.delenv(name, raising=False)
    environment = dict(os.environ)

    def worker_settings():
        import os
        import signal

        import dask

        return (dask.config.get("distributed.worker.profile.enabled"),
                os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS"),
                dask.config.get("distributed.admin.tick.interval"),
                signal.getsignal(signal.SIGINT) is signal.SIG_IGN)  # Ctrl-C is the driver's to handle

    with dask_client(1, None) as client:
        seen = client.run(worker_settings)
    assert list(seen.values()) == [(False, None, "1", "1s", True)]  # its event loop wakes every 1 s, not 20 ms
    assert dask.config.get("distributed.worker.profile.enabled") is True
    assert dask.config.get("distributed.admin.tick.interval") != "1s"
    assert dict(os.environ) == environment  # the nannies wrote their variables here; they are gone


def test_collect_joins_an_existing_dask_scheduler(tmp_path):
    from dask.distributed import LocalCluster

    out = tmp_path / "remote.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=50) as cluster:
        result = run_cli("collect", "--episodes", 3, "--policy", "random", "--max-steps", 20,
                         "--scheduler", cluster.scheduler_address, "--out", out, "--quiet")
        assert result.returncode == 0, result.stderr
        prefixes = cluster.scheduler.task_prefixes  # the episodes ran on that cluster
        assert "run_episodes" in prefixes
        assert sum(prefixes["run_episodes"].state_counts.values()) >= 1
    assert TransitionStore(str(out)).num_episodes == 3


def test_unreachable_scheduler_is_one_line(tmp_path):
    assert_one_line_error(run_cli("collect", "--episodes", 1, "--scheduler", "tcp://127.0.0.1:9", "--out",
                                  tmp_path / "x.zarr", "--quiet"), "127.0.0.1:9")
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("episodes", ["0", "-3"])
def test_non_positive_episode_count_is_refused(tmp_path, episodes):
    assert_one_line_error(run_cli("collect", "--episodes", episodes, "--out", tmp_path / "x.zarr"), "--episodes")
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("args, needle", [
    (("--traffic", -1), "traffic"),
    (("--vector-fields", "warp"), "warp"),
    (("--policy", "missing.pt"), "missing.pt"),
])
def test_bad_options_fail_before_a_store_is_created(tmp_path, args, needle):
    assert_one_line_error(run_cli("collect", "--episodes", 1, "--out", tmp_path / "x.zarr", *args), needle)
    assert not (tmp_path / "x.zarr").exists()


def test_unknown_route_lists_known_routes(tmp_path):
    assert_one_line_error(run_cli("collect", "--route", "moon", "--out", tmp_path / "x.zarr"), "moon", "racetrack-oval")


def test_existing_out_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "c.zarr"
    assert run_cli("collect", "--episodes", 1, "--out", out, "--max-steps", 10, "--quiet").returncode == 0
    assert_one_line_error(run_cli("collect", "--episodes", 1, "--out", out, "--quiet"), "--resume", "--overwrite")
    assert TransitionStore(str(out)).num_episodes == 1  # untouched
    assert run_cli("collect", "--episodes", 1, "--out", out, "--max-steps", 12, "--overwrite",
                   "--quiet").returncode == 0
    assert TransitionStore(str(out)).num_transitions == 12


def test_unwritable_output_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_one_line_error(run_cli("collect", "--episodes", 1, "--out", blocker / "x.zarr", "--quiet"))


def test_not_a_store_and_wrong_version(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    assert_one_line_error(run_cli("datasets", "info", plain), str(plain))
    assert_one_line_error(run_cli("datasets", "info", tmp_path / "missing.zarr"), "missing.zarr")
    out = tmp_path / "v.zarr"
    assert run_cli("collect", "--episodes", 1, "--out", out, "--max-steps", 5, "--quiet").returncode == 0
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["format_version"] = 99
    assert_one_line_error(run_cli("datasets", "info", out), "version")


_CHURN = """
import ctypes, resource, sys
import numpy as np
from pipeline.datasets.collect import keep_freed_memory
if sys.argv[1] == "keep":
    if not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallopt"):
        print("unsupported"); sys.exit()
    assert keep_freed_memory(), "glibc refused the mallopt settings"
faults = []
for _ in range(8):  # as episodes' frame buffers: a dozen of 0.5-4 MB alive at once, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [np.ones((64 << i % 4, 84, 84), np.uint8) for i in range(12)]
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def test_a_collecting_process_keeps_the_memory_it_frees_for_the_next_episodes():
    def faults(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True,
                              env=cli_env(), check=True).stdout.strip()

    kept = faults("keep")
    if kept == "unsupported":
        pytest.skip("no mallopt here: it is glibc's, on Linux")
    # glibc's defaults give the buffers back and fault every page in again each round (~4k faults)
    assert int(faults("default")) > 20 * max(int(kept), 1)
