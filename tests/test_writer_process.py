"""The store's writer process: episodes through the shared-memory ring unchanged, store work off the collector's
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
from pipeline.datasets.episode_ring import EpisodeRing, RingConsumer, RingLayout, RingProducer, RingRecorder
from pipeline.datasets.writer_process import StoreWriterProcess
from pipeline.errors import StoreError
from tests.test_store import SPEC, assert_bits_equal, assert_episode_equal, make_episode

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and PR_SET_PDEATHSIG are Linux's")


def _ring_round_trip(episodes, rows: int, steps_by_hand=False):
    """Episodes through a ring of ``rows`` rows (read by a thread, as the writer does); what comes out."""
    layout = RingLayout(image_size=SPEC.image_size, vector_dim=SPEC.vector_dim, rows=rows, slots=4)
    ring = EpisodeRing.create(layout, threading.Lock())
    got, done = [], threading.Event()

    def read():
        consumer = RingConsumer(ring)
        while not done.is_set() or ring.cursors[:4].tolist() != ring.cursors[4:].tolist():
            got.extend(consumer.drain())
            time.sleep(0.001)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        producer = RingProducer(ring, is_alive=lambda: None)
        for episode in episodes:
            if not steps_by_hand:
                producer.put_episode(episode)
                continue
            recorder = RingRecorder(producer, episode.route, episode.seed)
            recorder.start(episode.observation(0))
            for t in range(episode.length):
                recorder.add(episode.action[t], episode.reward[t], episode.observation(t + 1), episode.terminated[t],
                             episode.truncated[t], expert_action=episode.expert_action[t])
            recorder.finish(episode.termination, **episode.info)
        producer.publish()
    finally:
        done.set()
        reader.join()
        ring.close(unlink=True)
    return got


@pytest.mark.parametrize("steps_by_hand", [False, True], ids=["whole", "step-by-step"])
def test_episodes_cross_the_ring_bit_for_bit_even_when_longer_than_it(steps_by_hand):
    episodes = []
    for seed, steps in ((3, 17), (4, 0), (5, 150), (6, 1)):  # 150 steps: 154 frames through a ring of 64
        episode = make_episode(seed, steps)
        episode.expert_action = np.full((steps, 2), np.nan, np.float32)
        episode.expert_action[::2] = 0.25
        episode.info = {"route_completion": np.float32(0.5)}  # numpy scalars travel as JSON numbers
        episode.termination = "collision"
        episodes.append(episode)
    got = _ring_round_trip(episodes, rows=64, steps_by_hand=steps_by_hand)
    assert [e.seed for e in got] == [3, 4, 5, 6]
    for have, want in zip(got, episodes):
        assert_episode_equal(have, want)
        assert_bits_equal(have.expert_action, want.expert_action)
        assert have.info == {"route_completion": 0.5} and have.termination == "collision"


def test_an_episode_abandoned_midway_leaves_no_rows_behind():
    # Ctrl-C mid-episode: its rows are in the ring, but no slot names them; the next episode is whole
    layout = RingLayout(image_size=SPEC.image_size, vector_dim=SPEC.vector_dim, rows=256, slots=4)
    ring = EpisodeRing.create(layout, threading.Lock())
    try:
        producer = RingProducer(ring, is_alive=lambda: None)
        abandoned, whole = make_episode(1, 40), make_episode(2, 5)
        recorder = RingRecorder(producer, "racetrack", 1)
        recorder.start(abandoned.observation(0))
        for t in range(40):
            recorder.add(abandoned.action[t], 1.0, abandoned.observation(t + 1), False, False)
        consumer = RingConsumer(ring)
        assert consumer.drain() == []  # 40 steps published (every 32), no episode yet
        producer.put_episode(whole)
        (got,) = consumer.drain()
        assert_episode_equal(got, whole)
    finally:
        ring.close(unlink=True)


def test_a_full_ring_asks_whether_the_writer_lives():
    layout = RingLayout(image_size=SPEC.image_size, vector_dim=SPEC.vector_dim, rows=16, slots=4)
    ring = EpisodeRing.create(layout, threading.Lock())

    def writer_is_dead():
        raise StoreError("the store writer process died")

    try:
        with pytest.raises(StoreError, match="died"):
            RingProducer(ring, is_alive=writer_is_dead).put_episode(make_episode(0, 40))  # nobody reads
    finally:
        ring.close(unlink=True)


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


@linux_only
def test_a_ring_removed_from_dev_shm_midway_still_finishes(tmp_path):
    # someone cleans /dev/shm during a collection: the mapping lives on, and closing must not fail
    url = str(tmp_path / "a.zarr")
    episodes = [make_episode(seed, 5) for seed in range(3)]
    with StoreWriterProcess() as writer:
        writer.open(url, SPEC)
        writer.put(episodes[0])
        os.remove(f"/dev/shm/{writer._ring.memory.name.lstrip('/')}")
        for episode in episodes[1:]:
            writer.put(episode)
        writer.finish()
    store = TransitionStore(url)
    assert store.num_episodes == 3
    for i, want in enumerate(episodes):
        assert_episode_equal(store.episode(i), want)
