"""DictReplayBuffer: the public buffer, composed of the offline source, the online ring, the
sampler that mixes them and the prefetcher that hands batches to the learner."""

from __future__ import annotations

import os
import re
import threading

import numpy as np
import torch

from pipeline.datasets.episode import EpisodeRecorder
from pipeline.datasets.replay.offline import OfflineSource, refresh_loop
from pipeline.datasets.replay.online import OnlineRing
from pipeline.datasets.replay.prefetch import Prefetcher
from pipeline.datasets.replay.sampler import Sampler
from pipeline.datasets.store import EpisodeWriter, TransitionStore
from pipeline.envs.spec import ActionSpec, ObsSpec
from pipeline.errors import PipelineError

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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
        _check_options(online_mix, n_step, gamma, online_capacity, prefetch, refresh_duty)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.online_mix, self.n_step, self.gamma, self.prefetch = online_mix, n_step, gamma, prefetch
        self.frames_on_device = frames_on_device
        frame_device = self.device if frames_on_device else None

        # storage: the dataset (memory or reservoir) and the ring of fresh rollouts
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
        self.online: OnlineRing | None = None
        if online_capacity:
            self.online = OnlineRing(
                online_capacity, self.obs_spec, self.action_spec.dim, n_step, frame_device)
        if self.offline_source is None and self.online is None:
            raise PipelineError("DictReplayBuffer has no source: give an offline store or online_capacity")
        self._open_online_store(online_store, online_route, online_reward, storage_options)

        # sampling and prefetching, and the reservoir's refresh thread
        self.sampler = Sampler(self.offline_source, self.online, online_mix, n_step, gamma, self.obs_spec,
                               self.action_spec.dim, seed, frame_device)
        self._stop = threading.Event()
        self._errors: list[BaseException] = []  # raised in the threads, re-raised by sample()
        self.prefetcher = Prefetcher(self.sampler, self.device, prefetch, self._stop, self._errors)
        self._refresher: threading.Thread | None = None
        if self.offline_source is not None and self.offline_source.mode == "reservoir" and refresh_duty > 0:
            self._refresher = threading.Thread(
                target=refresh_loop, args=(self.offline_source, self._stop, refresh_duty, self._errors),
                name="replay-refresh", daemon=True)
            self._refresher.start()

    def _open_online_store(self, online_store, online_route: str, online_reward: dict | None,
                           storage_options: dict | None) -> None:
        """Where finished online episodes are appended (``online_store``), if anywhere."""
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
    def rng(self) -> np.random.Generator:
        """The generator every draw comes from (seeded by ``seed``)."""
        return self.sampler.rng

    @property
    def wait_seconds(self) -> float:
        """Total time :meth:`sample` waited for the prefetcher."""
        return self.prefetcher.wait_seconds

    @property
    def online_size(self) -> int:
        return self.online.size if self.online is not None else 0

    @property
    def offline_size(self) -> int:
        return self.offline_source.size if self.offline_source is not None else 0

    def __len__(self) -> int:
        """Transitions sampleable now (offline + online)."""
        return self.offline_size + self.online_size

    def sample(self, batch_size: int) -> dict:
        """A batch of ``batch_size`` transitions (see the class docstring for the fields).

        On CPU the batch's tensors are reused by a later batch once ``sample`` is called again:
        clone what you keep. On CUDA every batch is new device memory.
        """
        if self._stop.is_set():
            raise RuntimeError("the replay buffer is closed")
        return self.prefetcher.get(batch_size)

    # -- sizes and shutdown

    @property
    def nbytes(self) -> int:
        """Bytes of every array the buffer stores (offline frames/reservoir, per-step arrays, ring)."""
        return sum(s.nbytes for s in (self.offline_source, self.online) if s is not None)

    def close(self) -> None:
        """Stop the threads and finish the online store. Idempotent."""
        self._stop.set()
        for thread in (self.prefetcher.thread, self._refresher):
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


def _check_options(online_mix: float, n_step: int, gamma: float, online_capacity: int, prefetch: int,
                   refresh_duty: float) -> None:
    if not 0.0 <= online_mix <= 1.0:
        raise PipelineError(f"online mix must be between 0 and 1, got {online_mix}")
    if n_step < 1:
        raise PipelineError(f"n_step must be at least 1, got {n_step}")
    if not 0.0 < gamma <= 1.0:
        raise PipelineError(f"gamma must be in (0, 1], got {gamma}")
    if online_capacity < 0 or prefetch < 0 or not 0.0 <= refresh_duty <= 1.0:
        raise PipelineError("online_capacity and prefetch must be >= 0 and refresh_duty in [0, 1]")
