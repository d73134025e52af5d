"""``pipeline collect``: drive a policy and record whole episodes into a dataset store.

The env loop never waits for storage: finished episodes go to a single writer thread (one writer
per store), which appends them in order of completion. With ``workers`` / ``scheduler`` the
episodes run on a dask cluster and come back to the same single writer at the driver.
A store only ever shows whole, committed episodes, so Ctrl-C or a killed process loses at most the
episodes in flight, and ``resume`` runs only the episode seeds that are not yet committed.
"""

from __future__ import annotations

import getpass
import itertools
import platform
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from pipeline.datasets.episode import Episode, EpisodeRecorder
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class CollectConfig:
    out: str
    episodes: int = 200
    route: str = "racetrack"
    policy: str = "expert"  # "expert" | "random" | path to a checkpoint
    noise: float = 0.0
    seed: int = 0
    traffic: int | None = None
    vector_fields: str | None = None
    camera: str | None = None  # None: bev
    max_steps: int | None = None
    workers: int = 0  # 0: in this process; N: a local dask cluster of N worker processes
    scheduler: str | None = None  # address of an existing dask scheduler
    mode: str = "create"  # "create" | "append" (resume) | "overwrite"
    simulator: dict = field(default_factory=dict)  # backend options, e.g. CARLA host/port

    def env_kwargs(self) -> dict:
        from pipeline.envs import get_route

        simulator = self.simulator if get_route(self.route).backend == "carla" else {}
        return {"vector_fields": self.vector_fields, "traffic": self.traffic, "camera": self.camera,
                "max_steps": self.max_steps, **simulator}


_process_env: dict = {}  # this process's env and policy, reused across episodes of one config


def env_and_policy(config: CollectConfig):
    """The env and policy for ``config``, built once per process (each dask worker has its own)."""
    from pipeline.envs import make_env
    from pipeline.policies import make_policy

    key = (config.route, config.policy, config.noise, repr(sorted(config.env_kwargs().items())))
    if _process_env.get("key") != key:
        if "env" in _process_env:
            _process_env.pop("env").close()
        _process_env.clear()
        env = make_env(config.route, **config.env_kwargs())
        _process_env.update(key=key, env=env, policy=make_policy(config.policy, env, noise=config.noise))
    return _process_env["env"], _process_env["policy"]


def run_episode(config: CollectConfig, episode_seed: int) -> Episode:
    """Drive one episode with ``config``'s policy, reset with ``episode_seed``. Runs on any worker.

    A policy with an ``expert_action(obs, info)`` (the scripted expert) also labels every step
    with the action it would take without its noise (DART): the label behaviour cloning learns
    from, while ``action`` stays what was applied, which TD3's critic needs."""
    env, policy = env_and_policy(config)
    label = getattr(policy, "expert_action", None)
    policy.reset(episode_seed)
    obs, info = env.reset(seed=episode_seed)
    recorder = EpisodeRecorder(route=config.route, seed=episode_seed)
    recorder.start(obs)
    while True:
        expert_action = label(obs, info) if label is not None else None
        action = policy.act(obs, info)
        obs, reward, terminated, truncated, info = env.step(action)
        recorder.add(action, reward, obs, terminated, truncated, expert_action=expert_action)
        if terminated or truncated:
            return recorder.finish(info["termination"], route_completion=float(info["route_completion"]))


