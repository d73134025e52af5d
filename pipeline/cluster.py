"""The dask cluster that ``collect --workers/--scheduler`` and ``eval --workers/--scheduler`` run on."""

from __future__ import annotations

import contextlib

from pipeline.errors import PipelineError


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None):
    """A dask ``Client`` on an existing scheduler (``scheduler`` address) or on a local cluster of
    ``workers`` single-threaded processes; closes what it started. An unreachable scheduler is a
    :class:`PipelineError`."""
    from dask.distributed import Client, LocalCluster

    cluster = None
    try:
        if scheduler:
            client = Client(scheduler, timeout="10s")
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=50)
            client = Client(cluster)
    except OSError as exc:
        if cluster is not None:
            cluster.close()
        raise PipelineError(f"cannot reach the dask scheduler {scheduler or 'of a local cluster'}: {exc}") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
