"""DictReplayBuffer: the learner's batches, sampled from memory and streamed from disk.

Why not "read Zarr per sample": random reads of 256 stacked observations from a store cost
0.1-1.2 s per batch (every chunk touched costs ~0.5 ms of codec and Python overhead), while a
numpy gather from a frame-deduplicated array in RAM costs ~1 ms. So the buffer keeps frames in
memory and only ever reads the store sequentially, chunk by chunk.

Storage and sampling are separate (DrQ-v2 style):

- storage: two sources in the frame-deduplicated layout of :mod:`pipeline.datasets.episode`
  (observation ``t`` of an episode is ``frames[f0 + t : f0 + t + K]``):

  * :class:`OfflineSource`, a dataset store. When its decompressed arrays fit ``memory_budget``
    they are loaded once ("memory" mode). Otherwise ("reservoir" mode) the per-step arrays
    (vectors, actions, rewards: ~1.5 % of the bytes) are loaded whole and the frames live in
    ``n_slots`` slots of chunk-aligned segments; a background thread replaces the oldest slot with
    the next segment of the store, cycling through all of it, and the slots never exceed the
    budget. Consecutive segments overlap by one chunk, so every transition lies wholly inside some
    segment.
  * :class:`OnlineRing`, the last ``online_capacity`` transitions passed to :meth:`add`, in rings
    indexed by global counters; completed episodes also go to the run's ``online.zarr``.

- sampling: each source turns ``b`` random draws into positions (:class:`Rows`: first frame of
  ``obs``, its vector row, its step row, and ``n`` = steps summed, cut at the episode end), and one
  gather (:meth:`DictReplayBuffer._gather`) builds images, vectors and n-step targets with numpy
  fancy indexing (``np.take`` with ``mode="wrap"``: the ring wraps for free, and unlike the default
  mode it writes straight into the output without a temporary).

A prefetch thread assembles batches ahead (into pinned memory when the device is CUDA, moved to
the device on a side stream). ``frames_on_device=True`` keeps frames in device memory and gathers
image stacks there.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from zarr.core.buffer import default_buffer_prototype

from pipeline.datasets.episode import EpisodeRecorder
from pipeline.datasets.store import EpisodeWriter, TransitionStore
from pipeline.envs.spec import ActionSpec, ObsSpec
from pipeline.errors import PipelineError, StoreError
from pipeline.progress import ProgressBar

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_NEVER = np.iinfo(np.int64).max  # "episode end" of steps whose episode is still running
_READ_CHUNKS = 8  # chunks per read while loading: big enough to decode in parallel, small to copy
_SLOTS_WANTED = 8  # reservoir granularity: refreshing one slot replaces 1/8 of the frames
_MAX_SEGMENT_CHUNKS = 32
_NUMPY_DTYPES = {torch.uint8: np.uint8, torch.float32: np.float32, torch.bool: np.bool_}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from ``123``, ``"500MB"``, ``"1.5GiB"`` or ``"8G"`` (K/M/G/T alone are binary)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise PipelineError(f"memory budget must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS or float(match.group(1)) <= 0:
        raise PipelineError(f"cannot read memory size {value!r}; use e.g. 8GiB, 500MB or 2G")
    return int(float(match.group(1)) * _UNITS[unit])


def _nbytes(array) -> int:
    return int(array.nbytes) if isinstance(array, np.ndarray) else array.numel() * array.element_size()


class _DeviceOrder:
    """Orders writes and gathers of frames held on a CUDA device, on the GPU, without host waits.

    Gathers run asynchronously on the prefetch thread's stream, so a write may only replace frames
    once the gathers queued before it are done, and a gather must see the writes before it.
    Writes go to their own stream (``with order.writing(): ...``); waiting on a never-recorded
    event is a no-op.
    """

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.written, self.gathered = torch.cuda.Event(), torch.cuda.Event()

    @contextlib.contextmanager
    def writing(self):
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.gathered)
            yield
            self.written.record(self.stream)

    def gather(self, frames: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
        """``out = frames[idx]`` on the current stream, after the writes before it."""
        stream = torch.cuda.current_stream(frames.device)
        stream.wait_event(self.written)
        torch.index_select(frames, 0, idx, out=out)
        self.gathered.record(stream)


def _device_order(frames) -> _DeviceOrder | None:
    return _DeviceOrder(frames.device) if isinstance(frames, torch.Tensor) and frames.is_cuda else None


def _writing(order: _DeviceOrder | None):
    return order.writing() if order is not None else contextlib.nullcontext()


def _new_frames(n: int, size: int, device: torch.device | None):
    """uint8 ``(n, size, size)`` frame storage: numpy in RAM, or a torch tensor on ``device``."""
    if device is None:
        return np.zeros((n, size, size), np.uint8)
    return torch.zeros((n, size, size), dtype=torch.uint8, device=device)


def _write_frames(frames, positions: np.ndarray, values: np.ndarray) -> None:
    if isinstance(frames, np.ndarray):
        frames[positions] = values
    else:
        frames[torch.from_numpy(positions).to(frames.device)] = torch.from_numpy(values).to(frames.device)


@dataclass
class Rows:
    """Where ``b`` sampled transitions live in one source's arrays (int64 ``(b,)`` each).

    Positions may exceed the arrays' lengths (the online ring counts globally): readers wrap them.
    """

    frame: np.ndarray  # first frame of obs; next_obs starts at frame + n
    obs: np.ndarray  # vector row of obs; next_obs at obs + n
    step: np.ndarray  # per-step row of the transition; the n-step sum reads step .. step + n - 1
    n: np.ndarray  # steps summed: min(n_step, steps left in the episode), >= 1


# --------------------------------------------------------------------------------------------
# Offline source


def _read_frames_into(store: TransitionStore, start: int, stop: int, dest, advance=None) -> None:
    """Decode committed frames ``[start, stop)`` of ``store`` into ``dest`` (numpy or torch,
    ``stop - start`` rows) without a whole-range temporary, ``_READ_CHUNKS`` chunks at a time;
    ``advance(frames)`` after each read (progress)."""
    step = store.frames.chunks[0] * _READ_CHUNKS
    for a in range(start, stop, step):
        b = min(a + step, stop)
        if isinstance(dest, np.ndarray):
            out = default_buffer_prototype().nd_buffer.from_numpy_array(dest[a - start : b - start])
            store.frames.get_basic_selection(slice(a, b), out=out)
        else:
            dest[a - start : b - start].copy_(torch.from_numpy(store.read_frames(a, b)))
        if advance is not None:
            advance(b - a)


class OfflineSource:
    """The frames and per-step arrays of a dataset store, in memory or as a reservoir.

    Arrays held (``N`` transitions, ``O`` observations, ``D`` vector size):
    ``vector`` float32 ``(O, D)``, ``action`` float32 ``(N, A)``, ``bc_action`` float32 ``(N, A)``
    (the expert's label where the store has one, else ``action``), ``reward`` float32 ``(N,)``,
    ``terminated`` bool ``(N,)``, and ``frames`` uint8 ``(n_slots * segment_frames, H, W)``
    (numpy, or a torch tensor when ``frame_device`` is given). Slot ``i`` holds store frames
    ``[slot_start[i], slot_start[i] + segment_frames)`` and makes the global transitions
    ``[slot_lo[i], slot_hi[i])`` sampleable: those whose ``obs`` and n-th next ``obs`` lie inside it.

    ``lock`` guards the slot table against the refresh thread; hold it from :meth:`pick` to the
    end of the gather.
    """

    def __init__(
        self,
        store: TransitionStore,
        memory_budget: int,
        n_step: int,
        frame_device: torch.device | None = None,
        progress: bool | None = None,
    ):
        self.store, self.n_step = store, n_step
        self.k = store.obs_spec.frame_stack
        self.lock = threading.Lock()
        self.refreshes = 0
        if store.num_transitions == 0:
            raise StoreError(f"{store.url} holds no committed transitions to sample")
        table = store.episodes
        self.ep_step, self.ep_frame, self.ep_obs, self.ep_len = (
            np.asarray(table[name], dtype=np.int64)
            for name in ("step_offset", "frame_offset", "obs_offset", "length")
        )
        n, o = store.num_transitions, store.num_observations
        self.vector = np.asarray(store.vector[:o])
        self.action = np.asarray(store.action[:n])
        self.bc_action = self.action  # the same array, unless the store holds expert labels
        if store.expert_action is not None:
            labels = np.asarray(store.expert_action[:n])
            if not np.isnan(labels).all():
                self.bc_action = np.where(np.isnan(labels), self.action, labels)
        self.reward = np.asarray(store.reward[:n])
        self.terminated = np.asarray(store.terminated[:n])
        small = sum(a.nbytes for a in (self.vector, self.action, self.reward, self.terminated))
        small += self.bc_action.nbytes if self.bc_action is not self.action else 0
        small += sum(a.nbytes for a in (self.ep_step, self.ep_frame, self.ep_obs, self.ep_len))
        size = store.obs_spec.image_size
        frame_bytes = size * size
        chunk = store.frames.chunks[0]
        self.chunk = chunk

        if small + store.num_frames * frame_bytes <= memory_budget:
            self.mode = "memory"
            self.segment_frames, self.n_slots = store.num_frames, 1
            self.segment_stride = chunk  # unused: one segment covers the store
        else:
            self.mode = "reservoir"
            if self.k + n_step - 1 > chunk:
                raise PipelineError(
                    f"n_step {n_step} is too long for reservoir mode: a transition's frames must fit "
                    f"in one chunk of {store.url} ({chunk} frames)"
                )
            chunk_bytes = chunk * frame_bytes
            available = memory_budget - small
            n_chunks = -(-store.num_frames // chunk)
            seg = min(_MAX_SEGMENT_CHUNKS, max(4, available // (_SLOTS_WANTED * chunk_bytes)), n_chunks)
            if available // (seg * chunk_bytes) < 2:
                seg = available // (2 * chunk_bytes)
            if seg < 2:
                need = small + 4 * chunk_bytes
                raise PipelineError(
                    f"memory budget of {memory_budget} bytes is too small for {store.url}: the reservoir "
                    f"needs at least {need} bytes ({small} for vectors/actions, two segments of 2 frame "
                    "chunks); raise --replay-memory"
                )
            self.segment_frames = seg * chunk
            self.n_slots = int(available // (seg * chunk_bytes))
            # Segments overlap by one chunk so a transition cut by one segment's end lies wholly in
            # the next (its K + n - 1 frames fit in a chunk).
            self.segment_stride = (seg - 1) * chunk

        self.frames = _new_frames(self.n_slots * self.segment_frames, size, frame_device)
        self.order = _device_order(self.frames)
        self.slot_start = np.zeros(self.n_slots, np.int64)
        self.slot_lo = np.zeros(self.n_slots, np.int64)
        self.slot_hi = np.zeros(self.n_slots, np.int64)
        self._cum = np.zeros(self.n_slots, np.int64)
        self._cursor = 0  # store frame where the next segment starts
        self._oldest = 0  # slot the next refresh replaces
        self._fill(progress)

    # -- loading

    @property
    def segments_per_cycle(self) -> int:
        """Segments in one pass over the store (1 in memory mode)."""
        if self.mode == "memory":
            return 1
        return max(1, -(-(self.store.num_frames - self.chunk) // self.segment_stride))

    def _next_segment(self) -> tuple[int, int]:
        start = self._cursor
        stop = min(start + self.segment_frames, self.store.num_frames)
        self._cursor = 0 if stop >= self.store.num_frames else start + self.segment_stride
        return start, stop

    def _fill(self, progress: bool | None) -> None:
        """Load the first segments (the whole store in memory mode), sequentially."""
        n_load = min(self.n_slots, self.segments_per_cycle)
        total = min(self.n_slots * self.segment_frames, self.store.num_frames)
        if progress is None:
            progress = total * self.store.obs_spec.image_size**2 > 2**30 and sys.stderr.isatty()
        with ProgressBar(progress, f"loading {self.store.url}", total, unit="frames", stderr=True) as bar:
            for slot in range(n_load):
                self._load_slot(slot, *self._next_segment(), advance=bar.advance if progress else None)
        self._oldest = n_load % self.n_slots

    def _load_slot(self, slot: int, start: int, stop: int, advance=None) -> None:
        base = slot * self.segment_frames
        with _writing(self.order):
            _read_frames_into(self.store, start, stop, self.frames[base : base + stop - start], advance)
        lo, hi = self._valid_range(start, stop)
        with self.lock:
            self.slot_start[slot], self.slot_lo[slot], self.slot_hi[slot] = start, lo, hi
            self._cum = np.cumsum(self.slot_hi - self.slot_lo)

    def _valid_range(self, start: int, stop: int) -> tuple[int, int]:
        """Global transitions whose obs and n-th next obs lie in store frames ``[start, stop)``.

        Transition ``t`` of an episode of length ``T`` at frame ``f0`` reads frames
        ``f0 + t .. f0 + t + n + K - 1`` with ``n = min(n_step, T - t)``; both ends grow with the
        global transition index, so the valid set is one range.
        """
        k, n, length = self.k, self.n_step, self.ep_len
        # first transition whose obs starts at or after `start`
        e = int(np.searchsorted(self.ep_frame + length - 1, start, side="left"))
        lo = self.store.num_transitions if e == len(length) else int(
            self.ep_step[e] + max(0, start - self.ep_frame[e]))
        # first episode not wholly inside [.., stop); its transitions ending by `stop` are valid
        e = int(np.searchsorted(self.ep_frame + length + k, stop, side="right"))
        hi = self.store.num_transitions if e == len(length) else int(
            self.ep_step[e] + np.clip(stop - self.ep_frame[e] - k - n + 1, 0, length[e]))
        return lo, max(lo, hi)

    def refresh(self) -> None:
        """Replace the oldest slot with the next segment of the store (no-op in memory mode).

        The slot leaves the sampling table while it is read, so sampling never sees a half-read
        slot and no staging copy is needed beyond ``_READ_CHUNKS`` chunks.
        """
        if self.mode == "memory":
            return
        slot = self._oldest
        with self.lock:
            self.slot_hi[slot] = self.slot_lo[slot]
            self._cum = np.cumsum(self.slot_hi - self.slot_lo)
        self._load_slot(slot, *self._next_segment())
        self._oldest = (slot + 1) % self.n_slots
        self.refreshes += 1

    # -- sampling

    @property
    def size(self) -> int:
        """Transitions sampleable now."""
        return int(self._cum[-1])

    def ranges(self) -> list[tuple[int, int]]:
        """Global transition ranges ``[lo, hi)`` sampleable now, one per filled slot."""
        with self.lock:
            return [(int(a), int(b)) for a, b in zip(self.slot_lo, self.slot_hi) if b > a]

    def pick(self, rng: np.random.Generator, b: int) -> Rows:
        """``b`` transitions uniformly over the sampleable ones (call with :attr:`lock` held)."""
        counts = self.slot_hi - self.slot_lo
        u = rng.integers(self._cum[-1], size=b)
        slot = np.searchsorted(self._cum, u, side="right")
        g = self.slot_lo[slot] + u - (self._cum[slot] - counts[slot])
        e = np.searchsorted(self.ep_step, g, side="right") - 1  # empty episodes share a step_offset
        t = g - self.ep_step[e]
        local = slot * self.segment_frames + self.ep_frame[e] + t - self.slot_start[slot]
        n = np.minimum(self.n_step, self.ep_len[e] - t)
        return Rows(frame=local, obs=self.ep_obs[e] + t, step=g, n=n)

    @property
    def nbytes(self) -> int:
        arrays = (self.frames, self.vector, self.action, self.reward, self.terminated,
                  self.ep_step, self.ep_frame, self.ep_obs, self.ep_len)
        return sum(_nbytes(a) for a in arrays)


# --------------------------------------------------------------------------------------------
# Online ring


class OnlineRing:
    """The last ``capacity`` transitions of one env stream, frame-deduplicated.

    Every array is a ring indexed by a global counter modulo its length (``C = capacity``):
    ``frames`` uint8 ``(Cf, H, W)``, ``vector`` float32 ``(Co, D)``, ``action`` float32 ``(C, A)``,
    ``reward`` float32 ``(C,)``, ``terminated`` bool ``(C,)``; per step ``frame_of``/``obs_of``
    (global position of its obs) and ``end_of`` (global step where its episode ends, or never).
    ``Cf = C + C // 4 + K + n_step`` frames hold ``C`` transitions of episodes of 16+ steps (each
    episode adds ``K`` frames besides one per step); shorter episodes fit fewer transitions.

    Sampleable are the steps in ``[lo, hi)``: ``lo`` the oldest whose data is not overwritten,
    ``hi`` excludes steps of the running episode whose n-step target is not known yet.
    """

    def __init__(self, capacity: int, obs_spec: ObsSpec, action_dim: int, n_step: int,
                 frame_device: torch.device | None = None):
        k, c = obs_spec.frame_stack, capacity
        self.k, self.capacity, self.n_step = k, c, n_step
        self.lock = threading.Lock()
        self.frames = _new_frames(c + c // 4 + k + n_step, obs_spec.image_size, frame_device)
        self.order = _device_order(self.frames)
        self.vector = np.zeros((c + c // 4 + 1 + n_step, obs_spec.vector_dim), np.float32)
        self.action = np.zeros((c, action_dim), np.float32)
        self.bc_action = self.action  # online rollouts carry no expert labels
        self.reward = np.zeros(c, np.float32)
        self.terminated = np.zeros(c, bool)
        self.frame_of = np.zeros(c, np.int64)
        self.obs_of = np.zeros(c, np.int64)
        self.end_of = np.zeros(c, np.int64)
        self.frames_written = self.obs_written = self.steps_written = 0
        self.lo = 0
        self.episode_first: int | None = None  # first step of the running episode, None between
        self._last_frame = self._last_vector = None  # newest frame and vector of the last next_obs

    def _continues(self, obs: dict) -> bool:
        return (self.episode_first is not None
                and np.array_equal(obs["vector"], self._last_vector)
                and np.array_equal(np.asarray(obs["image"])[-1], self._last_frame))

    def add(self, obs: dict, action, reward: float, next_obs: dict, terminated: bool) -> bool:
        """Store one transition; returns True when ``obs`` started a new episode.

        An ``obs`` that does not continue the running episode (its newest frame and vector differ
        from the last ``next_obs``) starts a new one; the unfinished one then ends there, and its
        last transition bootstraps like a truncation.
        """
        new_episode = not self._continues(obs)
        with self.lock, _writing(self.order):
            if new_episode:
                self.end_episode()
                image = np.asarray(obs["image"], np.uint8)
                stack = (self.frames_written + np.arange(self.k)) % len(self.frames)
                _write_frames(self.frames, stack, image)
                self.vector[self.obs_written % len(self.vector)] = obs["vector"]
                self.frames_written += self.k
                self.obs_written += 1
                self.episode_first = self.steps_written
            g, slot = self.steps_written, self.steps_written % self.capacity
            self.frame_of[slot] = self.frames_written - self.k
            self.obs_of[slot] = self.obs_written - 1
            self.end_of[slot] = _NEVER
            self.action[slot] = action
            self.reward[slot] = reward
            self.terminated[slot] = terminated
            self._last_frame = np.array(next_obs["image"][-1], np.uint8)
            self._last_vector = np.array(next_obs["vector"], np.float32)
            newest = np.array([self.frames_written % len(self.frames)])
            _write_frames(self.frames, newest, self._last_frame[None])
            self.vector[self.obs_written % len(self.vector)] = self._last_vector
            self.frames_written += 1
            self.obs_written += 1
            self.steps_written = g + 1
            self._evict()
        return new_episode

    def end_episode(self) -> None:
        """Mark the running episode ended at the last added step (call with :attr:`lock` held)."""
        if self.episode_first is None:
            return
        first = max(self.episode_first, self.steps_written - self.capacity)
        self.end_of[np.arange(first, self.steps_written) % self.capacity] = self.steps_written
        self.episode_first = None

    def _evict(self) -> None:
        c = self.capacity
        oldest_frame = self.frames_written - len(self.frames)
        oldest_obs = self.obs_written - len(self.vector)
        self.lo = max(self.lo, self.steps_written - c)
        while self.lo < self.steps_written and (
            self.frame_of[self.lo % c] < oldest_frame or self.obs_of[self.lo % c] < oldest_obs
        ):
            self.lo += 1

    @property
    def hi(self) -> int:
        if self.episode_first is None:
            return self.steps_written
        return max(self.episode_first, self.steps_written - self.n_step + 1)

    @property
    def size(self) -> int:
        """Transitions sampleable now."""
        return max(0, self.hi - self.lo)

    def pick(self, rng: np.random.Generator, b: int) -> Rows:
        """``b`` transitions uniformly over the sampleable ones (call with :attr:`lock` held)."""
        g = self.lo + rng.integers(self.hi - self.lo, size=b)
        slot = g % self.capacity
        return Rows(frame=self.frame_of[slot], obs=self.obs_of[slot], step=g,
                    n=np.minimum(self.n_step, self.end_of[slot] - g))

    @property
    def nbytes(self) -> int:
        arrays = (self.frames, self.vector, self.action, self.reward, self.terminated,
                  self.frame_of, self.obs_of, self.end_of)
        return sum(_nbytes(a) for a in arrays)


# --------------------------------------------------------------------------------------------
# The buffer


def _nest(flat: dict, k: int) -> dict:
    """The batch layout the learner reads, from the flat names used while assembling.

    Both images are views of one frame window ``(B, W, H, W)``: its first ``k`` frames are obs,
    its last ``k`` next_obs (with ``n_step == 1`` they share ``k - 1`` frames, ``W = k + 1``).
    """
    return {
        "obs": {"image": flat["frames"][:, :k], "vector": flat["obs_vector"]},
        "action": flat["action"],
        "bc_action": flat["bc_action"],
        "reward": flat["reward"],
        "next_obs": {"image": flat["frames"][:, -k:], "vector": flat["next_obs_vector"]},
        "done": flat["done"],
        "discount": flat["discount"],
        "offline": flat["offline"],
    }


# The threads hold no strong reference to the buffer between batches, so a buffer dropped without
# close() is collected and its __del__ stops them.


def _refresh_loop(source: OfflineSource, stop: threading.Event, duty: float, errors: list) -> None:
    try:
        while not stop.is_set():
            started = time.perf_counter()
            source.refresh()
            # sleep so that reading takes at most `duty` of the time: sampling keeps its cores
            stop.wait((time.perf_counter() - started) * (1.0 - duty) / duty)
    except BaseException as e:  # re-raised by the next sample()
        errors.append(e)


def _prefetch_loop(ref: weakref.ref, stop: threading.Event, out: queue.Queue, errors: list) -> None:
    try:
        while not stop.is_set():
            buffer = ref()
            if buffer is None:
                return
            item = buffer._make_batch(buffer._batch_size)
            del buffer
            if item is None:  # nothing to sample yet: wait for add()
                stop.wait(0.01)
                continue
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
    except BaseException as e:  # re-raised by the next sample()
        errors.append(e)


class DictReplayBuffer:
    """Replay for dict observations: an offline dataset store mixed with an online ring.

    >>> with DictReplayBuffer("runs/a.zarr", online_capacity=100_000, online_mix=0.5, n_step=3,
    ...                       memory_budget="8GiB", online_store="runs/train/online.zarr") as buf:
    ...     buf.add(obs, action, reward, next_obs, terminated, truncated, info)   # per env step
    ...     batch = buf.sample(256)

    ``sample(B)`` returns a dict of torch tensors on ``device``:
    ``obs`` / ``next_obs`` ``{'image': uint8 (B, K, H, W), 'vector': float32 (B, D)}``
    (``next_obs`` is the n-th next observation, or the episode's last if it ends sooner),
    ``action`` float32 ``(B, A)`` (applied), ``bc_action`` float32 ``(B, A)`` (the expert's label
    of that state where the store has one, else ``action``: the behaviour-cloning target),
    ``reward`` float32 ``(B,)`` (discounted sum over those steps),
    ``done`` float32 ``(B,)`` (1 when the episode terminated within them; truncation bootstraps),
    ``discount`` float32 ``(B,)`` (``gamma ** steps summed``), ``offline`` bool ``(B,)``.
    Both images are views of one ``(B, W, H, W)`` frame window (obs its first ``K`` frames,
    next_obs its last ``K``): read them, don't write into them. On CPU a batch's tensors are reused
    once ``sample`` is called again (fresh pages per batch cost more than the gather): clone what
    you keep. The first ``B - round(online_mix * B)`` rows are offline, the rest online, once the
    online ring holds at least ``B`` transitions (before that all rows are offline); without an
    offline store every row is online.

    Arguments: ``offline`` a :class:`TransitionStore`, a store URL or None; ``online_capacity``
    transitions in the ring (0: no online source); ``memory_budget`` bytes (or "8GiB") for the
    offline source (its frames count against it on the device with ``frames_on_device``); ``prefetch`` batches assembled ahead by a thread (0: assemble in ``sample``);
    ``online_store`` a URL that completed online episodes are appended to (``online_reward``: the
    definition of their rewards, default the envs' ``RewardConfig().to_dict()``); ``refresh_duty`` the
    share of wall time the reservoir refresh thread may spend reading (0: refresh only when
    :meth:`refresh` is called); ``progress`` shows a progress bar while loading (None: for loads
    over 1 GiB on a terminal).

    Statistics: ``wait_seconds`` (total time :meth:`sample` waited for the prefetcher),
    ``nbytes`` (bytes of every stored array), ``offline_source.refreshes``.
    """

    def __init__(
        self,
        offline: TransitionStore | str | os.PathLike | None = None,
        online_capacity: int = 100_000,
        online_mix: float = 0.5,
        memory_budget: int | str = "4GiB",
        n_step: int = 1,
        gamma: float = 0.99,
        device: str | torch.device | None = None,
        prefetch: int = 2,
        *,
        obs_spec: ObsSpec | None = None,
        action_spec: ActionSpec | None = None,
        seed: int = 0,
        online_store: str | os.PathLike | None = None,
        online_route: str = "",
        online_reward: dict | None = None,
        frames_on_device: bool = False,
        refresh_duty: float = 0.25,
        progress: bool | None = None,
        storage_options: dict | None = None,
    ):
        if not 0.0 <= online_mix <= 1.0:
            raise PipelineError(f"online mix must be between 0 and 1, got {online_mix}")
        if n_step < 1:
            raise PipelineError(f"n_step must be at least 1, got {n_step}")
        if not 0.0 < gamma <= 1.0:
            raise PipelineError(f"gamma must be in (0, 1], got {gamma}")
        if online_capacity < 0 or prefetch < 0 or not 0.0 <= refresh_duty <= 1.0:
            raise PipelineError("online_capacity and prefetch must be >= 0 and refresh_duty in [0, 1]")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.online_mix, self.n_step, self.gamma, self.prefetch = online_mix, n_step, gamma, prefetch
        self.frames_on_device = frames_on_device
        frame_device = self.device if frames_on_device else None
        # gamma ** j in float64 for the n-step sum; index n gives the bootstrap discount
        self._gammas = gamma ** np.arange(n_step + 1, dtype=np.float64)
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._stream = torch.cuda.Stream(self.device) if self._pin else None
        self.rng = np.random.default_rng(seed)
        self.wait_seconds = 0.0

        self.offline_source: OfflineSource | None = None
        if offline is not None:
            store = offline if isinstance(offline, TransitionStore) else TransitionStore(
                str(offline), storage_options)
            obs_spec, action_spec = self._check_specs(store, obs_spec, action_spec)
            self.offline_source = OfflineSource(
                store, parse_bytes(memory_budget), n_step, frame_device, progress)
        if obs_spec is None:
            raise PipelineError("DictReplayBuffer needs an offline store or an obs_spec")
        self.obs_spec, self.action_spec = obs_spec, action_spec or ActionSpec()
        # Frames gathered per row, relative to obs's first frame. With n_step == 1 obs and next_obs
        # share k - 1 frames, so one window of k + 1 frames holds both: 5/8 of the bytes of two
        # stacks, and sampling is bound by memory bandwidth. With n_step > 1 next_obs is n (<= n_step)
        # frames on, so the window is two stacks (the second shifted per row in _gather).
        k = obs_spec.frame_stack
        self._window = np.arange(k + 1) if n_step == 1 else np.concatenate([np.arange(k), np.arange(k)])

        self.online: OnlineRing | None = None
        if online_capacity:
            self.online = OnlineRing(
                online_capacity, self.obs_spec, self.action_spec.dim, n_step, frame_device)
        if self.offline_source is None and self.online is None:
            raise PipelineError("DictReplayBuffer has no source: give an offline store or online_capacity")
        self._writer = None
        self._online_store = None if online_store is None else str(online_store)
        self._storage_options = storage_options
        self.online_route = online_route  # recorded with every online episode, so online.zarr can train too
        self._recorder: EpisodeRecorder | None = None
        self.online_episodes = 0
        if online_store is not None:
            from pipeline.envs.driving import RewardConfig

            self._writer = EpisodeWriter(str(online_store), self.obs_spec, self.action_spec,
                                         meta={"source": "online replay"}, mode="append",
                                         storage_options=storage_options,
                                         reward=online_reward or RewardConfig().to_dict())

        self._stop = threading.Event()
        self._errors: list[BaseException] = []  # raised in the threads, re-raised by sample()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._batch_size = 0
        self._pool: list[tuple[dict, object]] = []  # recycled host buffers (see _host_buffers)
        self._pool_lock = threading.Lock()
        self._handed_out: dict | None = None
        self._prefetcher: threading.Thread | None = None
        self._refresher: threading.Thread | None = None
        if self.offline_source is not None and self.offline_source.mode == "reservoir" and refresh_duty > 0:
            self._refresher = threading.Thread(
                target=_refresh_loop, args=(self.offline_source, self._stop, refresh_duty, self._errors),
                name="replay-refresh", daemon=True)
            self._refresher.start()

    @staticmethod
    def _check_specs(store: TransitionStore, obs_spec, action_spec) -> tuple[ObsSpec, ActionSpec]:
        what = f"dataset store {store.url}"
        if obs_spec is None:
            obs_spec = store.obs_spec
        obs_spec.check_compatible(store.obs_spec, what)
        if action_spec is None:
            action_spec = store.action_spec
        action_spec.check_compatible(store.action_spec, what)
        return obs_spec, action_spec

    # -- filling

    def add(self, obs: dict, action, reward: float, next_obs: dict, terminated: bool, truncated: bool,
            info: dict | None = None) -> None:
        """Store one env step of one env stream (``obs`` is the observation ``action`` was taken in).

        ``terminated`` or ``truncated`` ends the episode; with ``online_store`` the whole episode
        is then appended there (``info["termination"]`` names why it ended). An ``obs`` that does
        not continue the previous ``next_obs`` starts a new episode: the unfinished one stays in the
        ring but is not written to the store.
        """
        if self.online is None:
            raise ValueError("this buffer has no online source (online_capacity=0)")
        new_episode = self.online.add(obs, action, reward, next_obs, bool(terminated))
        if self._writer is not None:
            if new_episode or self._recorder is None:
                self._recorder = EpisodeRecorder(route=self.online_route)
                self._recorder.start(obs)
            self._recorder.add(action, reward, next_obs, terminated, truncated)
        if terminated or truncated:
            with self.online.lock:
                self.online.end_episode()
            self.online_episodes += 1
            if self._writer is not None:
                self._writer.append(self._recorder.finish((info or {}).get("termination") or ""))
                self._recorder = None

    def refill_online(self) -> int:
        """Put the newest committed episodes of ``online_store`` back into the online ring (as many
        whole episodes as its capacity holds, oldest first) without writing them again; returns
        the transitions added. A resumed training run calls this, so it samples the rollouts of
        the run so far instead of an empty ring. The episode that was running when the run
        stopped was never committed and is not restored."""
        if self.online is None or self._online_store is None:
            return 0
        store = TransitionStore(self._online_store, self._storage_options)
        lengths = np.asarray(store.episodes["length"], dtype=np.int64)
        newest_first = np.cumsum(lengths[::-1])
        first = len(lengths) - int(np.searchsorted(newest_first, self.online.capacity, side="right"))
        for i in range(first, len(lengths)):
            episode = store.episode(i)
            for t in range(episode.length):
                self.online.add(episode.observation(t), episode.action[t], float(episode.reward[t]),
                                episode.observation(t + 1), bool(episode.terminated[t]))
            with self.online.lock:
                self.online.end_episode()
        return int(lengths[first:].sum())

    def refresh(self) -> None:
        """Replace one reservoir slot from disk now (what the refresh thread does; use it only
        with ``refresh_duty=0``, where no thread refreshes)."""
        if self.offline_source is not None:
            self.offline_source.refresh()

    # -- sampling

    @property
    def online_size(self) -> int:
        return self.online.size if self.online is not None else 0

    @property
    def offline_size(self) -> int:
        return self.offline_source.size if self.offline_source is not None else 0

    def __len__(self) -> int:
        """Transitions sampleable now (offline + online)."""
        return self.offline_size + self.online_size

    def _split(self, batch_size: int) -> int | None:
        """Online rows in a batch of ``batch_size``, or None when nothing can be sampled yet."""
        online = self.online_size
        if self.offline_source is None:
            return batch_size if online > 0 else None
        if online >= batch_size:
            return round(self.online_mix * batch_size)
        return 0

    def _empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        if self._pin:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype]))

    def _host_buffers(self, b: int) -> dict[str, torch.Tensor]:
        """Host output tensors for a batch of ``b`` rows (flat names, see :func:`_nest`).

        Buffers are recycled: fresh pages for every batch (~15 MB at 84x84) cost more in page
        faults than the gather itself. A buffer returns to the pool once its copy to the device is
        done (CUDA: the event) or, on CPU, where the batch handed out *is* the buffer, when
        :meth:`sample` is called again.
        """
        while True:
            with self._pool_lock:
                if not self._pool:
                    break
                host, event = self._pool.pop()
            if len(host["action"]) == b:  # buffers of an old batch size are dropped
                if event is not None:
                    event.synchronize()
                return host
        size = self.obs_spec.image_size
        d, a = self.obs_spec.vector_dim, self.action_spec.dim
        shapes = {"obs_vector": ((b, d), torch.float32), "next_obs_vector": ((b, d), torch.float32),
                  "action": ((b, a), torch.float32), "bc_action": ((b, a), torch.float32),
                  "reward": ((b,), torch.float32),
                  "done": ((b,), torch.float32), "discount": ((b,), torch.float32),
                  "offline": ((b,), torch.bool)}
        if not self.frames_on_device:
            shapes["frames"] = ((b, len(self._window), size, size), torch.uint8)
        return {name: self._empty(shape, dtype) for name, (shape, dtype) in shapes.items()}

    def _recycle(self, host: dict | None, event=None) -> None:
        if host is not None:
            with self._pool_lock:
                self._pool.append((host, event))

    def _assemble(self, batch_size: int) -> tuple[dict, dict] | None:
        """One batch as flat tensors, and its host buffers; None when nothing can be sampled yet.

        Everything is on the host except the images with ``frames_on_device``.
        """
        n_online = self._split(batch_size)
        if n_online is None:
            return None
        b, n_offline = batch_size, batch_size - n_online
        host = self._host_buffers(b)
        batch = dict(host)
        if self.frames_on_device:
            size = self.obs_spec.image_size
            window = (b, len(self._window), size, size)
            batch["frames"] = torch.empty(window, dtype=torch.uint8, device=self.device)
        host["offline"].numpy()[:] = np.arange(b) < n_offline
        parts = ((self.offline_source, slice(0, n_offline)), (self.online, slice(n_offline, b)))
        for source, rows in parts:
            if rows.stop > rows.start:
                with source.lock:
                    self._gather(source, source.pick(self.rng, rows.stop - rows.start), batch, rows)
        return batch, host

    def _gather(self, src, rows: Rows, batch: dict, out: slice) -> None:
        """Fill rows ``out`` of the flat ``batch`` with the transitions at ``rows`` of ``src``."""
        frame_idx = rows.frame[:, None] + self._window
        if self.n_step > 1:  # the second half of the window is next_obs, n frames on
            frame_idx[:, self.obs_spec.frame_stack :] += rows.n[:, None]
        frames = batch["frames"][out]
        if isinstance(src.frames, np.ndarray):
            np.take(src.frames, frame_idx, axis=0, out=frames.numpy(), mode="wrap")
        else:
            idx = torch.from_numpy(frame_idx.reshape(-1) % len(src.frames)).to(src.frames.device)
            out_frames = frames.view(-1, *frames.shape[2:])
            if src.order is not None:
                src.order.gather(src.frames, idx, out_frames)
            else:
                torch.index_select(src.frames, 0, idx, out=out_frames)
        for key, shift in (("obs", 0), ("next_obs", rows.n)):
            vector = batch[f"{key}_vector"].numpy()[out]
            np.take(src.vector, rows.obs + shift, axis=0, out=vector, mode="wrap")
        for name in ("action", "bc_action"):
            np.take(getattr(src, name), rows.step, axis=0, out=batch[name].numpy()[out], mode="wrap")
        batch["done"].numpy()[out] = np.take(src.terminated, rows.step + rows.n - 1, mode="wrap")
        batch["discount"].numpy()[out] = self._gammas[rows.n]
        if self.n_step == 1:
            np.take(src.reward, rows.step, out=batch["reward"].numpy()[out], mode="wrap")
        else:
            j = np.arange(self.n_step)
            # rewards past the episode end belong to another episode (or an unwritten ring slot)
            r = np.take(src.reward, rows.step[:, None] + j, mode="wrap")
            batch["reward"].numpy()[out] = np.where(j < rows.n[:, None], r * self._gammas[:-1], 0.0).sum(1)

    def _make_batch(self, batch_size: int) -> tuple | None:
        """``(batch_size, flat batch on the device, CUDA event or None, host buffers to recycle
        once the consumer is done, or None)``, or None when nothing can be sampled yet."""
        if self._stream is None:
            made = self._assemble(batch_size)
            return None if made is None else (batch_size, made[0], None, made[1])
        with torch.cuda.stream(self._stream):  # gathers on the device and copies overlap the learner
            made = self._assemble(batch_size)
            if made is None:
                return None
            batch = {k: v.to(self.device, non_blocking=True) for k, v in made[0].items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        self._recycle(made[1], event)  # reusable once the copy is done
        return batch_size, batch, event, None

    def _raise_thread_error(self) -> None:
        if self._errors:
            raise self._errors.pop(0)

    def sample(self, batch_size: int) -> dict:
        """A batch of ``batch_size`` transitions (see the class docstring for the fields).

        On CPU the batch's tensors are reused by a later batch once ``sample`` is called again:
        clone what you keep. On CUDA every batch is new device memory.
        """
        if self._stop.is_set():
            raise RuntimeError("the replay buffer is closed")
        self._raise_thread_error()
        if self._split(batch_size) is None and self._queue.empty():
            raise RuntimeError("nothing to sample yet: the online ring holds no complete transition")
        if self.prefetch == 0:
            return self._hand_out(self._make_batch(batch_size))
        self._batch_size = batch_size  # queued batches of another size are dropped below
        if self._prefetcher is None:
            self._prefetcher = threading.Thread(
                target=_prefetch_loop, args=(weakref.ref(self), self._stop, self._queue, self._errors),
                name="replay-prefetch", daemon=True)
            self._prefetcher.start()
        started = time.perf_counter()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    self._raise_thread_error()
                    if not self._prefetcher.is_alive():
                        raise RuntimeError("the replay prefetch thread stopped") from None
                    continue
                if item[0] == batch_size:
                    return self._hand_out(item)
                self._recycle(item[3])
        finally:
            self.wait_seconds += time.perf_counter() - started

    def _hand_out(self, item: tuple) -> dict:
        _, batch, event, host = item
        self._recycle(self._handed_out)  # the previous batch's buffers: the caller is done with them
        self._handed_out = host
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for tensor in batch.values():  # made on the side stream, used on this one
                tensor.record_stream(stream)
        return _nest(batch, self.obs_spec.frame_stack)

    # -- sizes and shutdown

    @property
    def nbytes(self) -> int:
        """Bytes of every array the buffer stores (offline frames/reservoir, per-step arrays, ring)."""
        return sum(s.nbytes for s in (self.offline_source, self.online) if s is not None)

    def close(self) -> None:
        """Stop the threads and finish the online store. Idempotent."""
        self._stop.set()
        for thread in (self._prefetcher, self._refresher):
            if thread is not None:
                thread.join()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __del__(self) -> None:  # a buffer dropped without close(): its threads stop on their own
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def __enter__(self) -> "DictReplayBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