class _WriterThread(threading.Thread):
    """Appends episodes from a queue to the store, so the env loop never blocks on I/O."""

    MAX_BATCH = 64
    COMMIT_INTERVAL_S = 1.0  # the most a kill can lose beyond the episode being driven

    def __init__(self, writer, on_commit: Callable[[Episode, int], None]):
        super().__init__(name="episode-writer", daemon=True)
        self.writer, self.on_commit = writer, on_commit
        self.queue: queue.Queue[Episode | None] = queue.Queue(maxsize=64)
        self.error: BaseException | None = None

    def run(self):
        finished = False
        while not finished:
            # Episodes finishing within COMMIT_INTERVAL_S share one commit. Each commit costs tens
            # of milliseconds of Python in zarr, which competes with the env loop for the GIL; one
            # commit per short episode halved the collection rate.
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.COMMIT_INTERVAL_S
            while batch[-1] is not None and len(batch) < self.MAX_BATCH:
                try:
                    batch.append(self.queue.get(timeout=max(deadline - time.monotonic(), 0.0)))
                except queue.Empty:
                    break
            if batch[-1] is None:
                finished = True
                batch.pop()
            if not batch:
                continue
            try:
                committed = self.writer.append_many(batch)
                for i, episode in enumerate(batch):
                    self.on_commit(episode, committed - len(batch) + i + 1)
            except BaseException as exc:  # surfaced to the driver, which stops collecting
                self.error = exc
                return

    def put(self, episode: Episode) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(episode)

    def finish(self) -> None:
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _store_meta(config: CollectConfig, backend: str) -> dict:
    return {
        "backend": backend,
        "policy": config.policy,
        "noise": config.noise,
        "seed": config.seed,
        "route": config.route,
        "recorded_by": getpass.getuser(),
        "recorded_on": platform.node(),
    }


_SEED_LIMIT = 2**63


class _PendingSeeds:
    """Seeds of the requested episodes that the store does not hold yet, in order.

    Lazy, so that ``--episodes`` costs memory for the episodes recorded, not for those asked for.
    """

    def __init__(self, config: CollectConfig, done: set[int]):
        self.wanted = range(config.seed, config.seed + config.episodes)
        self.done = {s for s in done if s in self.wanted}

    def __len__(self) -> int:
        return len(self.wanted) - len(self.done)

    def __iter__(self):
        return (s for s in self.wanted if s not in self.done)


def _pending_seeds(config: CollectConfig, writer) -> _PendingSeeds:
    """Seeds of the requested episodes that the store does not hold yet (all of them when new)."""
    from pipeline.datasets.store import TransitionStore

    if writer.committed_episodes == 0:
        return _PendingSeeds(config, set())
    return _PendingSeeds(config, set(TransitionStore(config.out).episodes["seed"].tolist()))


def _episodes_local(config: CollectConfig, seeds, stop: threading.Event):
    for seed in seeds:
        if stop.is_set():
            return
        yield run_episode(config, seed)


def _episodes_on(client):
    """Episodes run on a dask cluster, yielded as they finish (in any order)."""

    def episodes(config: CollectConfig, seeds, stop: threading.Event):
        from dask.distributed import as_completed

        # A window of episodes in flight, topped up as they finish: the scheduler holds a few
        # tasks per worker rather than one per requested episode.
        pending = iter(seeds)
        window = max(4 * sum(client.nthreads().values()), 8)
        running = as_completed([client.submit(run_episode, config, seed, pure=False)
                                for seed in itertools.islice(pending, window)])
        for future in running:
            if stop.is_set():
                break
            yield future.result()
            for seed in itertools.islice(pending, 1):
                running.add(client.submit(run_episode, config, seed, pure=False))

    return episodes


def collect(config: CollectConfig, progress: bool = True) -> dict:
    """Record ``config.episodes`` episodes into ``config.out``; returns a summary dict.

    ``progress`` shows a rich progress bar (episodes, steps/s, mean return).
    """
    from pipeline.envs import get_route, obs_spec_for

    if config.episodes <= 0:
        raise PipelineError(f"--episodes must be a positive number, got {config.episodes}")
    if config.seed < 0 or config.seed + config.episodes > _SEED_LIMIT:
        # episodes/seed is int64 (and env seeds must be non-negative): larger ones cannot be recorded
        raise PipelineError(f"--seed {config.seed} with --episodes {config.episodes} leaves the seed range "
                            f"[0, 2**63); ask for fewer episodes")
    if config.workers < 0:
        raise PipelineError(f"--workers must be >= 0, got {config.workers}")
    if config.noise < 0:
        raise PipelineError(f"--noise is a standard deviation: 0 or more, got {config.noise}")
    if config.max_steps is not None and config.max_steps < 1:
        raise PipelineError(f"--max-steps must be at least 1, got {config.max_steps}")
    if config.traffic is not None and config.traffic < 0:
        raise PipelineError(f"--traffic must be 0 or more, got {config.traffic}")
    route = get_route(config.route)
    spec = obs_spec_for(route, config.vector_fields, config.traffic, config.camera)
    # bad options, a missing checkpoint or an unreachable server must fail before a store exists
    if route.backend == "carla":  # one env per server: only check that it answers
        from pipeline.envs.carla_env import connect

        connect(**config.simulator)
    else:
        env_and_policy(config)
    if config.workers or config.scheduler:  # the cluster too: an unreachable scheduler fails first
        from pipeline.cluster import dask_client

        with dask_client(config.workers, config.scheduler) as client:
            return _record(config, route, spec, _episodes_on(client), progress)
    return _record(config, route, spec, _episodes_local, progress)


