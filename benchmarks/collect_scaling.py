"""dask scaling of `pipeline collect`: steps/s with ``--workers 2`` against one process.

In one process, alternately (one, two, one, two, ... so that drift in the machine's load hits both
alike): ``collect`` in this process (``workers=0``: the env loop here, the store's writer process beside it) and
``collect`` on a local dask cluster of N worker processes (``workers=N``; the workers send their
episodes to the same single writer). Each records the same episodes (same policy, seeds and route) into a
fresh store. The rate is the store's committed steps over the recording's wall time, which starts
once the cluster is up; the cluster's start-up is printed beside it.

    python benchmarks/collect_scaling.py [--episodes 200] [--workers 2] [--rounds 2] [--policy expert]

The default workload is ``pipeline collect``'s own default, 200 expert laps (~53k steps: ~20-30 s in
one process). A short collection scales less: the cluster's first tasks carry one episode each
(their length is not known yet), the last worker to finish leaves the other idle for up to an
episode, and the store's creation and last commit weigh more in a short run (``--episodes 24``,
~2 s with 2 workers: 1.63 where 200 laps gave 1.83 in the same hour, 2026-12-06).

The machine's own ceiling, in the same rounds: the same episodes driven by ``run_episode`` (what a
dask worker runs: env, policy, the episode kept in memory) in N plain processes at once against one
such process, with no store, no dask and nothing sent back but a step count. On a box whose cores
share one physical core, or a host that throttles, this is well below N, and no collector can
beat it. ``scaling_vs_plain`` is the dask figure over it: the share of the machine's scaling that
``collect --workers N`` keeps.

Last line: scaling_<N>_workers=<steps/s with N workers / steps/s in one process>
plain_scaling_<N>_processes=<the same for plain processes> scaling_vs_plain=<the first over the
second> (target on the 2-core machine: scaling_2_workers >= 1.8).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per env process; dask workers inherit it


def record(out: str, args, workers: int) -> tuple[float, float, int]:
    """(seconds of recording, wall seconds of the whole call including the cluster's start, steps)."""
    from pipeline.datasets.collect import CollectConfig, collect

    started = time.perf_counter()
    summary = collect(CollectConfig(out=out, episodes=args.episodes, route=args.route, policy=args.policy,
                                    noise=args.noise, seed=args.seed, workers=workers), progress=False)
    wall = time.perf_counter() - started
    if summary["episodes_committed"] != args.episodes:
        raise SystemExit(f"error: {workers} worker(s) committed {summary['episodes_committed']} of "
                         f"{args.episodes} episodes")
    return summary["steps"] / summary["steps_per_s"], wall, summary["steps"]


def _plain_process(config, seeds: list[int], barrier, results) -> None:
    """Build the env, wait for the others, drive ``seeds`` as a dask worker would; report the steps."""
    from pipeline.datasets.collect import env_and_policy, run_episode

    env_and_policy(config, config.route_for(seeds[0]))  # built before the clock starts, as collect's
    barrier.wait()
    results.put(sum(run_episode(config, seed).length for seed in seeds))


def plain(args, processes: int) -> float:
    """Steps/s of ``run_episode`` over the benchmark's episodes in ``processes`` plain processes."""
    import multiprocessing

    from pipeline.datasets.collect import CollectConfig

    config = CollectConfig(out="unused", episodes=args.episodes, route=args.route, policy=args.policy,
                           noise=args.noise, seed=args.seed)
    seeds = list(range(args.seed, args.seed + args.episodes))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    workers = [ctx.Process(target=_plain_process, args=(config, seeds[i::processes], barrier, results))
               for i in range(processes)]
    for w in workers:
        w.start()
    barrier.wait(timeout=600)  # a child that dies before the barrier breaks it instead of hanging here
    started = time.perf_counter()
    steps = sum(results.get(timeout=3600) for _ in workers)
    elapsed = time.perf_counter() - started
    for w in workers:
        w.join()
    return steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200, help="laps per run (collect's default: 200)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (one process, N workers) runs")
    parser.add_argument("--route", default="racetrack")
    parser.add_argument("--policy", default="expert")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.episodes, args.workers, args.rounds) < 1:
        parser.error("--episodes, --workers and --rounds must be at least 1")

    n_workers = args.workers
    seconds = {0: 0.0, n_workers: 0.0}
    steps = {0: 0, n_workers: 0}
    plain_rates: dict[int, list[float]] = {1: [], n_workers: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for workers in (0, n_workers):
                recording, wall, n = record(str(Path(tmp) / f"r{r}-w{workers}.zarr"), args, workers)
                seconds[workers] += recording
                steps[workers] += n
                label = "one process" if workers == 0 else f"{workers} dask workers"
                print(f"round {r}: {label}: {n / recording:.0f} steps/s recording, {wall:.1f} s wall in all "
                      f"({wall - recording:.1f} s of start-up)", flush=True)
            for processes in (1, n_workers):
                plain_rates[processes].append(plain(args, processes))
                print(f"round {r}: {processes} plain process(es), no store: {plain_rates[processes][-1]:.0f} "
                      f"steps/s", flush=True)
    one, many = steps[0] / seconds[0], steps[n_workers] / seconds[n_workers]
    plain_one, plain_many = (sum(plain_rates[k]) / len(plain_rates[k]) for k in (1, n_workers))
    scaling, plain_scaling = many / one, plain_many / plain_one
    print(f"one process {one:.0f} steps/s, {n_workers} workers {many:.0f} steps/s ({os.cpu_count()} cores); "
          f"plain processes, no store: 1 {plain_one:.0f}, {n_workers} {plain_many:.0f} steps/s")
    print(f"scaling_{n_workers}_workers={scaling:.3f} plain_scaling_{n_workers}_processes={plain_scaling:.3f} "
          f"scaling_vs_plain={scaling / plain_scaling:.3f}")


if __name__ == "__main__":
    main()
