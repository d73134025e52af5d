"""The prefetcher: batches assembled ahead of the learner, in recycled host buffers (pinned on
CUDA), copied to the device on a side stream."""

from __future__ import annotations

import queue
import threading
import time
import weakref

import numpy as np
import torch

from pipeline.datasets.replay.sampler import Sampler

_NUMPY_DTYPES = {torch.uint8: np.uint8, torch.float32: np.float32, torch.bool: np.bool_}


def nest(flat: dict, k: int) -> dict:
    """The batch layout the learner reads, from the sampler's flat names.

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


class Prefetcher:
    """Hands out the sampler's batches as tensors on ``device``, nested as the learner reads them:
    ``obs`` / ``next_obs`` ``{'image': uint8 (B, K, H, W), 'vector': float32 (B, D)}`` (views of
    one ``(B, W, H, W)`` frame window), ``action`` / ``bc_action`` float32 ``(B, A)``,
    ``reward`` / ``done`` / ``discount`` float32 ``(B,)``, ``offline`` bool ``(B,)``.

    ``depth`` batches are assembled ahead by a thread (0: in :meth:`get`, on the caller's thread).
    On CPU a batch *is* its host buffers, reused once :meth:`get` is called again; on CUDA the
    host buffers are pinned, the gather and the copy run on a side stream (overlapping the
    learner), and every batch is new device memory. ``wait_seconds``: the time :meth:`get` waited.

    ``stop`` and ``errors`` are shared with the buffer (and its refresh thread): an error raised on
    a thread is re-raised by the next :meth:`get`.
    """

    def __init__(self, sampler: Sampler, device: torch.device, depth: int, stop: threading.Event,
                 errors: list[BaseException]):
        self.sampler, self.device, self.depth = sampler, device, depth
        self.stop, self.errors = stop, errors
        self.wait_seconds = 0.0
        self._pin = device.type == "cuda" and torch.cuda.is_available()
        self._stream = torch.cuda.Stream(device) if self._pin else None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._batch_size = 0
        self._pool: list[tuple[dict, object]] = []  # recycled host buffers (see _host_buffers)
        self._pool_lock = threading.Lock()
        self._handed_out: dict | None = None
        self.thread: threading.Thread | None = None

    def raise_thread_error(self) -> None:
        if self.errors:
            raise self.errors.pop(0)

    def get(self, batch_size: int) -> dict:
        """The next batch of ``batch_size`` rows."""
        self.raise_thread_error()
        if self.sampler.online_rows(batch_size) is None and self._queue.empty():
            raise RuntimeError("nothing to sample yet: the online ring holds no complete transition")
        if self.depth == 0:
            return self._hand_out(self._make_batch(batch_size))
        self._batch_size = batch_size  # queued batches of another size are dropped below
        if self.thread is None:
            # The thread holds no strong reference to the prefetcher between batches, so a buffer
            # dropped without close() is collected and its __del__ stops it.
            self.thread = threading.Thread(
                target=_prefetch_loop, args=(weakref.ref(self), self.stop, self._queue, self.errors),
                name="replay-prefetch", daemon=True)
            self.thread.start()
        started = time.perf_counter()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    self.raise_thread_error()
                    if not self.thread.is_alive():
                        raise RuntimeError("the replay prefetch thread stopped") from None
                    continue
                if item[0] == batch_size:
                    return self._hand_out(item)
                self._recycle(item[3])
        finally:
            self.wait_seconds += time.perf_counter() - started

    def _empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        if self._pin:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype]))

    def _host_buffers(self, b: int) -> dict[str, torch.Tensor]:
        """Host tensors for a batch of ``b`` rows (the sampler's :meth:`~Sampler.host_shapes`).

        Buffers are recycled: fresh pages for every batch (~15 MB at 84x84) cost more in page
        faults than the gather itself. A buffer returns to the pool once its copy to the device is
        done (CUDA: the event) or, on CPU, where the batch handed out *is* the buffer, when
        :meth:`get` is called again.
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
        return {name: self._empty(shape, dtype) for name, (shape, dtype) in self.sampler.host_shapes(b).items()}

    def _recycle(self, host: dict | None, event=None) -> None:
        if host is not None:
            with self._pool_lock:
                self._pool.append((host, event))

    def _assemble(self, batch_size: int) -> tuple[dict, dict] | None:
        """One flat batch and its host buffers, or None when nothing can be sampled yet."""
        if self.sampler.online_rows(batch_size) is None:
            return None
        host = self._host_buffers(batch_size)
        batch = self.sampler.fill(host)
        if batch is None:
            self._recycle(host)
            return None
        return batch, host

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

    def _hand_out(self, item: tuple) -> dict:
        _, batch, event, host = item
        self._recycle(self._handed_out)  # the previous batch's buffers: the caller is done with them
        self._handed_out = host
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for tensor in batch.values():  # made on the side stream, used on this one
                tensor.record_stream(stream)
        return nest(batch, self.sampler.obs_spec.frame_stack)


def _prefetch_loop(ref: weakref.ref, stop: threading.Event, out: queue.Queue, errors: list) -> None:
    try:
        while not stop.is_set():
            prefetcher = ref()
            if prefetcher is None:
                return
            item = prefetcher._make_batch(prefetcher._batch_size)
            del prefetcher
            if item is None:  # nothing to sample yet: wait for add()
                stop.wait(0.01)
                continue
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
    except BaseException as e:  # re-raised by the next get()
        errors.append(e)
