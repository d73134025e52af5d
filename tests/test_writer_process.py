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
import zarr

from pipeline.datasets import writer_process
from pipeline.datasets.collect import CollectConfig, collect
from pipeline.datasets.remote import verify_store
from pipeline.datasets.store import EpisodeWriter, TransitionStore
from pipeline.datasets.writer_process import StoreWriterProcess
from pipeline.errors import StoreError
from tests.test_store import SPEC, assert_bits_equal, assert_episode_equal, make_episode

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and PR_SET_PDEATHSIG are Linux's")


def test_episodes_cross_the_pipe_bit_for_bit_in_one_message():
    labelled, empty, unlabelled = make_episode(3, 17), make_episode(4, 0), make_episode(5, 40)
    labelled.expert_action = np.full((17, 2), np.nan, np.float32)
    labelled.expert_action[::2] = 0.25
    labelled.info = {"route_completion": np.float32(0.5)}  # numpy scalars travel as JSON numbers
    unlabelled.expert_action = None
    episodes = [labelled, empty, unlabelled]
    receiving, sending = multiprocessing.Pipe(duplex=False)
    message = writer_process.pack_episodes(episodes)
    sender = threading.Thread(target=sending.send_bytes, args=(message,))  # the frames overfill the pipe
    sender.start()
    got = writer_process.unpack_episodes(receiving.recv_bytes())
    sender.join()
    assert len(got) == 3
    for want, have in zip(episodes, got):
        assert_episode_equal(have, want)
    assert_bits_equal(got[0].expert_action, labelled.expert_action)
    assert got[2].expert_action is None
    assert got[0].info == {"route_completion": 0.5}


def test_an_episode_that_cannot_be_described_stops_the_writer_with_nothing_half_sent(tmp_path):
    url = str(tmp_path / "a.zarr")
    bad = make_episode(1, 4)
    bad.info = {"odd": object()}  # not JSON: the message fails before a byte is written
    writer = StoreWriterProcess()
    writer.open(url, SPEC)
    writer.put(make_episode(0, 4))
    writer.put(bad)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        writer.finish()
    store = TransitionStore(url)  # whole episodes only, and never the one that could not be sent
    assert store.num_episodes <= 1 and 1 not in store.episodes["seed"].tolist()


def test_put_hands_over_without_waking_anyone_and_commits_within_a_send_interval(tmp_path, monkeypatch):
    # the env loop's side of the hand-over is an append: the sender finds the episode on its own
    # (a 2 s interval, so that a slow machine cannot have the sender look before the check below)
    monkeypatch.setattr(writer_process, "SEND_INTERVAL_S", 2.0)
    url = str(tmp_path / "a.zarr")
    with StoreWriterProcess() as writer:
        writer.open(url, SPEC)
        writer.put(make_episode(0, 4))
        assert list(writer._outbox) and writer._outbox[0].seed == 0  # still here: nobody was woken
        deadline = time.time() + writer_process.SEND_INTERVAL_S + writer_process.COMMIT_INTERVAL_S + 10
        while writer.committed_episodes < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert writer.committed_episodes == 1 and not writer._outbox
        writer.finish()


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


def _note_each_commit(monkeypatch, path, note) -> None:
    """``EpisodeWriter.commit`` appends ``note(writer)`` to ``path`` first, in whichever process
    commits (fork hands the wrapper to the writer process)."""
    original = EpisodeWriter.commit

    def noted(self):
        with open(path, "a") as f:
            f.write(f"{note(self)}\n")
        return original(self)

    monkeypatch.setattr(EpisodeWriter, "commit", noted)


