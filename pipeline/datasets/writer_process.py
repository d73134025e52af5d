"""The store's one writer in a process of its own, fed through shared memory.

Why a process: every commit runs tens of milliseconds of zarr's Python, and a writer *thread* holds
the GIL the env loop needs for all of it (collect ran at 0.84-0.93 of the raw env rate with one).
In its own process the store work runs on another core. Why shared memory: a pipe message per
episode wakes another thread or process, and on the 2-core dev box that alone cost the env loop
4-7% of its rate. So the env loop writes its rows into rings in shared memory
(:mod:`pipeline.datasets.episode_ring`) and nothing else; the writer polls them.

    >>> with StoreWriterProcess() as writer:              # the process starts; no store is touched
    ...     writer.open("runs/a.zarr", obs_spec, meta={"policy": "expert"})  # ready, or one-line error
    ...     recorder = writer.recorder(route="racetrack", seed=0)  # EpisodeRecorder's API
    ...     recorder.start(obs); recorder.add(action, reward, next_obs, terminated, truncated)
    ...     recorder.finish("route_done", route_completion=1.0)    # handed over; committed in order
    ...     writer.put(episode)                           # a whole Episode (from a dask worker)
    ...     writer.finish()                               # everything handed over is committed

Control messages travel as JSON documents on two pipes (``Connection.send_bytes``, no pickle): the
collector says ``open`` and ``end``; the writer answers ``ready`` (with the committed count),
``committed`` (after each commit), ``closed`` or ``error``.

Crash guarantees are the store's: only whole episodes are ever committed. If the collecting process
dies (kill -9), the writer dies with it (Linux: ``PR_SET_PDEATHSIG``; elsewhere it stops at the
pipe's end) and writes nothing more, so a kill loses at most the episodes in flight and a following
``--resume`` is the store's only writer. Ctrl-C reaches the collector alone: the writer ignores
SIGINT, and :meth:`StoreWriterProcess.finish` commits everything handed over before it returns.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict
from typing import Callable

from pipeline import errors
from pipeline.datasets.episode import Episode
from pipeline.datasets.episode_ring import (EpisodeRing, EpisodeSummary, RingConsumer, RingLayout, RingProducer,
                                            RingRecorder, plain_number)
from pipeline.envs.spec import ActionSpec, ObsSpec
from pipeline.errors import PipelineError, StoreError

MAX_BATCH = 64  # episodes in one commit
COMMIT_INTERVAL_S = 1.0  # episodes finishing this close together share a commit
IN_FLIGHT = 64  # episodes read out of the ring and waiting for a commit; the reader waits beyond that
POLL_S = 0.005  # how often the writer looks for new rows in the ring


def _send_json(conn, message: dict) -> None:
    conn.send_bytes(json.dumps(message, default=plain_number).encode())


def _recv_json(conn) -> dict:
    return json.loads(conn.recv_bytes())


def _error_message(exc: BaseException) -> dict:
    if isinstance(exc, PipelineError):
        return {"op": "error", "kind": type(exc).__name__, "message": str(exc)}
    return {"op": "error", "kind": "bug", "message": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(exc))}


def _raise_from(reply: dict) -> None:
    """Raise the writer's ``error`` reply in this process: a PipelineError stays one line of its type."""
    kind = getattr(errors, reply["kind"], None)
    if isinstance(kind, type) and issubclass(kind, PipelineError):
        raise kind(reply["message"])
    raise RuntimeError(f"the store writer process failed: {reply['message']}\n{reply.get('traceback', '')}")


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when the collector dies, even by kill -9."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the collector died before prctl: nobody is left to write for
        os._exit(1)


_END, _LOST = "end", "lost"


def _read_ring(consumer: RingConsumer, control, inbox: queue.Queue) -> None:
    """Writer side: episodes out of the ring into ``inbox``, then ``_END`` once the collector says
    the end (and the ring is empty), ``_LOST`` if it is gone without saying it, or the exception."""
    try:
        while True:
            episodes = consumer.drain()
            for episode in episodes:
                inbox.put(episode)
            if not episodes and control.poll(POLL_S):  # the end, or EOF: the collector is gone
                _recv_json(control)
                for episode in consumer.drain():  # what was published before the end
                    inbox.put(episode)
                inbox.put(_END)
                return
    except (EOFError, OSError):
        inbox.put(_LOST)
    except BaseException as exc:
        inbox.put(exc)


