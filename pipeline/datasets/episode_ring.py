"""Episodes handed from the env loop to the store's writer process through shared memory.

The collector writes every step's newest frame, vector and action straight into ring buffers in
one shared-memory block and, every few steps and at each episode's end, publishes how far it got.
The writer process polls the rings every few milliseconds and copies out. So the env loop makes no
system call and wakes no thread or process per episode; on the 2-core dev box a pipe message per
episode (whoever sends it) cost the env loop 4-7% of its rate, while this costs it the copies only.

Layout of the block (``K`` frame stack, ``S`` image side, ``D`` vector size, ``A`` action size):

- ``frames``  uint8   ``(F, S, S)``  the frames of :class:`~pipeline.datasets.episode.Episode`, in order
- ``vector``  float32 ``(F, D)``     one row per observation
- ``action``, ``expert_action`` float32 ``(F, A)``; ``reward`` float32, ``terminated``,
  ``truncated`` bool ``(F,)``: one row per step
- ``slots``   uint8   ``(E, SLOT_BYTES)``: one JSON document per finished episode (where its rows
  start, how many, route, seed, termination, info), ``slot_size`` int64 ``(E,)`` its length
- ``cursors`` int64 ``(8,)``: rows written so far of frames, vectors, steps, episodes (the
  collector's), then rows read so far of each (the writer's). All counts are absolute; a row's
  place in its ring is the count modulo the ring's length.

Cursors change only under a shared lock, so a reader that sees a count also sees the rows before it
on any CPU. Rows of an episode that never finished (Ctrl-C mid-episode) are dropped by the reader:
a slot names where its episode's rows start.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import numpy as np

from pipeline.datasets.episode import Episode
from pipeline.errors import SpecMismatchError, StoreError

RING_ROWS = 1024  # frames (7 MB at 84 x 84) and as many vector and step rows
EPISODE_SLOTS = 256
SLOT_BYTES = 4096  # one episode's JSON: route name, seed, termination, info
PUBLISH_EVERY = 32  # steps between publications within an episode (and at its end)

FRAMES, VECTORS, STEPS, EPISODES = range(4)
READ = 4  # cursors[READ + i]: rows of ring i the writer has copied out
STEP_ARRAYS = ("action", "reward", "terminated", "truncated", "expert_action")


def plain_number(value):
    """numpy scalars (an env's info values) as the Python numbers JSON knows."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


@dataclass(frozen=True)
class RingLayout:
    """Shapes of the block; JSON-able (``vars``), so that a spawned writer can rebuild it."""

    image_size: int
    vector_dim: int
    action_dim: int = 2
    rows: int = RING_ROWS
    slots: int = EPISODE_SLOTS

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        n, a = self.rows, self.action_dim
        return {
            "cursors": ((8,), np.dtype(np.int64)),
            "slot_size": ((self.slots,), np.dtype(np.int64)),
            "frames": ((n, self.image_size, self.image_size), np.dtype(np.uint8)),
            "vector": ((n, self.vector_dim), np.dtype(np.float32)),
            "action": ((n, a), np.dtype(np.float32)),
            "expert_action": ((n, a), np.dtype(np.float32)),
            "reward": ((n,), np.dtype(np.float32)),
            "terminated": ((n,), np.dtype(np.bool_)),
            "truncated": ((n,), np.dtype(np.bool_)),
            "slots": ((self.slots, SLOT_BYTES), np.dtype(np.uint8)),
        }

    def offsets(self) -> tuple[dict[str, int], int]:
        """Byte offset of each array (64-byte aligned) and the block's size."""
        offsets, end = {}, 0
        for name, (shape, dtype) in self.arrays().items():
            offsets[name] = end
            end += -(-math.prod(shape) * dtype.itemsize // 64) * 64
        return offsets, end


class EpisodeRing:
    """The shared block as numpy views, with the lock that guards its cursors."""

    def __init__(self, layout: RingLayout, memory: shared_memory.SharedMemory, lock):
        self.layout, self.memory, self.lock = layout, memory, lock
        offsets, _ = layout.offsets()
        for name, (shape, dtype) in layout.arrays().items():
            setattr(self, name, np.ndarray(shape, dtype, buffer=memory.buf, offset=offsets[name]))

    @classmethod
    def create(cls, layout: RingLayout, lock) -> "EpisodeRing":
        memory = shared_memory.SharedMemory(create=True, size=layout.offsets()[1])
        ring = cls(layout, memory, lock)
        ring.cursors[:] = 0
        return ring

    @classmethod
    def attach(cls, name: str, layout: RingLayout, lock) -> "EpisodeRing":
        return cls(layout, shared_memory.SharedMemory(name=name), lock)

    def close(self, unlink: bool = False) -> None:
        for name in self.layout.arrays():  # the views hold the buffer: drop them before closing it
            setattr(self, name, None)
        self.memory.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):  # removed from under us (/dev/shm cleaned)
                self.memory.unlink()


@dataclass
class EpisodeSummary:
    """What the collector keeps of an episode it handed over (for progress and the summary)."""

    route: str
    seed: int
    length: int
    episode_return: float
    termination: str
    info: dict = field(default_factory=dict)


class RingProducer:
    """The collector's side: writes rows into the rings and publishes them.

    ``is_alive()`` is asked while the rings are full; it raises the writer's error if it has one.
    """

    def __init__(self, ring: EpisodeRing, is_alive):
        self.ring, self.is_alive = ring, is_alive
        self.written = [0, 0, 0, 0]  # frames, vectors, steps, episodes
        self.room = 0  # rows free in the fullest of the three row rings, as last seen

    # -- one step at a time, as the env loop runs (through RingRecorder, EpisodeRecorder's API)

    def claim(self, rows: int) -> None:
        """Wait until ``rows`` more rows fit in every row ring."""
        while self.room < rows:
            self.publish()
            with self.ring.lock:
                read = self.ring.cursors[READ : READ + 3].tolist()
            capacity = self.ring.layout.rows
            self.room = min(capacity - (self.written[i] - read[i]) for i in (FRAMES, VECTORS, STEPS))
            if self.room < rows:
                self.is_alive()
                time.sleep(0.001)
        self.room -= rows

    def put_first(self, frames: np.ndarray, vector: np.ndarray) -> tuple[int, int, int]:
        """An episode's first observation (its whole frame stack ``(K, S, S)``); returns where the
        episode's rows start."""
        self.claim(len(frames))
        ring, n = self.ring, self.ring.layout.rows
        starts = tuple(self.written[:3])
        for i, frame in enumerate(frames):
            ring.frames[(starts[FRAMES] + i) % n] = frame
        ring.vector[starts[VECTORS] % n] = vector
        self.written[FRAMES] += len(frames)
        self.written[VECTORS] += 1
        return starts

    def put_step(self, frame: np.ndarray, vector: np.ndarray, action, reward: float, terminated: bool,
                 truncated: bool, expert_action) -> None:
        """One env step: the next observation's newest frame ``(S, S)`` and vector, and the step's
        action, reward, flags and expert label (None: no label). The env loop's hot path."""
        if self.room < 1:
            self.claim(1)
        else:
            self.room -= 1
        ring, n, written = self.ring, self.ring.layout.rows, self.written
        ring.frames[written[FRAMES] % n] = frame
        ring.vector[written[VECTORS] % n] = vector
        i = written[STEPS] % n
        ring.action[i] = action
        ring.reward[i] = reward
        ring.terminated[i] = terminated
        ring.truncated[i] = truncated
        ring.expert_action[i] = np.nan if expert_action is None else expert_action
        written[FRAMES] += 1
        written[VECTORS] += 1
        written[STEPS] += 1
        if written[STEPS] % PUBLISH_EVERY == 0:
            self.publish()

    def put_slot(self, summary: EpisodeSummary, starts: tuple[int, int, int]) -> None:
        """Publish a finished episode whose rows start at ``starts`` (frames, vectors, steps)."""
        k_plus_t, t = self.written[FRAMES] - starts[FRAMES], summary.length
        document = json.dumps({"starts": list(starts), "frames": k_plus_t, "length": t, "route": summary.route,
                               "seed": summary.seed, "termination": summary.termination, "info": summary.info},
                              default=plain_number).encode()
        if len(document) > SLOT_BYTES:
            raise StoreError(f"episode {summary.seed}'s route name and info take {len(document)} bytes; "
                             f"the writer takes at most {SLOT_BYTES}")
        while True:
            with self.ring.lock:
                free = self.ring.layout.slots - (self.written[EPISODES] - int(self.ring.cursors[READ + EPISODES]))
            if free > 0:
                break
            self.publish()
            self.is_alive()
            time.sleep(0.001)
        slot = self.written[EPISODES] % self.ring.layout.slots
        self.ring.slots[slot, : len(document)] = np.frombuffer(document, np.uint8)
        self.ring.slot_size[slot] = len(document)
        self.written[EPISODES] += 1
        self.publish()

    def publish(self) -> None:
        with self.ring.lock:
            self.ring.cursors[:READ] = self.written

    # -- a whole episode at once (from a dask worker)

    def put_episode(self, episode: Episode, on_finish=None) -> EpisodeSummary:
        """Write a whole episode; ``on_finish(summary)`` runs before the writer can see it."""
        layout = self.ring.layout
        t, size = episode.length, layout.image_size
        if episode.frames.shape[1:] != (size, size) or episode.vector.shape != (t + 1, layout.vector_dim):
            raise SpecMismatchError(f"episode frames {episode.frames.shape} and vector {episode.vector.shape} do "
                                    f"not fit the store's {size}x{size} images and {layout.vector_dim} vector "
                                    f"fields ({t} steps)")
        starts = tuple(self.written[:3])
        expert = episode.expert_action if episode.expert_action is not None else np.full((t, 2), np.nan, np.float32)
        steps = {"action": episode.action, "reward": episode.reward, "terminated": episode.terminated,
                 "truncated": episode.truncated, "expert_action": expert}
        self._put_rows(FRAMES, {"frames": episode.frames})
        self._put_rows(VECTORS, {"vector": episode.vector})
        self._put_rows(STEPS, steps)
        summary = EpisodeSummary(episode.route, int(episode.seed), t, episode.episode_return,
                                 episode.termination, dict(episode.info))
        if on_finish is not None:
            on_finish(summary)
        self.put_slot(summary, starts)
        return summary

    def _put_rows(self, ring_index: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows of one ring, in pieces of at most half the ring, waiting for room as they go."""
        n = self.ring.layout.rows
        total = len(next(iter(arrays.values())))
        done = 0
        while done < total:
            piece = min(total - done, n // 2)
            self.claim(piece)  # counted against every ring: conservative, never too little
            start = self.written[ring_index] % n
            first = min(piece, n - start)  # up to the ring's end, then from its start
            for name, rows in arrays.items():
                target = getattr(self.ring, name)
                target[start : start + first] = rows[done : done + first]
                target[: piece - first] = rows[done + first : done + piece]
            self.written[ring_index] += piece
            done += piece
            self.publish()


class RingRecorder:
    """:class:`~pipeline.datasets.episode.EpisodeRecorder`'s API, recording into the ring.

    ``finish`` hands the episode to the writer and returns its :class:`EpisodeSummary`."""

    def __init__(self, producer: RingProducer, route: str = "", seed: int = -1, on_finish=None):
        self.producer, self.route, self.seed, self.on_finish = producer, route, seed, on_finish
        self.length, self.episode_return, self.starts = 0, 0.0, (0, 0, 0)

    def start(self, obs: dict) -> None:
        self.starts = self.producer.put_first(np.asarray(obs["image"], dtype=np.uint8), obs["vector"])
        self.length, self.episode_return = 0, 0.0

    def add(self, action, reward: float, next_obs: dict, terminated: bool, truncated: bool,
            expert_action=None) -> None:
        self.producer.put_step(next_obs["image"][-1], next_obs["vector"], action, reward, terminated, truncated,
                               expert_action)
        self.length += 1
        self.episode_return += float(reward)

    def finish(self, termination: str | None = None, **info) -> EpisodeSummary:
        summary = EpisodeSummary(self.route, int(self.seed), self.length, self.episode_return,
                                 termination or "", info)
        if self.on_finish is not None:
            self.on_finish(summary)
        self.producer.put_slot(summary, self.starts)
        return summary


class _RowStream:
    """Rows copied out of one ring, kept until an episode takes them (reader side)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.first = 0  # absolute index of the first row held
        self.parts: list[dict[str, np.ndarray]] = []

    def copy_from(self, ring: EpisodeRing, begin: int, end: int) -> None:
        n = ring.layout.rows
        while begin < end:
            start = begin % n
            stop = min(start + end - begin, n)
            self.parts.append({name: getattr(ring, name)[start:stop].copy() for name in self.names})
            begin += stop - start

    def take(self, begin: int, count: int) -> dict[str, np.ndarray]:
        """Rows ``begin .. begin + count`` (absolute); rows before ``begin`` are dropped."""
        rows = {name: np.concatenate([p[name] for p in self.parts]) if len(self.parts) != 1 else self.parts[0][name]
                for name in self.names} if self.parts else None
        if rows is None or begin < self.first or begin + count > self.first + len(rows[self.names[0]]):
            raise StoreError(f"the episode ring lost rows {begin}..{begin + count} (holding {self.first}..)")
        lo = begin - self.first
        taken = {name: value[lo : lo + count] for name, value in rows.items()}
        self.parts = [{name: value[lo + count :] for name, value in rows.items()}]
        self.first = begin + count
        return taken

    def drop_before(self, begin: int) -> None:
        if self.parts and begin > self.first:
            self.take(begin, 0)


class RingConsumer:
    """The writer's side: copies published rows out and rebuilds whole episodes."""

    def __init__(self, ring: EpisodeRing):
        self.ring = ring
        self.streams = (_RowStream(("frames",)), _RowStream(("vector",)), _RowStream(STEP_ARRAYS))

    def drain(self) -> list[Episode]:
        """The episodes finished since the last call (maybe none); frees the ring space read."""
        ring = self.ring
        with ring.lock:
            written = ring.cursors[:READ].tolist()
            read = ring.cursors[READ:].tolist()
        if written == read:
            return []
        for i, stream in enumerate(self.streams):
            stream.copy_from(ring, read[i], written[i])
        documents = []
        for e in range(read[EPISODES], written[EPISODES]):
            slot = e % ring.layout.slots
            documents.append(json.loads(ring.slots[slot, : ring.slot_size[slot]].tobytes()))
        with ring.lock:  # everything up to `written` is copied out: the collector may reuse it
            ring.cursors[READ:] = written
        return [self._episode(document) for document in documents]

    def _episode(self, doc: dict) -> Episode:
        t = doc["length"]
        frames, vectors, steps = self.streams
        f0, v0, s0 = doc["starts"]
        for stream, start in zip(self.streams, doc["starts"]):
            stream.drop_before(start)  # the rows of an episode that was abandoned mid-way
        rows = steps.take(s0, t)
        return Episode(frames=frames.take(f0, doc["frames"])["frames"], vector=vectors.take(v0, t + 1)["vector"],
                       **rows, route=doc["route"], seed=doc["seed"], termination=doc["termination"],
                       info=doc["info"])