@linux_only
def test_the_store_is_written_by_another_process(tmp_path, monkeypatch):
    # each commit notes the process that made it and that process's zarr thread count
    pids = tmp_path / "pids"
    _note_each_commit(monkeypatch, pids, lambda writer: f"{os.getpid()} {zarr.config.get('threading.max_workers')}")
    summary = collect(CollectConfig(out=str(tmp_path / "c.zarr"), episodes=3, policy="random", max_steps=20),
                      progress=False)
    assert summary["episodes_committed"] == 3
    appenders = {tuple(line.split()) for line in pids.read_text().splitlines()}
    assert appenders and str(os.getpid()) not in {pid for pid, _ in appenders}
    # the writer compresses on one thread (a pool per core took the env loop's core), and the
    # collector's own zarr config is left alone
    assert {threads for _, threads in appenders} == {"1"}
    assert zarr.config.get("threading.max_workers") != 1
    # the env loop's own time excludes the last commit
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
def test_the_last_episodes_handed_over_take_one_commit_and_the_writer_then_exits(tmp_path, monkeypatch):
    # 64 episodes in 4 messages, all sent by finish(): one commit (~25 ms of store work each,
    # however few episodes), not one per message; finish() returns on the writer's "closed"
    commits = tmp_path / "commits"
    _note_each_commit(monkeypatch, commits, lambda writer: writer._staged_episodes)
    monkeypatch.setattr(writer_process, "SEND_INTERVAL_S", 30.0)
    monkeypatch.setattr(writer_process, "COMMIT_INTERVAL_S", 30.0)  # however slow the machine, the end decides
    monkeypatch.setattr(writer_process, "MAX_BATCH", 16)
    url = str(tmp_path / "a.zarr")
    writer = StoreWriterProcess()
    writer.open(url, SPEC)
    for seed in range(64):
        writer.put(make_episode(seed, 3))
    writer.finish()
    assert commits.read_text().split() == ["64"]
    assert TransitionStore(url).num_episodes == 64
    # finish() did not wait for the writer's exit: a thread reaps it. Wait on that thread, not on the
    # process: two threads reaping one child race (the loser's waitpid finds no child and reads None)
    assert writer._reaper is not None
    writer._reaper.join(timeout=30)
    assert not writer._reaper.is_alive() and writer._process.exitcode == 0