def _serve(control, replies_conn, parent_ends, lock) -> None:
    """The writer process: open the store when told, then commit episodes in order until the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the collector's to handle
    for conn in parent_ends:  # a forked child holds the collector's ends too: EOF needs them closed
        conn.close()
    _die_with_parent()
    import zarr

    from pipeline.datasets.store import EpisodeWriter

    # One thread compresses: zarr's pool would otherwise run a codec thread per core, and on a
    # 2-core machine those took the env loop's core during every commit (recording ran at 0.945 of
    # the raw env rate with the pool, 0.982 without; benchmarks/results/collect_throughput.txt).
    zarr.config.set({"threading.max_workers": 1})

    try:
        order = _recv_json(control)
    except (EOFError, OSError):
        return  # the collector changed its mind (a bad option, an unreachable cluster)
    if order["op"] != "open":
        return
    try:
        ring = EpisodeRing.attach(order["ring"], RingLayout(**order["layout"]), lock)
        writer = EpisodeWriter(order["url"], ObsSpec.from_dict(order["obs_spec"]),
                               ActionSpec.from_dict(order["action_spec"]), meta=order["meta"],
                               mode=order["mode"], reward=order["reward"])
    except BaseException as exc:
        _send_json(replies_conn, _error_message(exc))
        return
    _send_json(replies_conn, {"op": "ready", "committed": writer.committed_episodes})
    inbox: queue.Queue = queue.Queue(maxsize=IN_FLIGHT)  # full: the ring fills, the collector waits
    threading.Thread(target=_read_ring, args=(RingConsumer(ring), control, inbox), daemon=True).start()
    try:
        while True:
            # Episodes finishing within COMMIT_INTERVAL_S share one commit: one commit per short
            # episode costs more store work than the episodes' own bytes.
            batch = [inbox.get()]
            deadline = time.monotonic() + COMMIT_INTERVAL_S
            while isinstance(batch[-1], Episode) and len(batch) < MAX_BATCH:
                try:
                    batch.append(inbox.get(timeout=max(deadline - time.monotonic(), 0.0)))
                except queue.Empty:
                    break
            if batch[-1] is _LOST:
                os._exit(1)  # the collector is gone without saying the end: write nothing more
            if isinstance(batch[-1], BaseException):
                raise batch[-1]
            last = batch.pop() if batch[-1] is _END else None
            if batch:
                committed = writer.append_many(batch)
                _send_json(replies_conn, {"op": "committed", "episodes": len(batch), "committed": committed})
            if last is _END:
                writer.close()
                _send_json(replies_conn, {"op": "closed", "committed": writer.committed_episodes})
                return
    except BaseException as exc:
        _send_json(replies_conn, _error_message(exc))


def _context():
    # fork starts the writer at once with the collector's modules loaded (spawn pays ~1 s of
    # imports); the child only ever runs store code, and zarr and fsspec reset their I/O threads
    # after a fork. Elsewhere (macOS, Windows) fork is unsafe or missing.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


class StoreWriterProcess:
    """The one :class:`~pipeline.datasets.store.EpisodeWriter` of a store, in a child process.

    ``on_commit(summary, committed)`` is called (on a thread of this process) for each episode once
    it is committed, in order, with its :class:`~pipeline.datasets.episode_ring.EpisodeSummary`
    (route, seed, length, episode_return, termination, info) and the store's committed count
    after it. ``committed_episodes`` is the store's count as the writer last reported it.
    """

    def __init__(self, on_commit: Callable[[EpisodeSummary, int], None] | None = None):
        self.on_commit = on_commit
        self.committed_episodes = 0
        self.error: BaseException | None = None
        import pipeline.datasets.store  # noqa: F401  loaded before a fork, so the writer starts warm

        context = _context()
        child_control, self._control = context.Pipe(duplex=False)
        self._replies, child_replies = context.Pipe(duplex=False)
        self._lock = context.Lock()  # guards the ring's cursors (made at open, when its shapes are known)
        if os.name == "posix":
            # One tracker of shared memory for both processes, started before the fork: the writer's
            # attach then registers the ring where this process's unlink unregisters it (a tracker of
            # its own would unlink the ring as "leaked" when the writer exits). It also unlinks the
            # ring if both processes are killed.
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
        self._process = context.Process(target=_serve, name="episode-writer", daemon=True,
                                        args=(child_control, child_replies, (self._control, self._replies),
                                              self._lock))
        self._process.start()
        child_control.close()
        child_replies.close()
        self._ring: EpisodeRing | None = None
        self._producer: RingProducer | None = None
        self._uncommitted: collections.deque[EpisodeSummary] = collections.deque()
        self._closed = threading.Event()
        self._receiver: threading.Thread | None = None
        self._ended = False

    def open(self, url: str, obs_spec: ObsSpec, action_spec: ActionSpec = ActionSpec(), meta: dict | None = None,
             mode: str = "create", reward: dict | None = None) -> None:
        """Open (or create) the store in the writer; its errors are raised here, as they would be by
        :class:`~pipeline.datasets.store.EpisodeWriter` (one line, same type)."""
        layout = RingLayout(obs_spec.image_size, obs_spec.vector_dim, action_spec.dim)
        self._ring = EpisodeRing.create(layout, self._lock)
        _send_json(self._control, {"op": "open", "url": str(url), "obs_spec": obs_spec.to_dict(),
                                   "action_spec": action_spec.to_dict(), "meta": meta, "mode": mode,
                                   "reward": reward, "ring": self._ring.memory.name, "layout": asdict(layout)})
        # While the writer creates the store: map the ring's pages here, so that the env loop's
        # first pass over them does not take a page fault per 4 KiB (about 2,000 of them).
        self._ring.frames[:] = 0
        try:
            reply = _recv_json(self._replies)
        except EOFError:
            raise StoreError(f"the store writer process for {url} ended before opening it "
                             f"(exit code {self._process.exitcode})") from None
        if reply["op"] == "error":
            _raise_from(reply)
        self.committed_episodes = reply["committed"]
        self._url = url
        self._producer = RingProducer(self._ring, self._check_alive)
        self._receiver = threading.Thread(target=self._receive, name="episode-commits", daemon=True)
        self._receiver.start()

    def recorder(self, route: str = "", seed: int = -1) -> RingRecorder:
        """An :class:`~pipeline.datasets.episode.EpisodeRecorder` look-alike whose ``finish`` hands
        the episode over (the env loop's way: rows go to shared memory as they are recorded)."""
        self._check_alive()
        return RingRecorder(self._producer, route, seed, on_finish=self._handed_over)

    def put(self, episode: Episode) -> None:
        """Hand one whole episode over; returns once it is in the ring (waits while the ring is full)."""
        self._check_alive()
        self._producer.put_episode(episode, on_finish=self._handed_over)

    def finish(self) -> None:
        """Commit everything handed over, close the store and end the writer; raises its error."""
        if self._receiver is not None and not self._ended and self.error is None:
            self._ended = True
            try:
                self._producer.publish()
                _send_json(self._control, {"op": "end"})
            except OSError:  # the writer is gone; _receive says why
                pass
            while not self._closed.wait(0.1) and self._receiver.is_alive():
                pass
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """End the writer process without waiting for what it holds (after :meth:`finish`, or to
        give up before :meth:`open`)."""
        self._control.close()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        if self._receiver is not None:  # it ends with the process: its pipe end is closed now
            self._receiver.join(timeout=5)
        self._replies.close()
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close(unlink=True)

    def __enter__(self) -> "StoreWriterProcess":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _handed_over(self, summary: EpisodeSummary) -> None:
        self._uncommitted.append(summary)

    def _check_alive(self) -> None:
        """Raise the writer's error, if it has one (asked before each episode and while the ring is full)."""
        if self.error is None and not self._process.is_alive() and self._receiver is not None:
            self._receiver.join(timeout=5)  # it says why the process ended
        if self.error is not None:
            raise self.error

    # -- this process's one helper thread: commit notices in

    def _receive(self) -> None:
        try:
            while True:
                reply = _recv_json(self._replies)
                if reply["op"] == "error":
                    _raise_from(reply)
                if reply["op"] == "committed":
                    for i in range(reply["episodes"]):
                        summary = self._uncommitted.popleft()
                        if self.on_commit is not None:
                            self.on_commit(summary, reply["committed"] - reply["episodes"] + i + 1)
                self.committed_episodes = reply["committed"]
                if reply["op"] == "closed":
                    self._closed.set()
                    return
        except EOFError:
            self._process.join(timeout=5)
            self.error = self.error or StoreError(f"the store writer process for {self._url} died (exit code "
                                    f"{self._process.exitcode}); the {self.committed_episodes} committed "
                                    f"episodes are intact: continue with --resume")
        except BaseException as exc:
            self.error = self.error or exc
