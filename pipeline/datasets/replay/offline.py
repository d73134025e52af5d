"""The offline source: a dataset store's frames and per-step arrays in RAM (or on the device),
whole ("memory" mode) or as a reservoir of chunk-aligned segments refreshed from disk."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import torch
from zarr.core.buffer import default_buffer_prototype

from pipeline.datasets.replay.frames import Rows, device_order, nbytes_of, new_frames, writing
from pipeline.datasets.store import TransitionStore
from pipeline.errors import PipelineError, StoreError
from pipeline.progress import ProgressBar

_READ_CHUNKS = 8  # chunks per read while loading: big enough to decode in parallel, small to copy
_SLOTS_WANTED = 8  # reservoir granularity: refreshing one slot replaces 1/8 of the frames
_MAX_SEGMENT_CHUNKS = 32


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
        self.chunk = store.frames.chunks[0]
        self.mode, self.segment_frames, self.n_slots, self.segment_stride = self._plan_slots(
            memory_budget - small, small, memory_budget)
        self.frames = new_frames(self.n_slots * self.segment_frames, size, frame_device)
        self.order = device_order(self.frames)
        self.slot_start = np.zeros(self.n_slots, np.int64)
        self.slot_lo = np.zeros(self.n_slots, np.int64)
        self.slot_hi = np.zeros(self.n_slots, np.int64)
        self._cum = np.zeros(self.n_slots, np.int64)
        self._cursor = 0  # store frame where the next segment starts
        self._oldest = 0  # slot the next refresh replaces
        self._fill(progress)

    def _plan_slots(self, available: int, small: int, memory_budget: int) -> tuple[str, int, int, int]:
        """``(mode, segment_frames, n_slots, segment_stride)`` for ``available`` bytes of frames:
        the whole store in one slot when it fits ("memory"), else a reservoir of at least two
        slots of chunk-aligned segments, ``_SLOTS_WANTED`` where the budget allows."""
        store, chunk, n_step = self.store, self.chunk, self.n_step
        chunk_bytes = chunk * store.obs_spec.image_size ** 2
        if store.num_frames * store.obs_spec.image_size ** 2 <= available:
            return "memory", store.num_frames, 1, chunk  # the stride is unused: one segment covers all
        if self.k + n_step - 1 > chunk:
            raise PipelineError(
                f"n_step {n_step} is too long for reservoir mode: a transition's frames must fit "
                f"in one chunk of {store.url} ({chunk} frames)"
            )
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
        # Segments overlap by one chunk so a transition cut by one segment's end lies wholly in
        # the next (its K + n - 1 frames fit in a chunk).
        return "reservoir", seg * chunk, int(available // (seg * chunk_bytes)), (seg - 1) * chunk

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
        with writing(self.order):
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
        return sum(nbytes_of(a) for a in arrays)


def refresh_loop(source: OfflineSource, stop: threading.Event, duty: float, errors: list) -> None:
    """The reservoir's refresh thread: replace slots from disk until ``stop``, reading at most
    ``duty`` of the wall time; an error goes to ``errors`` (re-raised by the next sample)."""
    try:
        while not stop.is_set():
            started = time.perf_counter()
            source.refresh()
            # sleep so that reading takes at most `duty` of the time: sampling keeps its cores
            stop.wait((time.perf_counter() - started) * (1.0 - duty) / duty)
    except BaseException as e:  # re-raised by the next sample()
        errors.append(e)
