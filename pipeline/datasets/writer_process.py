"""The store's one writer in a process of its own, fed whole episodes over a pipe.

Why a process: every commit runs tens of milliseconds of zarr's Python, and a writer *thread* holds
the GIL the env loop needs for all of it (collect ran at 0.84-0.93 of the raw env rate with one).
In its own process the store work runs on another core and the env loop only hands bytes over.

Why the hand-over is timed, not signalled: every time another thread of the collector takes the
GIL, the env loop waits for that thread to be scheduled and to give it back, about 0.15 ms on the
2-core VM we measure on. A sender woken per finished episode, with a system call per array, held
collect at 0.90 of the raw env rate with short random episodes, even with a writer that stored
nothing. So :meth:`StoreWriterProcess.put` only appends to a deque, and a sender thread looks every
``SEND_INTERVAL_S`` and sends everything waiting as one message, through a pipe widened to 1 MiB.

    >>> with StoreWriterProcess() as writer:              # the process starts; no store is touched
    ...     writer.open("runs/a.zarr", obs_spec, meta={"policy": "expert"})  # ready, or one-line error
    ...     writer.put(episode)                           # returns at once; committed in order
    ...     writer.finish()                               # everything handed over is committed

Local dask workers hand their episodes to the writer directly: the writer listens on a Unix socket
(``StoreWriterProcess(listen=True)``, Linux), each worker process sends its tasks' episodes there
with :func:`deliver` and returns the collector only a :class:`Delivered` receipt. The collector then
moves no episode bytes at all: dask carrying them to it, and the collector passing them on, took
~19 us of CPU a step, ~5% of a core that the two workers of a 2-core machine need.

Wire format, no pickle: each message to the writer (``Connection.send_bytes``) is an 8-byte length,
a JSON header, then raw bytes: ``open``, ``episodes`` (the header names each episode's arrays, as
name, dtype and shape, and their bytes follow in that order) and ``end`` (with the number of
episodes handed over in all, through the pipe or delivered by workers: the writer commits that many
before it closes). A worker's connection carries ``episodes`` messages only. The writer answers with
JSON documents: ``ready`` (with the committed count), ``committed`` (after each commit, with the
summaries of the episodes it committed), ``closed`` or ``error``.

Crash guarantees are the store's: only whole episodes are ever committed. If the collecting process
dies (kill -9), the writer dies with it (Linux: ``PR_SET_PDEATHSIG``; elsewhere it stops at the
pipe's end) and writes nothing more, so a kill loses at most the episodes in flight (those of the
last ``SEND_INTERVAL_S`` + ``COMMIT_INTERVAL_S``, 1.25 s, besides the ones being driven) and a
following ``--resume`` is the store's only writer. A worker that dies in the middle of a delivery
leaves a partial message, which the writer drops; if dask then runs its task again, an episode
delivered twice is stored once (a collection drives each seed once). Ctrl-C reaches the collector
alone: the writer ignores SIGINT, and :meth:`StoreWriterProcess.finish` commits everything handed
over before it returns.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline import errors
from pipeline.datasets.episode import Episode, EpisodeSummary
from pipeline.envs.spec import ActionSpec, ObsSpec
from pipeline.errors import PipelineError, StoreError

EPISODE_ARRAYS = ("frames", "vector", "action", "reward", "terminated", "truncated", "expert_action")
MAX_BATCH = 64  # episodes in one message
COMMIT_INTERVAL_S = 1.0  # episodes finishing this close together share a commit
# Episodes in one commit at most. The interval decides, not a count: a commit costs ~25 ms of
# store work however few episodes it holds (16 arrays' last chunks and the attrs), and the last
# episodes of a collection, handed over together, take one commit instead of one per message.
MAX_STAGED = 4096
SEND_INTERVAL_S = 0.25  # the sender looks for finished episodes this often
IN_FLIGHT = 64  # episodes waiting on each side of the pipe; put() waits beyond that (back-pressure)
PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size: a message of ~0.25 s of driving in 1-4 writes
#: After the end, how long the writer waits for a delivery that has not come before it says so.
#: A task reports its delivery only once the episodes are in the socket, so they are on their way.
DELIVERY_WAIT_S = 30.0


@dataclass(frozen=True)
class Delivered:
    """A worker's receipt for episodes it sent to the writer itself (:func:`deliver`): hand it to
    :meth:`StoreWriterProcess.put` so that the writer waits for them at the end."""

    episodes: int
    steps: int


#: This process's connections to writers, by address: a dask worker keeps one across its tasks.
_deliveries: dict[str, multiprocessing.connection.Connection] = {}


def deliver(address: str, episodes: list[Episode]) -> Delivered:
    """Send ``episodes`` to the writer listening at ``address`` (a dask worker's side of
    ``StoreWriterProcess(listen=True)``) as one message; returns once they are in the socket."""
    connection = _deliveries.get(address)
    if connection is None:
        connection = _deliveries[address] = multiprocessing.connection.Client(address, family="AF_UNIX")
    try:
        connection.send_bytes(pack_episodes(episodes))
    except BaseException:
        _deliveries.pop(address, None)  # half a message may be in the socket: never send after it
        connection.close()
        raise
    return Delivered(episodes=len(episodes), steps=sum(e.length for e in episodes))


def _plain(value):
    """numpy scalars (an env's info values) as the Python numbers JSON knows."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _send_json(conn, message: dict) -> None:
    conn.send_bytes(json.dumps(message, default=_plain).encode())


def _recv_json(conn) -> dict:
    return json.loads(conn.recv_bytes())


def _framed(header: dict, payload=()) -> bytes:
    """One message of the episodes pipe: an 8-byte length, a JSON header, then raw bytes (if any)."""
    text = json.dumps(header, default=_plain).encode()
    return b"".join([len(text).to_bytes(8, "little"), text, *payload])


def _unframed(message: bytes) -> tuple[dict, int]:
    """A :func:`_framed` message's header, and where its raw bytes start."""
    offset = 8 + int.from_bytes(message[:8], "little")
    return json.loads(message[8:offset]), offset


def pack_episodes(episodes: list[Episode]) -> bytes:
    """Episodes as one message: a header naming each episode's arrays (name, dtype, shape), then
    every array's bytes in that order. One message, so one system call or two, for a whole batch."""
    described, payload = [], []
    for episode in episodes:
        arrays = {name: np.ascontiguousarray(getattr(episode, name)) for name in EPISODE_ARRAYS
                  if getattr(episode, name) is not None}
        described.append({"route": episode.route, "seed": int(episode.seed), "termination": episode.termination,
                          "info": episode.info,
                          "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]})
        payload.extend(a.reshape(-1).view(np.uint8) for a in arrays.values())
    return _framed({"op": "episodes", "episodes": described}, payload)


def unpack_episodes(message: bytes) -> list[Episode]:
    """The episodes of one :func:`pack_episodes` message (their arrays view the message's bytes)."""
    return _episodes_of(message, *_unframed(message))


def _episodes_of(message: bytes, header: dict, offset: int) -> list[Episode]:
    """The episodes an ``episodes`` message's ``header`` describes, from its bytes at ``offset`` on."""
    episodes = []
    for described in header["episodes"]:
        arrays = {}
        for name, dtype, shape in described.pop("arrays"):
            dtype = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(message, dtype, count, offset).reshape(shape)
            offset += count * dtype.itemsize
        episodes.append(Episode(**arrays, **described))
    return episodes


def _error_message(exc: BaseException) -> dict:
    if isinstance(exc, PipelineError):
        return {"op": "error", "kind": type(exc).__name__, "message": str(exc)}
    return {"op": "error", "kind": "bug", "message": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()}


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


@dataclass(frozen=True)
class _End:
    """The collector's end: ``total`` episodes were handed over, through its pipe or delivered."""

    total: int


_LOST = "lost"


def _read_episodes(conn, inbox: queue.Queue) -> None:
    """Writer side: episodes from the collector's pipe into ``inbox``, then its :class:`_End`, or
    ``_LOST`` at EOF."""
    try:
        while True:
            message = conn.recv_bytes()
            header, offset = _unframed(message)
            if header["op"] == "end":
                inbox.put(_End(header["total"]))
                return
            for episode in _episodes_of(message, header, offset):
                inbox.put(episode)
    except (EOFError, OSError):
        inbox.put(_LOST)


class _Deliveries:
    """Writer side: accepts workers' connections on ``listener`` and puts the episodes they deliver
    into ``inbox``, each seed once (a task that dask ran again delivers its episodes again)."""

    def __init__(self, listener: socket.socket, inbox: queue.Queue):
        self.listener, self.inbox = listener, inbox
        self.seeds: set[int] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, name="deliveries", daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed: the writer is done
            while True:
                sock, _ = self.listener.accept()
                connection = multiprocessing.connection.Connection(sock.detach())
                threading.Thread(target=self._read, args=(connection,), name="delivery", daemon=True).start()

    def _read(self, connection) -> None:
        # EOF: the worker is gone; in the middle of a message (it died sending), that message is dropped
        with contextlib.suppress(EOFError, OSError), connection:
            while True:
                message = connection.recv_bytes()
                for episode in _episodes_of(message, *_unframed(message)):
                    with self.lock:
                        if episode.seed in self.seeds:
                            continue
                        self.seeds.add(episode.seed)
                    self.inbox.put(episode)


def _arrivals(inbox: queue.Queue, wait: float | None, limit: int) -> tuple[list[Episode], object]:
    """The next episode of ``inbox`` (waiting up to ``wait`` seconds; None: as long as it takes)
    with those already behind it, up to ``limit``; and the :class:`_End` or ``_LOST`` that came
    next, if one did."""
    episodes: list[Episode] = []
    with contextlib.suppress(queue.Empty):
        item = inbox.get(timeout=wait)
        while isinstance(item, Episode):
            episodes.append(item)
            if len(episodes) >= limit:
                break
            item = inbox.get_nowait()
        else:
            return episodes, item
    return episodes, None


def _serve(episodes_conn, replies_conn, parent_ends, listener: socket.socket | None) -> None:
    """The writer process: open the store when told, then commit episodes in order of arrival until
    the end (with ``listener``, workers' deliveries too)."""
    # Ctrl-C and SIGTERM are the collector's to handle: it hands over the episodes it has finished,
    # then ends this process. If the collector dies instead, PR_SET_PDEATHSIG ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
        order, _ = _unframed(episodes_conn.recv_bytes())
    except (EOFError, OSError):
        return  # the collector changed its mind (a bad option, an unreachable cluster)
    if order["op"] != "open":
        return
    try:
        writer = EpisodeWriter(order["url"], ObsSpec.from_dict(order["obs_spec"]),
                               ActionSpec.from_dict(order["action_spec"]), meta=order["meta"],
                               mode=order["mode"], reward=order["reward"])
    except BaseException as exc:
        _send_json(replies_conn, _error_message(exc))
        return
    _send_json(replies_conn, {"op": "ready", "committed": writer.committed_episodes})
    inbox: queue.Queue = queue.Queue(maxsize=IN_FLIGHT)  # full: the pipe fills, the collector waits
    threading.Thread(target=_read_episodes, args=(episodes_conn, inbox), daemon=True).start()
    if listener is not None:
        _Deliveries(listener, inbox)
    try:
        # Episodes are staged as they come (the frame chunks they fill are compressed at once) and
        # committed together every COMMIT_INTERVAL_S: one commit per short episode costs more store
        # work than the episodes' own bytes. So at the end only the last partial chunks are left.
        staged: list[EpisodeSummary] = []
        deadline = None
        received, total = 0, None  # total: what the collector handed over in all, once it ends
        missing = 0  # of the total, episodes that never came (a bug, not a normal end)
        while True:
            if total is not None:
                wait = DELIVERY_WAIT_S  # the end is said; deliveries are still on their way
            else:
                wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            episodes, said = _arrivals(inbox, wait, MAX_STAGED - len(staged))
            if said is _LOST:
                os._exit(1)  # the collector is gone without saying the end: write nothing more
            if isinstance(said, _End):
                total = said.total
            elif total is not None and not episodes:  # waited DELIVERY_WAIT_S for nothing
                missing = total - received
            if episodes:
                writer.stage(episodes)
                staged.extend(episode.summary() for episode in episodes)
                received += len(episodes)
                deadline = deadline or time.monotonic() + COMMIT_INTERVAL_S
            ending = total is not None and (received >= total or missing > 0)
            if staged and (ending or len(staged) >= MAX_STAGED or time.monotonic() >= deadline):
                committed = writer.commit()
                _send_json(replies_conn, {"op": "committed", "committed": committed,
                                          "summaries": [dataclasses.asdict(summary) for summary in staged]})
                staged, deadline = [], None
            if ending:
                writer.close()
                if missing:
                    raise StoreError(f"{missing} episodes that workers reported delivered never reached the "
                                     f"store writer; the {writer.committed_episodes} committed episodes are "
                                     f"intact: continue with --resume")
                _send_json(replies_conn, {"op": "closed", "committed": writer.committed_episodes})
                return
    except BaseException as exc:
        _send_json(replies_conn, _error_message(exc))
    finally:
        if listener is not None:
            listener.close()


def _take(items: collections.deque, limit: int) -> list:
    """Up to ``limit`` items from the left of ``items`` (which another thread may clear meanwhile)."""
    taken = []
    with contextlib.suppress(IndexError):
        while len(taken) < limit:
            taken.append(items.popleft())
    return taken


def _widen(conn) -> None:
    """Linux: let the pipe hold PIPE_BYTES, so a message takes a few writes, not one per 64 KiB."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or a lower pipe-max-size
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _context():
    # fork starts the writer at once with the collector's modules loaded (spawn pays ~1 s of
    # imports); the child only ever runs store code, and zarr and fsspec reset their I/O threads
    # after a fork. Elsewhere (macOS, Windows) fork is unsafe or missing.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


class StoreWriterProcess:
    """The one :class:`~pipeline.datasets.store.EpisodeWriter` of a store, in a child process.

    ``on_commit(summary, committed)`` is called (on a thread of this process) for each episode once
    it is committed, in order, with its :class:`~pipeline.datasets.episode.EpisodeSummary` and the
    store's committed count after it. ``committed_episodes`` is the store's count as the writer last
    reported it.

    ``listen=True`` (Linux) also lets other processes on this machine deliver episodes: ``address``
    is the writer's Unix socket, for :func:`deliver`; None without it.
    """

    def __init__(self, on_commit: Callable[[EpisodeSummary, int], None] | None = None, listen: bool = False):
        self.on_commit = on_commit
        self.committed_episodes = 0
        self.error: BaseException | None = None
        import pipeline.datasets.store  # noqa: F401  loaded before a fork, so the writer starts warm

        context = _context()
        # The socket is bound and listening before the fork, in a folder only this user can enter:
        # a worker that connects before the writer accepts waits in the backlog, never refused.
        self.address, self._socket_folder, listener = None, None, None
        if listen and context.get_start_method() == "fork":
            listener = self._listen()
        child_episodes, self._episodes = context.Pipe(duplex=False)
        _widen(self._episodes)
        self._replies, child_replies = context.Pipe(duplex=False)
        self._process = context.Process(target=_serve, name="episode-writer", daemon=True,
                                        args=(child_episodes, child_replies, (self._episodes, self._replies),
                                              listener))
        self._process.start()
        child_episodes.close()
        child_replies.close()
        if listener is not None:
            listener.close()  # the writer's now; this process only removes its folder at the end
        self._outbox: collections.deque[Episode] = collections.deque()  # put() appends, the sender takes
        self._handed_over = 0  # episodes put or delivered: the writer commits this many before it ends
        self._ending = threading.Event()  # finish(): send what is left now, then the end
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reaper: threading.Thread | None = None  # waits for the writer's exit after "closed"
        self._ready = False  # the writer has opened the store
        self._url = ""

    def _listen(self) -> socket.socket | None:
        """The writer's socket, bound and listening (``address`` set), or None where it cannot be:
        a temp folder that cannot be made, or a path too long for a socket (a deep TMPDIR). The
        workers' episodes then come through the collector, as from a remote cluster."""
        listener = None
        try:
            self._socket_folder = tempfile.mkdtemp(prefix="pipeline-writer-")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(os.path.join(self._socket_folder, "episodes.sock"))
            listener.listen(64)
        except OSError:
            if listener is not None:
                listener.close()
            return None
        self.address = listener.getsockname()
        return listener

    def open(self, url: str, obs_spec: ObsSpec, action_spec: ActionSpec = ActionSpec(), meta: dict | None = None,
             mode: str = "create", reward: dict | None = None, wait: bool = True) -> None:
        """Open (or create) the store in the writer; its errors are raised here, as they would be by
        :class:`~pipeline.datasets.store.EpisodeWriter` (one line, same type).

        ``wait=False`` returns at once: the writer creates the store while the caller drives (a
        new store takes it ~30-60 ms), episodes put meanwhile wait in the pipe, and an error
        opening is raised by the next :meth:`put` or by :meth:`finish` instead. For a new store
        only (``committed_episodes`` stays 0 until the writer is ready)."""
        self._url = url
        self._episodes.send_bytes(_framed({"op": "open", "url": str(url), "obs_spec": obs_spec.to_dict(),
                                           "action_spec": action_spec.to_dict(), "meta": meta, "mode": mode,
                                           "reward": reward}))
        if wait:
            self._on_reply(self._next_reply())
        self._threads = [threading.Thread(target=self._send, name="episode-sender", daemon=True),
                         threading.Thread(target=self._receive, name="episode-commits", daemon=True)]
        for thread in self._threads:
            thread.start()

    def put(self, episode: Episode | Delivered) -> None:
        """Hand one whole episode over, or say that a worker :func:`deliver`-ed some; returns at once
        (waits only while IN_FLIGHT are waiting).

        Nothing is signalled: the sender finds the episode within ``SEND_INTERVAL_S``."""
        if self.error is not None:
            raise self.error
        if isinstance(episode, Delivered):
            if self.address is None:
                raise ValueError("episodes were delivered to a writer that does not listen for them")
            self._handed_over += episode.episodes
            return
        while len(self._outbox) >= IN_FLIGHT and self.error is None:
            time.sleep(SEND_INTERVAL_S / 10)
        if self.error is not None:
            raise self.error
        self._handed_over += 1
        self._outbox.append(episode)

    def finish(self) -> None:
        """Commit everything handed over, close the store and end the writer; raises its error."""
        if self._threads and not self._closed.is_set():
            self._ending.set()
            while not self._closed.wait(0.1) and self._threads[1].is_alive():
                pass
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """End the writer process without waiting for what it holds (after :meth:`finish`, or to
        give up before :meth:`open`)."""
        self._outbox.clear()  # a sender still running finds nothing more to send, and stops
        self._ending.set()
        self._episodes.close()
        if self._closed.is_set():
            # The writer closed the store and said so; all it does now is exit, ~10 ms of tearing
            # down its copy of this process's memory, which nobody needs to wait for.
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._process.join, name="episode-writer-exit", daemon=True)
                self._reaper.start()
        else:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        for thread in self._threads:  # both end with the process: its pipe ends are closed now
            thread.join(timeout=5)
        self._replies.close()
        if self._socket_folder is not None:
            shutil.rmtree(self._socket_folder, ignore_errors=True)

    def __enter__(self) -> "StoreWriterProcess":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # -- this process's two helper threads: bytes out, commit notices in

    def _send(self) -> None:
        try:
            while True:
                ending = self._ending.wait(SEND_INTERVAL_S)
                while episodes := _take(self._outbox, MAX_BATCH):  # everything waiting
                    self._episodes.send_bytes(pack_episodes(episodes))
                if ending:
                    self._episodes.send_bytes(_framed({"op": "end", "total": self._handed_over}))
                    return
        except (OSError, ValueError):  # the writer is gone; _receive says why
            pass
        except BaseException as exc:  # an episode that cannot be sent: the writer stops, nothing half-sent is kept
            self.error = exc
            self._episodes.close()

    def _next_reply(self) -> dict:
        """The writer's next reply; its error raised here. EOF (the writer died) says what is kept."""
        try:
            reply = _recv_json(self._replies)
        except EOFError:
            self._process.join(timeout=5)
            if not self._ready:
                raise StoreError(f"the store writer process for {self._url} ended before opening it "
                                 f"(exit code {self._process.exitcode})") from None
            raise StoreError(f"the store writer process for {self._url} died (exit code "
                             f"{self._process.exitcode}); the {self.committed_episodes} committed "
                             f"episodes are intact: continue with --resume") from None
        if reply["op"] == "error":
            _raise_from(reply)
        return reply

    def _on_reply(self, reply: dict) -> None:
        if reply["op"] == "committed" and self.on_commit is not None:
            summaries = reply["summaries"]
            for i, summary in enumerate(summaries):
                self.on_commit(EpisodeSummary(**summary), reply["committed"] - len(summaries) + i + 1)
        self.committed_episodes = reply["committed"]
        self._ready = True
        if reply["op"] == "closed":
            self._closed.set()

    def _receive(self) -> None:
        try:
            while not self._closed.is_set():
                self._on_reply(self._next_reply())
        except BaseException as exc:
            self.error = self.error or exc