def _record(config: CollectConfig, route, spec, source, progress: bool) -> dict:
    """Drive ``source``'s episodes into the store through the writer thread; the summary dict."""
    from pipeline.datasets.store import EpisodeWriter
    from pipeline.envs.driving import RewardConfig
    from pipeline.envs.spec import ActionSpec

    writer = EpisodeWriter(config.out, spec, ActionSpec(), meta=_store_meta(config, route.backend),
                           mode=config.mode, reward=RewardConfig().to_dict())
    seeds = _pending_seeds(config, writer)
    stats = {"steps": 0, "returns": [], "completions": [], "terminations": {}}
    started = time.perf_counter()

    with _progress_bar(progress, total=config.episodes, done=config.episodes - len(seeds)) as bar:

        def on_commit(episode: Episode, committed: int) -> None:
            stats["steps"] += episode.length
            stats["returns"].append(episode.episode_return)
            stats["completions"].append(float(episode.info.get("route_completion", 0.0)))
            stats["terminations"][episode.termination] = stats["terminations"].get(episode.termination, 0) + 1
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(completed=config.episodes - len(seeds) + len(stats["returns"]),
                       sps=stats["steps"] / elapsed, ret=float(np.mean(stats["returns"])))

        writer_thread = _WriterThread(writer, on_commit)
        writer_thread.start()
        stop = threading.Event()
        interrupted = False
        try:
            for episode in source(config, seeds, stop):
                writer_thread.put(episode)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
        finally:
            # whole episodes already finished are still written: nothing recorded is dropped
            writer_thread.finish()
            writer.close()

    elapsed = time.perf_counter() - started
    return {
        "out": config.out,
        "interrupted": interrupted,
        "episodes_recorded": len(stats["returns"]),
        "episodes_committed": writer.committed_episodes,
        "episodes_requested": config.episodes,
        "steps": stats["steps"],
        "steps_per_s": stats["steps"] / elapsed if elapsed > 0 else 0.0,
        "mean_return": float(np.mean(stats["returns"])) if stats["returns"] else float("nan"),
        "mean_route_completion": float(np.mean(stats["completions"])) if stats["completions"] else float("nan"),
        "terminations": stats["terminations"],
        "config": asdict(config),
    }


class _progress_bar:
    """A rich progress bar for episodes with steps/s and mean return, or a no-op."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            from rich.table import Column

            # The bar takes the room the figures leave (ratio=1): at 80 columns it shrinks and
            # the counts, rate and return stay whole.
            self._progress = Progress(
                TextColumn("[bold]collect"), BarColumn(bar_width=None, table_column=Column(ratio=1)),
                MofNCompleteColumn(), TextColumn("episodes"),
                TextColumn("{task.fields[sps]:5.0f} steps/s  return {task.fields[ret]:6.2f}"),
                TimeRemainingColumn(), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("collect", total=self.total, completed=self.done,
                                                 sps=0.0, ret=float("nan"))
        return self

    def update(self, **fields) -> None:
        if self.enabled:
            self._progress.update(self._task, **fields)

    def __exit__(self, *exc):
        if self.enabled:
            self._progress.stop()
        return False
