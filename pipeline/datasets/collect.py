"""``pipeline collect``: drive a policy and record whole episodes into a dataset store.

The env loop never waits for storage: finished episodes go to the store's one writer, a process of
its own (:mod:`pipeline.datasets.writer_process`), which appends them in order of completion. With
``workers`` / ``scheduler`` the episodes run on a dask cluster and go to the same writer: a local
cluster's workers send them to it themselves, a remote one's come back through dask.
A store only ever shows whole, committed episodes, so Ctrl-C or a killed process loses at most the
episodes in flight, and ``resume`` runs only the episode seeds that are not yet committed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import getpass
import itertools
import platform
import sys
import threading
import time
from dataclasses import dataclass, field, fields, replace
from functools import partial

import numpy as np

from pipeline.cluster import dask_client, local_workers_for, probe_servers
from pipeline.datasets.episode import Episode, EpisodeRecorder, EpisodeSummary
from pipeline.datasets.writer_process import Delivered, StoreWriterProcess, deliver
from pipeline.errors import PipelineError
from pipeline.interrupts import save_despite_an_interrupt
from pipeline.progress import ProgressBar


@dataclass(frozen=True)
class CollectConfig:
    out: str
    episodes: int = 200
    route: str = "racetrack"  # a route name, FILE.xml (every route of a Leaderboard file) or FILE.xml#ID
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
    carla_servers: tuple[tuple[str, int], ...] = ()  # one CARLA server per dask worker (host, port)

    @functools.cached_property
    def routes(self) -> list:
        """The routes (:class:`~pipeline.envs.routes.Route`) that ``route`` names, resolved once per
        config: a route file is read once, not once per episode."""
        from pipeline.envs import resolve_routes

        return resolve_routes(self.route)

    def route_names(self) -> list[str]:
        """The routes ``route`` names, in order (one, or every route of a route file)."""
        return [r.name for r in self.routes]

    def route_for(self, episode_seed: int) -> str:
        """The route of the episode reset with ``episode_seed``: the requested episodes are split
        into equal consecutive blocks, one per route, so each process switches routes rarely."""
        names = self.route_names()
        index = (episode_seed - self.seed) * len(names) // max(self.episodes, 1)
        return names[min(max(index, 0), len(names) - 1)]

    def env_kwargs(self) -> dict:
        simulator = self.simulator if self.routes[0].backend == "carla" else {}
        return {"vector_fields": self.vector_fields, "traffic": self.traffic, "camera": self.camera,
                "max_steps": self.max_steps, **simulator}


#: this process's env and policy per simulator server, reused across episodes of one config and
#: route: {(host, port): {"key", "env", "policy"}} (one slot, (None, None), for the embedded backend)
_process_envs: dict[tuple, dict] = {}


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """glibc: let this process keep the memory it frees, for the next episode to reuse; returns
    whether that took (False off glibc).

    Each episode's frames buffer (0.5-4 MB) is freed once handed over. glibc's defaults serve such
    blocks by mmap, or trim them off the heap's top when several are freed together, and the next
    episode then faults every page in again: 1-4 faults a step at ~2 us each on our VM, 1-2% of
    the env loop. Blocks up to 32 MB now come from the heap, and up to 64 MB of free heap stays.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 64 << 20))


def env_and_policy(config: CollectConfig, route: str | None = None):
    """The env and policy for ``config`` on ``route`` (default: its first route), built once per
    process (each dask worker has its own) and server; another route closes the previous env
    first, since a CARLA server runs one env at a time."""
    from pipeline.envs import make_env
    from pipeline.policies import make_policy

    route = route or config.route_names()[0]
    slot = _process_envs.setdefault((config.simulator.get("host"), config.simulator.get("port")), {})
    key = (route, config.policy, config.noise, repr(sorted(config.env_kwargs().items())))
    if slot.get("key") != key:
        keep_freed_memory()  # the process drives episodes from now on (a dask worker too)
        if "env" in slot:
            slot.pop("env").close()
        slot.clear()
        env = make_env(route, **config.env_kwargs())
        slot.update(key=key, env=env, policy=make_policy(config.policy, env, noise=config.noise))
    return slot["env"], slot["policy"]


def build_env_and_policy(config: CollectConfig) -> None:
    """:func:`env_and_policy`, built and kept in this process (a dask worker's warm-up); returns
    nothing, so nothing travels back."""
    env_and_policy(config)


