"""The store's writer process: bytes over the pipe unchanged, store work off the collector's
process, and the crash guarantees (a killed collector takes its writer along; a dead writer is one
line that says what is kept)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from pipeline.datasets import writer_process
from pipeline.datasets.collect import CollectConfig, collect
from pipeline.datasets.store import EpisodeWriter, TransitionStore
from pipeline.datasets.writer_process import StoreWriterProcess, receive_episode, send_episode
from pipeline.errors import StoreError
from tests.test_store import SPEC, assert_bits_equal, assert_episode_equal, make_episode

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and PR_SET_PDEATHSIG are Linux's")


def test_an_episode_crosses_the_pipe_bit_for_bit():
    episode = make_episode(3, 17)
    episode.expert_action = np.full((17, 2), np.nan, np.float32)
    episode.expert_action[::2] = 0.25
    episode.info = {"route_completion": np.float32(0.5)}  # numpy scalars travel as JSON numbers
    receiving, sending = multiprocessing.Pipe(duplex=False)
    sender = threading.Thread(target=send_episode, args=(sending, episode))  # the frames overfill the pipe
    sender.start()
    got = receive_episode(receiving, writer_process._recv_json(receiving))
    sender.join()
    assert_episode_equal(got, episode)
    assert_bits_equal(got.expert_action, episode.expert_action)
    assert got.info == {"route_completion": 0.5}


def test_episodes_are_committed_in_order_with_counts(tmp_path):
    url = str(tmp_path / "a.zarr")
    episodes = [make_episode(seed, steps) for seed, steps in ((0, 5), (1, 0), (2, 30))]
    seen = []
    with StoreWriterProcess(on_commit=lambda ep, n: seen.append((ep.seed, n))) as writer:
        writer.open(url, SPEC)
        for episode in episodes:
            writer.put(episode)
        writer.finish()
    assert seen == [(0, 1), (1, 2), (2, 3)]
    store = TransitionStore(url)
    for i, want in enumerate(episodes):
        assert_episode_equal(store.episode(i), want)


def test_open_errors_are_the_writers_own(tmp_path):
    url = str(tmp_path / "a.zarr")
    EpisodeWriter(url, SPEC).close()
    with StoreWriterProcess() as writer, pytest.raises(StoreError, match="already exists; pass --resume"):
        writer.open(url, SPEC)


@linux_only
def test_the_store_is_written_by_another_process(tmp_path, monkeypatch):
    # fork hands this wrapper to the writer: it records which process appends
    pids = tmp_path / "pids"
    original = EpisodeWriter.append_many

    def recording(self, episodes, sources=None):
        import zarr

        with open(pids, "a") as f:
            f.write(f"{os.getpid()} {zarr.config.get('threading.max_workers')}\n")
        return original(self, episodes, sources)

    monkeypatch.setattr(EpisodeWriter, "append_many", recording)
    summary = collect(CollectConfig(out=str(tmp_path / "c.zarr"), episodes=3, policy="random", max_steps=20),
                      progress=False)
    assert summary["episodes_committed"] == 3
    appenders = {tuple(line.split()) for line in pids.read_text().splitlines()}
    assert appenders and str(os.getpid()) not in {pid for pid, _ in appenders}
    # the writer compresses on one thread (a pool per core took the env loop's core), and the
    # collector's own zarr config is left alone
    assert {threads for _, threads in appenders} == {"1"}
    import zarr

    assert zarr.config.get("threading.max_workers") != 1
    # the env loop's own time excludes creating the store and the last commit
    assert 0 < summary["driving_s"] < summary["steps"] / summary["steps_per_s"]


def test_a_dead_writer_is_one_line_that_keeps_the_committed(tmp_path):
    url = str(tmp_path / "a.zarr")
    writer = StoreWriterProcess()
    writer.open(url, SPEC)
    writer.put(make_episode(0, 4))
    deadline = time.time() + 30
    while writer.committed_episodes < 1 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(writer._process.pid, signal.SIGKILL)
    with pytest.raises(StoreError, match=r"died \(exit code -9\); the 1 committed episodes are intact: continue "
                                         r"with --resume"):
        for seed in range(1, 200):  # the death is noticed within a put or two
            writer.put(make_episode(seed, 4))
            time.sleep(0.01)
        writer.finish()
    assert TransitionStore(url).num_episodes == 1


@linux_only
def test_a_killed_collector_takes_its_writer_along(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.getcwd())!r})
        from pipeline.datasets.writer_process import StoreWriterProcess
        from tests.test_store import SPEC, make_episode
        writer = StoreWriterProcess()
        writer.open({str(tmp_path / "a.zarr")!r}, SPEC)
        writer.put(make_episode(0, 4))
        print(writer._process.pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the writer process {child} outlived its killed collector")


def test_the_spawn_start_used_off_linux_writes_the_same(tmp_path, monkeypatch):
    # macOS and Windows start the writer with spawn: everything it needs must reach it by the pipe
    monkeypatch.setattr(writer_process, "_context", lambda: multiprocessing.get_context("spawn"))
    url = str(tmp_path / "spawned.zarr")
    episodes = [make_episode(seed, 6) for seed in range(3)]
    with StoreWriterProcess() as writer:
        writer.open(url, SPEC, meta={"policy": "random"})
        for episode in episodes:
            writer.put(episode)
        writer.finish()
    store = TransitionStore(url)
    assert store.num_episodes == 3 and store.meta["policy"] == "random"
    for i, want in enumerate(episodes):
        assert_episode_equal(store.episode(i), want)