def test_an_open_that_does_not_wait_raises_its_error_from_put_or_finish(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    url = str(blocker / "a.zarr")
    writer = StoreWriterProcess()
    writer.open(url, SPEC, wait=False)  # returns before the writer has tried
    with pytest.raises(StoreError, match="cannot write dataset store at .*a.zarr"):
        for seed in range(200):  # the error is raised by a put or by finish
            writer.put(make_episode(seed, 4))
            time.sleep(0.01)
        writer.finish()
    writer.close()
    assert not os.path.exists(url)


@linux_only
def test_collect_drives_while_its_writer_creates_the_store(tmp_path, monkeypatch):
    from pipeline.datasets import collect as collect_module

    created = tmp_path / "created"
    create = EpisodeWriter._create

    def slow_create(self, *args):
        time.sleep(1.0)  # a slow disk or object store
        group = create(self, *args)
        created.write_text(repr(time.monotonic()))
        return group

    monkeypatch.setattr(EpisodeWriter, "_create", slow_create)  # fork hands it to the writer
    driven = []
    run_episode = collect_module.run_episode
    monkeypatch.setattr(collect_module, "run_episode",
                        lambda config, seed: driven.append(time.monotonic()) or run_episode(config, seed))
    summary = collect(CollectConfig(out=str(tmp_path / "c.zarr"), episodes=3, policy="random", max_steps=20),
                      progress=False)
    assert summary["episodes_committed"] == 3
    assert driven[0] < float(created.read_text())  # the first episode did not wait for the store
    assert TransitionStore(str(tmp_path / "c.zarr")).num_episodes == 3


def test_an_existing_out_stops_collect_before_any_episode_is_driven(tmp_path, monkeypatch):
    from pipeline.datasets import collect as collect_module

    out = str(tmp_path / "c.zarr")
    EpisodeWriter(out, SPEC).close()
    monkeypatch.setattr(collect_module, "run_episode", lambda *args: pytest.fail("an episode was driven"))
    with pytest.raises(StoreError, match="already exists; pass --resume"):
        collect(CollectConfig(out=out, episodes=3, policy="random", max_steps=20), progress=False)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("a mistyped --out")
    with pytest.raises(StoreError, match="refusing to overwrite .* not a zarr store"):
        collect(CollectConfig(out=str(plain), episodes=3, policy="random", max_steps=20, mode="overwrite"),
                progress=False)
    assert (plain / "notes.txt").exists()


# -- deliveries: local dask workers send episodes to the writer themselves (collect --workers N)


def _deliver_from_another_process(address: str, seeds_and_steps: list[tuple[int, int]]) -> "writer_process.Delivered":
    """What a dask worker does: drive (here: make) episodes and deliver them, from its own process."""
    def worker(queue):
        queue.put(writer_process.deliver(address, [make_episode(s, t) for s, t in seeds_and_steps]))

    queue = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(target=worker, args=(queue,))
    process.start()
    receipt = queue.get(timeout=60)
    process.join(timeout=60)
    assert process.exitcode == 0
    return receipt


@linux_only
def test_workers_deliver_episodes_to_the_writer_and_it_waits_for_them_at_the_end(tmp_path):
    url = str(tmp_path / "a.zarr")
    seen = []
    with StoreWriterProcess(on_commit=lambda ep, n: seen.append((ep.seed, ep.length)), listen=True) as writer:
        assert writer.address and os.path.exists(writer.address)
        writer.open(url, SPEC)
        writer.put(make_episode(0, 5))  # through the collector's pipe, as without workers
        receipt = _deliver_from_another_process(writer.address, [(1, 7), (2, 0), (3, 30)])
        assert receipt == writer_process.Delivered(episodes=3, steps=37)
        writer.put(receipt)
        writer.finish()
        assert not os.path.exists(writer.address)  # the socket's folder goes with the writer
    assert sorted(seen) == [(0, 5), (1, 7), (2, 0), (3, 30)]  # summaries come from the writer
    store = TransitionStore(url)
    by_seed = {seed: i for i, seed in enumerate(store.episodes["seed"].tolist())}
    assert sorted(by_seed) == [0, 1, 2, 3]
    for seed, steps in ((0, 5), (1, 7), (2, 0), (3, 30)):
        assert_episode_equal(store.episode(by_seed[seed]), make_episode(seed, steps))
    assert verify_store(url).ok


@linux_only
def test_an_episode_delivered_twice_is_stored_once(tmp_path):
    # dask runs the task of a worker that died after delivering it again: the same seeds come twice
    url = str(tmp_path / "a.zarr")
    with StoreWriterProcess(listen=True) as writer:
        writer.open(url, SPEC)
        _deliver_from_another_process(writer.address, [(4, 6), (5, 9)])
        writer.put(_deliver_from_another_process(writer.address, [(4, 6), (5, 9)]))  # the task's one result
        writer.finish()
    assert sorted(TransitionStore(url).episodes["seed"].tolist()) == [4, 5]


@linux_only
def test_a_delivery_cut_off_midway_is_dropped_whole(tmp_path):
    # a worker killed while sending: its connection ends inside a message
    import socket
    import struct

    url = str(tmp_path / "a.zarr")
    with StoreWriterProcess(listen=True) as writer:
        writer.open(url, SPEC)
        message = writer_process.pack_episodes([make_episode(8, 20)])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as cut:
            cut.connect(writer.address)
            cut.sendall(struct.pack("!i", len(message)) + message[: len(message) // 2])
        writer.put(_deliver_from_another_process(writer.address, [(9, 3)]))
        writer.finish()
    store = TransitionStore(url)
    assert store.episodes["seed"].tolist() == [9]
    assert verify_store(url).ok


@linux_only
def test_a_delivery_reported_but_never_received_is_one_line_that_keeps_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_process, "DELIVERY_WAIT_S", 0.5)  # the forked writer inherits it
    url = str(tmp_path / "a.zarr")
    with StoreWriterProcess(listen=True) as writer:
        writer.open(url, SPEC)
        writer.put(make_episode(0, 5))
        writer.put(writer_process.Delivered(episodes=2, steps=10))  # nothing was sent
        with pytest.raises(StoreError, match="2 episodes that workers reported delivered never reached"):
            writer.finish()
    assert TransitionStore(url).episodes["seed"].tolist() == [0]


def test_a_writer_that_cannot_make_its_socket_folder_still_writes_what_it_is_handed(tmp_path, monkeypatch):
    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/tmp")

    monkeypatch.setattr(writer_process.tempfile, "mkdtemp", unwritable)  # no dask here: only the writer asks
    url = str(tmp_path / "a.zarr")
    with StoreWriterProcess(listen=True) as writer:
        assert writer.address is None  # collect then takes the workers' episodes through the collector
        writer.open(url, SPEC)
        writer.put(make_episode(0, 5))
        writer.finish()
    assert TransitionStore(url).episodes["seed"].tolist() == [0]


def test_a_writer_that_does_not_listen_refuses_a_delivery_receipt(tmp_path):
    with StoreWriterProcess() as writer:
        assert writer.address is None
        writer.open(str(tmp_path / "a.zarr"), SPEC)
        with pytest.raises(ValueError, match="does not listen"):
            writer.put(writer_process.Delivered(episodes=1, steps=1))