def close_process_envs() -> None:
    """Close this process's envs: on CARLA that restores each server's settings for the next user."""
    while _process_envs:
        _, slot = _process_envs.popitem()
        if "env" in slot:
            slot["env"].close()


def run_episode_on(config: CollectConfig, episode_seed: int, server: dict) -> Episode:
    """:func:`run_episode` on one server of ``--carla-servers`` (``server``: host, port, tm_port)."""
    return run_episode(replace(config, simulator={**config.simulator, **server}), episode_seed)


def run_episode(config: CollectConfig, episode_seed: int) -> Episode:
    """Drive one episode with ``config``'s policy, reset with ``episode_seed``. Runs on any worker.

    A policy that keeps a ``last_expert_action`` (the scripted expert) also labels every step
    with the action it would have taken without its noise (DART): the label behaviour cloning
    learns from, while ``action`` stays what was applied, which TD3's critic needs."""
    route = config.route_for(episode_seed)
    env, policy = env_and_policy(config, route)
    policy.reset(episode_seed)
    obs, info = env.reset(seed=episode_seed)
    recorder = EpisodeRecorder(route=route, seed=episode_seed)
    recorder.start(obs)
    while True:
        action = policy.act(obs, info)
        expert_action = getattr(policy, "last_expert_action", None)
        obs, reward, terminated, truncated, info = env.step(action)
        recorder.add(action, reward, obs, terminated, truncated, expert_action=expert_action)
        if terminated or truncated:
            return recorder.finish(info["termination"], route_completion=float(info["route_completion"]))


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


#: A dask task drives several episodes in turn, up to about this many steps (~1 s of driving for
#: one embedded worker) and this many episodes: the cluster's own work per task (the scheduler's
#: transitions, the client's futures, a result fetched) then comes once per batch. Batches of up
#: to 8 expert laps recorded 3.6% faster with 2 workers than one episode per task, the collector
#: and its writer taking 0.12 cores of the 2 instead of 0.17 (benchmarks/results/collect_scaling.txt).
TASK_STEPS = 2048
TASK_EPISODES = 64
#: On Ctrl-C, how long collect waits for the episodes of the dask tasks running (about a task).
INTERRUPT_WAIT_S = 3.0


def run_episodes(config: CollectConfig, episode_seeds: list[int]) -> list[Episode]:
    """:func:`run_episode` for each seed in turn, on one worker: one dask task, one result."""
    return [run_episode(config, seed) for seed in episode_seeds]


def run_episodes_into(writer_address: str, config: CollectConfig, episode_seeds: list[int]) -> Delivered:
    """:func:`run_episodes`, sent to the store writer at ``writer_address`` by the worker itself:
    only the receipt comes back through dask."""
    return deliver(writer_address, run_episodes(config, episode_seeds))


