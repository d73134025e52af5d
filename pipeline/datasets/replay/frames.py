"""Frame storage shared by the replay sources: host (numpy) or CUDA (torch) uint8 frames, the
ordering of writes and gathers on a device, and :class:`Rows`, where sampled transitions live."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch


def nbytes_of(array) -> int:
    """Bytes of a numpy array or a torch tensor."""
    return int(array.nbytes) if isinstance(array, np.ndarray) else array.numel() * array.element_size()


class DeviceOrder:
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


def device_order(frames) -> DeviceOrder | None:
    """The write/gather ordering for ``frames`` on a CUDA device, None for host frames."""
    return DeviceOrder(frames.device) if isinstance(frames, torch.Tensor) and frames.is_cuda else None


def writing(order: DeviceOrder | None):
    """``with writing(order):`` around every write into frames (a no-op for host frames)."""
    return order.writing() if order is not None else contextlib.nullcontext()


def new_frames(n: int, size: int, device: torch.device | None):
    """uint8 ``(n, size, size)`` frame storage: numpy in RAM, or a torch tensor on ``device``."""
    if device is None:
        return np.zeros((n, size, size), np.uint8)
    return torch.zeros((n, size, size), dtype=torch.uint8, device=device)


def write_frames(frames, positions: np.ndarray, values: np.ndarray) -> None:
    """``frames[positions] = values`` for numpy or device frames (uint8 ``(len(positions), H, W)``)."""
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
