"""The online source: a ring of the last transitions of one env stream, frame-deduplicated."""

from __future__ import annotations

import threading

import numpy as np
import torch

from pipeline.datasets.replay.frames import Rows, device_order, nbytes_of, new_frames, write_frames, writing
from pipeline.envs.spec import ObsSpec

_NEVER = np.iinfo(np.int64).max  # "episode end" of steps whose episode is still running


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
        self.frames = new_frames(c + c // 4 + k + n_step, obs_spec.image_size, frame_device)
        self.order = device_order(self.frames)
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
        with self.lock, writing(self.order):
            if new_episode:
                self.end_episode()
                image = np.asarray(obs["image"], np.uint8)
                stack = (self.frames_written + np.arange(self.k)) % len(self.frames)
                write_frames(self.frames, stack, image)
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
            write_frames(self.frames, newest, self._last_frame[None])
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
        return sum(nbytes_of(a) for a in arrays)
