"""The dask cluster that ``collect --workers/--scheduler`` and ``eval --workers/--scheduler`` run on,
and the one-server-per-worker dispatch of ``--carla-servers``."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import deque
from typing import Callable, Iterator

from pipeline.errors import PipelineError, SimulatorUnavailableError


#: The environment dask's nannies give the workers of our local cluster (dask's default, less
#: MALLOC_TRIM_THRESHOLD_): one thread per worker process for OpenMP, MKL and OpenBLAS.
ONE_THREAD_EACH = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}
#: How often the event loops of our local cluster wake up on their own (dask: 20 ms, 100 ms, 500 ms).
QUIET_EVENT_LOOPS = {"distributed.admin.tick.interval": "1s", "distributed.worker.memory.monitor-interval": "1s",
                     "distributed.admin.system-monitor.interval": "2s"}


def dask_setup(worker) -> None:
    """dask's preload hook (``distributed.worker.preload``), run in each worker of our local cluster
    as it starts. A terminal's Ctrl-C reaches the whole process group; the driver handles it (it
    commits what it has, then closes the cluster), and a worker that took it as well printed
    KeyboardInterrupt tracebacks beside the driver's one line."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None):
    """A dask ``Client`` on an existing scheduler (``scheduler`` address) or on a local cluster of
    ``workers`` single-threaded processes; closes what it started. An unreachable scheduler is a
    :class:`PipelineError`."""
    import dask
    from dask.distributed import Client, LocalCluster

    cluster, changed_environ = None, {}
    try:
        if scheduler:
            client = Client(scheduler, timeout="10s")
        else:
            # Workers of our own cluster run without dask's statistical profiler: it samples the
            # worker's stack every 10 ms under the GIL, and recording ran ~7% faster without it
            # (benchmarks/results/collect_scaling.txt). The nannies hand this config to their workers.
            # Nor with dask's MALLOC_TRIM_THRESHOLD_=65536 (one thread each stays): glibc then hands
            # freed heap back at once, and an env loop that allocates each step's frames took page
            # faults for it: a worker drove ~20% slower. The nannies also write these variables into
            # this process's environment, where processes started later inherit them; what they
            # changed is put back when the cluster closes.
            # And their event loops wake less often: each wake-up takes the GIL from the env loop
            # for a moment that costs it ~0.15 ms on a 2-core VM. Ticks every 1 s instead of 20 ms,
            # memory checks every 1 s instead of 0.1 s, system metrics every 2 s: 2 workers
            # recorded 5.7% faster (48 expert laps, 4 of 4 alternating pairs, 2026-12-06).
            before = dict(os.environ)
            with dask.config.set({"distributed.worker.profile.enabled": False,
                                  "distributed.nanny.pre-spawn-environ": ONE_THREAD_EACH,
                                  "distributed.worker.preload": ["pipeline.cluster"],
                                  **QUIET_EVENT_LOOPS}):
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=50)
            changed_environ = {k: before.get(k) for k, v in os.environ.items() if before.get(k) != v}
            client = Client(cluster)
    except OSError as exc:
        if cluster is not None:
            cluster.close()
            _put_back(changed_environ)
        raise PipelineError(f"cannot reach the dask scheduler {scheduler or 'of a local cluster'}: {exc}") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
            _put_back(changed_environ)


def _put_back(environ: dict[str, str | None]) -> None:
    """Give these environment variables their earlier values (None: it was not set)."""
    for name, value in environ.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# -- one CARLA server per dask worker ------------------------------------------------------------
class AllServersLostError(SimulatorUnavailableError):
    """Every server of ``--carla-servers`` stopped answering."""


def parse_servers(text: str) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` -> ``[(host, port), ...]``; a malformed or repeated entry is a
    :class:`PipelineError`."""
    servers = []
    for entry in (e.strip() for e in text.split(",")):
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise PipelineError(f"--carla-servers takes host:port[,host:port...]; {entry!r} is not host:port")
        if (host, int(port)) in servers:
            raise PipelineError(f"--carla-servers names {entry} twice; each server runs one env")
        servers.append((host, int(port)))
    return servers


def _name(server: tuple[str, int]) -> str:
    return f"{server[0]}:{server[1]}"


def server_workers(client, servers: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Pair each server with one dask worker (address order): one env per worker, one worker per server."""
    workers = sorted(client.scheduler_info()["workers"])
    if len(workers) < len(servers):
        raise PipelineError(f"{len(servers)} CARLA servers need {len(servers)} dask workers, one each; "
                            f"the cluster has {len(workers)}")
    return dict(zip(servers, workers))


def run_on_servers(client, servers: list[tuple[str, int]], jobs: list, run: Callable, describe: Callable,
                   notify: Callable[[str], None], is_lost_server: Callable[[BaseException], bool]) -> Iterator:
    """Run every job as ``run(job, options)`` on the dask worker paired with a server, at most one
    job per server at a time, and yield ``(job_index, result)`` as jobs finish. ``options`` are the
    env's options for that server: ``host``, ``port`` and a ``tm_port`` of its own (the
    TrafficManager listens on the client's machine, so two workers on one machine need two ports).

    A job whose server stopped answering (``is_lost_server(exc)``) costs only itself: the server is
    dropped, ``notify`` gets one line saying so (``describe(job)`` names the job), and the job runs
    again on the next free server. With no server left the run stops with :class:`AllServersLostError`.
    Any other error is the job's own and propagates.
    """
    from dask.distributed import as_completed

    from pipeline.envs.carla_env import DEFAULT_TM_PORT

    worker_of = server_workers(client, servers)
    options = {s: {"host": s[0], "port": s[1], "tm_port": DEFAULT_TM_PORT + i} for i, s in enumerate(servers)}
    waiting = deque(range(len(jobs)))
    free, lost = deque(servers), []
    running = as_completed()
    where: dict = {}  # future key -> (job index, server)

    def start_jobs():
        while waiting and free:
            index, server = waiting.popleft(), free.popleft()
            future = client.submit(run, jobs[index], options[server], workers=[worker_of[server]],
                                   allow_other_workers=False, pure=False)
            where[future.key] = (index, server)
            running.add(future)

    start_jobs()
    for future in running:
        index, server = where.pop(future.key)
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - sorted below: a lost server, or the job's own error
            if not is_lost_server(exc):
                raise
            lost.append(server)
            waiting.appendleft(index)
            alive = [s for s in servers if s not in lost]
            if not alive:
                raise AllServersLostError(f"every CARLA server stopped answering (the last, {_name(server)}, "
                                          f"during {describe(jobs[index])})") from None
            notify(f"CARLA server {_name(server)} stopped answering during {describe(jobs[index])}; "
                   f"dropping it and running that again on {', '.join(map(_name, alive))}")
            start_jobs()
            continue
        free.append(server)
        start_jobs()
        yield index, result


def local_workers_for(servers: list[tuple[str, int]], workers: int, scheduler: str | None) -> int:
    """How many local dask workers ``--carla-servers`` runs on: one per server. ``--workers``, when
    given, must say the same; with ``--scheduler`` the cluster's own workers are used."""
    if scheduler or not servers:
        return workers
    if workers and workers != len(servers):
        raise PipelineError(f"--workers {workers} does not match the {len(servers)} --carla-servers: "
                            f"each worker drives one server (leave --workers out)")
    return len(servers)


def probe_servers(servers: list[tuple[str, int]], simulator: dict) -> None:
    """Every server must answer before anything is written; the first that does not is the error."""
    from pipeline.envs.carla_env import probe_server

    for host, port in servers:
        probe_server(**{**simulator, "host": host, "port": port})
