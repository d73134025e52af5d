"""The sampler: mixes the offline source and the online ring into one flat batch per call."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.datasets.replay.frames import Rows
from pipeline.datasets.replay.offline import OfflineSource
from pipeline.datasets.replay.online import OnlineRing
from pipeline.envs.spec import ObsSpec


class Sampler:
    """Draws ``B`` transitions from the two sources and gathers them into flat tensors.

    The first ``B - round(online_mix * B)`` rows come from ``offline``, the rest from ``online``,
    once the ring holds at least ``B`` transitions (before that every row is offline); without
    ``offline`` every row is online. Each source turns its draws into :class:`Rows`, and one
    gather per source builds the batch with numpy fancy indexing (``np.take`` with
    ``mode="wrap"``: the ring wraps for free, and the output is written in place).

    The flat batch (``K`` frame stack, ``W`` frames per row, see :attr:`window`)::

        frames           uint8   (B, W, H, W)  on the host, or on ``frame_device``
        obs_vector       float32 (B, D)        next_obs_vector float32 (B, D)
        action           float32 (B, A)        bc_action       float32 (B, A)
        reward           float32 (B,)          discounted sum over the n steps
        done             float32 (B,)          1 when the episode terminated within them
        discount         float32 (B,)          gamma ** steps summed
        offline          bool    (B,)          rows from the dataset
    """

    def __init__(self, offline: OfflineSource | None, online: OnlineRing | None, online_mix: float,
                 n_step: int, gamma: float, obs_spec: ObsSpec, action_dim: int, seed: int = 0,
                 frame_device: torch.device | None = None):
        self.offline, self.online, self.online_mix = offline, online, online_mix
        self.n_step, self.obs_spec, self.action_dim = n_step, obs_spec, action_dim
        self.frame_device = frame_device
        self.rng = np.random.default_rng(seed)
        # gamma ** j in float64 for the n-step sum; index n gives the bootstrap discount
        self.gammas = gamma ** np.arange(n_step + 1, dtype=np.float64)
        # Frames gathered per row, relative to obs's first frame. With n_step == 1 obs and next_obs
        # share k - 1 frames, so one window of k + 1 frames holds both: 5/8 of the bytes of two
        # stacks, and sampling is bound by memory bandwidth. With n_step > 1 next_obs is n (<= n_step)
        # frames on, so the window is two stacks (the second shifted per row in _gather).
        k = obs_spec.frame_stack
        self.window = np.arange(k + 1) if n_step == 1 else np.concatenate([np.arange(k), np.arange(k)])

    def online_rows(self, batch_size: int) -> int | None:
        """Online rows in a batch of ``batch_size``, or None when nothing can be sampled yet."""
        online = self.online.size if self.online is not None else 0
        if self.offline is None:
            return batch_size if online > 0 else None
        if online >= batch_size:
            return round(self.online_mix * batch_size)
        return 0

    def host_shapes(self, b: int) -> dict[str, tuple[tuple, torch.dtype]]:
        """Name -> (shape, dtype) of the host tensors a batch of ``b`` rows is gathered into
        (``frames`` only when frames are on the host)."""
        size, d, a = self.obs_spec.image_size, self.obs_spec.vector_dim, self.action_dim
        shapes = {"obs_vector": ((b, d), torch.float32), "next_obs_vector": ((b, d), torch.float32),
                  "action": ((b, a), torch.float32), "bc_action": ((b, a), torch.float32),
                  "reward": ((b,), torch.float32),
                  "done": ((b,), torch.float32), "discount": ((b,), torch.float32),
                  "offline": ((b,), torch.bool)}
        if self.frame_device is None:
            shapes["frames"] = ((b, len(self.window), size, size), torch.uint8)
        return shapes

    def fill(self, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Gather one batch into ``host`` (tensors of :meth:`host_shapes`); returns the flat batch
        (``host`` plus device frames when frames live on a device), or None when nothing can be
        sampled yet. Each source's lock is held from its pick to the end of its gather."""
        b = len(host["action"])
        n_online = self.online_rows(b)
        if n_online is None:
            return None
        n_offline = b - n_online
        batch = dict(host)
        if self.frame_device is not None:
            size = self.obs_spec.image_size
            window = (b, len(self.window), size, size)
            batch["frames"] = torch.empty(window, dtype=torch.uint8, device=self.frame_device)
        host["offline"].numpy()[:] = np.arange(b) < n_offline
        for source, rows in ((self.offline, slice(0, n_offline)), (self.online, slice(n_offline, b))):
            if rows.stop > rows.start:
                with source.lock:
                    self._gather(source, source.pick(self.rng, rows.stop - rows.start), batch, rows)
        return batch

    def _gather(self, src, rows: Rows, batch: dict, out: slice) -> None:
        """Fill rows ``out`` of the flat ``batch`` with the transitions at ``rows`` of ``src``."""
        frame_idx = rows.frame[:, None] + self.window
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
        batch["discount"].numpy()[out] = self.gammas[rows.n]
        if self.n_step == 1:
            np.take(src.reward, rows.step, out=batch["reward"].numpy()[out], mode="wrap")
        else:
            j = np.arange(self.n_step)
            # rewards past the episode end belong to another episode (or an unwritten ring slot)
            r = np.take(src.reward, rows.step[:, None] + j, mode="wrap")
            batch["reward"].numpy()[out] = np.where(j < rows.n[:, None], r * self.gammas[:-1], 0.0).sum(1)