def task_size(mean_steps: float | None, left: int, workers: int) -> int:
    """Episodes for the next dask task: about TASK_STEPS steps of episodes of ``mean_steps`` steps
    (one while no episode has come back), at most TASK_EPISODES, and at most a quarter of each
    worker's share of the ``left`` episodes, so that the workers finish within about an episode of
    each other."""
    if mean_steps is None:
        return 1
    return max(1, min(TASK_EPISODES, int(TASK_STEPS // max(mean_steps, 1.0)), left // (4 * workers)))


def _episodes_on(client, writer_address: str | None = None):
    """Episodes run on a dask cluster, yielded as their tasks finish (in any order); with
    ``writer_address`` (workers on this machine), the workers deliver them to the store writer and
    the :class:`Delivered` receipts are yielded instead."""
    run = partial(run_episodes_into, writer_address) if writer_address else run_episodes

    def episodes(config: CollectConfig, seeds, stop: threading.Event):
        from dask.distributed import as_completed

        # A window of two tasks per worker (one running, one waiting), topped up as they finish:
        # the scheduler holds a few tasks, not one per requested episode.
        pending, left = iter(seeds), len(seeds)
        workers = max(sum(client.nthreads().values()), 1)
        returned_episodes = returned_steps = 0
        in_flight: set = set()

        def submit_next() -> list:
            nonlocal left
            mean_steps = returned_steps / returned_episodes if returned_episodes else None
            batch = list(itertools.islice(pending, task_size(mean_steps, left, workers)))
            left -= len(batch)
            futures = [client.submit(run, config, batch, pure=False)] if batch else []
            in_flight.update(futures)
            return futures

        def episodes_of(future):
            nonlocal returned_episodes, returned_steps
            in_flight.discard(future)
            result = future.result()
            if isinstance(result, Delivered):
                returned_episodes, returned_steps = returned_episodes + result.episodes, returned_steps + result.steps
                yield result
                return
            for episode in result:
                returned_episodes, returned_steps = returned_episodes + 1, returned_steps + episode.length
                yield episode

        running = as_completed([future for _ in range(2 * workers) for future in submit_next()])
        try:
            for future in running:
                if stop.is_set():
                    break
                yield from episodes_of(future)
                for next_future in submit_next():
                    running.add(next_future)
        except KeyboardInterrupt:
            # Ctrl-C: the workers (which leave it to us) finish the tasks they are running within
            # about a task's driving. Their episodes are whole: wait that long for them, so that
            # an interrupt drops only what was still being driven. A second Ctrl-C drops them too.
            with contextlib.suppress(TimeoutError):
                for future in as_completed(list(in_flight), timeout=INTERRUPT_WAIT_S):
                    if future.status == "finished":  # a task that failed has nothing to keep
                        yield from episodes_of(future)
            raise

    return episodes


class _EpisodesOnServers:
    """Episodes on a dask cluster, one CARLA server per worker (:func:`pipeline.cluster.run_on_servers`).
    ``events`` keeps the lines said about lost servers, for the summary."""

    def __init__(self, client, servers: list[tuple[str, int]]):
        self.client, self.servers = client, servers
        self.events: list[str] = []

    def notify(self, line: str) -> None:
        self.events.append(line)
        print(f"warning: {line}", file=sys.stderr, flush=True)

    def __call__(self, config: CollectConfig, seeds, stop: threading.Event):
        from pipeline.cluster import AllServersLostError, run_on_servers
        from pipeline.errors import SimulatorUnavailableError

        try:
            # run_on_servers retries a lost server's episode by index: the seeds as a list (a
            # CARLA episode takes seconds, so a list of the asked-for seeds is small beside them)
            for _, episode in run_on_servers(
                    self.client, self.servers, list(seeds), partial(run_episode_on, config),
                    describe=lambda seed: f"episode seed {seed} ({config.route_for(seed)})", notify=self.notify,
                    is_lost_server=lambda exc: isinstance(exc, SimulatorUnavailableError)):
                if stop.is_set():
                    break
                yield episode
        except AllServersLostError as exc:
            raise AllServersLostError(f"{exc}; the committed episodes are kept: continue with --resume "
                                      f"once servers are back") from None
        finally:
            with contextlib.suppress(Exception):  # a worker that died has nothing left to close
                self.client.run(close_process_envs)  # every worker hands its server back


def collect(config: CollectConfig, progress: bool = True) -> dict:
    """Record ``config.episodes`` episodes into ``config.out``; returns a summary dict.

    ``progress`` shows a rich progress bar (episodes, steps/s, mean return).
    """
    from pipeline.envs import obs_spec_for

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
    routes = config.routes
    route = routes[0]
    spec = obs_spec_for(route, config.vector_fields, config.traffic, config.camera)
    if any(obs_spec_for(r, config.vector_fields, config.traffic, config.camera) != spec for r in routes):
        raise PipelineError(f"the routes of {config.route} record different observations (their default "
                            f"traffic differs); give --traffic N")
    servers = list(config.carla_servers)
    # The writer process starts (forks) now, while this process is small: every page both share
    # costs the env loop a copy-on-write fault when it first writes it. It opens the store only in
    # _record, so bad options, a missing checkpoint or an unreachable server or scheduler still fail
    # before a store exists; and it starts before any cluster thread does.
    # Workers of a local cluster (on this machine) deliver their episodes to the writer themselves.
    local_cluster = config.workers > 0 and not config.scheduler and not servers
    with StoreWriterProcess(listen=local_cluster) as writer:
        _check_simulator(config, route, servers)
        workers = local_workers_for(servers, config.workers, config.scheduler)
        if workers or config.scheduler:
            with dask_client(workers, config.scheduler) as client:
                if not servers:
                    # Every worker builds its env and policy now, all at once, as this process built
                    # its own above: the recording's steps/s then count driving, not start-up.
                    client.run(build_env_and_policy, config)
                source = _EpisodesOnServers(client, servers) if servers else _episodes_on(client, writer.address)
                return _record(config, route, spec, source, progress, writer)
        return _record(config, route, spec, _episodes_local, progress, writer)


def _check_simulator(config: CollectConfig, route, servers: list[tuple[str, int]]) -> None:
    """Fail now on an unreachable server or a policy that cannot be built; builds this process's
    env and policy for the embedded backend."""
    if servers:
        if route.backend != "carla":
            raise PipelineError(f"--carla-servers is for CARLA routes; {route.name} is {route.backend}")
        probe_servers(servers, config.simulator)
    elif route.backend == "carla":  # one env per server: only check that it answers
        from pipeline.envs.carla_env import probe_server

        if config.workers > 1 or config.scheduler:
            raise PipelineError("a CARLA server runs one env at a time; give one server per worker with "
                                "--carla-servers host:port,host:port,...")
        probe_server(**config.simulator)
    else:
        env_and_policy(config)


def _record(config: CollectConfig, route, spec, source, progress: bool, writer: StoreWriterProcess) -> dict:
    """Drive ``source``'s episodes into the store through ``writer``; the summary dict."""
    from pipeline.datasets.store import check_destination
    from pipeline.envs.driving import RewardConfig
    from pipeline.envs.spec import ActionSpec

    # A new store is created by the writer while the first episodes are driven (~30-60 ms saved
    # per call); what would refuse it (--out exists, or --overwrite names no zarr store) is checked
    # here first, so that common mistake stops before any driving. --resume must first know what
    # the store holds, and a CARLA episode takes minutes: those wait for the store.
    wait = config.mode == "append" or route.backend == "carla"
    if not wait:
        check_destination(config.out, config.mode)
    writer.open(config.out, spec, ActionSpec(), meta=_store_meta(config, route.backend), mode=config.mode,
                reward=RewardConfig().to_dict(), wait=wait)
    seeds = _pending_seeds(config, writer)
    stats = {"steps": 0, "returns": [], "completions": [], "terminations": {}, "return_sum": 0.0}
    started = time.perf_counter()

    with _progress_bar(progress, total=config.episodes, done=config.episodes - len(seeds)) as bar:

        def on_commit(summary: EpisodeSummary, committed: int) -> None:
            # runs on the writer's notice thread, under the env loop's GIL: a few additions only
            stats["steps"] += summary.length
            stats["returns"].append(summary.episode_return)
            stats["completions"].append(float(summary.info.get("route_completion", 0.0)))
            stats["terminations"][summary.termination] = stats["terminations"].get(summary.termination, 0) + 1
            stats["return_sum"] += summary.episode_return
            elapsed = max(time.perf_counter() - started, 1e-9)
            done = len(stats["returns"])
            bar.update(completed=config.episodes - len(seeds) + done, sps=stats["steps"] / elapsed,
                       ret=stats["return_sum"] / done)

        writer.on_commit = on_commit
        stop = threading.Event()
        interrupted = False
        try:
            for episode in source(config, seeds, stop):  # an Episode, or a worker's Delivered receipt
                writer.put(episode)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
        finally:
            driven = time.perf_counter()
            # whole episodes already finished are still written: nothing recorded is dropped, even
            # by a Ctrl-C while the writer commits them (giving up would drop those not yet handed over)
            interrupted = save_despite_an_interrupt(writer.finish, interrupted)

    elapsed = time.perf_counter() - started
    return {
        "out": config.out,
        "interrupted": interrupted,
        "episodes_recorded": len(stats["returns"]),
        "episodes_committed": writer.committed_episodes,
        "episodes_requested": config.episodes,
        "steps": stats["steps"],
        "steps_per_s": stats["steps"] / elapsed if elapsed > 0 else 0.0,
        # the env loop alone: from the store being opened (a new one is created meanwhile) to the
        # last episode handed over; the last commit left out (benchmarks/collect_throughput.py)
        "driving_s": driven - started,
        "mean_return": float(np.mean(stats["returns"])) if stats["returns"] else float("nan"),
        "mean_route_completion": float(np.mean(stats["completions"])) if stats["completions"] else float("nan"),
        "terminations": stats["terminations"],
        "server_events": list(getattr(source, "events", [])),  # CARLA servers lost, episodes retried
        # the simulator options stay out: they may hold objects (a test's client factory)
        "config": {f.name: getattr(config, f.name) for f in fields(config) if f.name != "simulator"},
    }


def _progress_bar(enabled: bool, total: int, done: int) -> ProgressBar:
    """Episodes recorded, with steps/s and mean return (``update(completed=, sps=, ret=)``)."""
    return ProgressBar(enabled, "[bold]collect", total, done=done, unit="episodes", transient=False,
                       fields={"sps": 0.0, "ret": float("nan")},
                       template="{task.fields[sps]:5.0f} steps/s  return {task.fields[ret]:6.2f}")
