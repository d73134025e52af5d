"""dask scaling of `pipeline collect`: steps/s with ``--workers 2`` against one process.

In one process, alternately (one, two, one, two, ... so that drift in the machine's load hits both
alike): ``collect`` in this process (``workers=0``: the env loop here, the store's writer process beside it) and
``collect`` on a local dask cluster of N worker processes (``workers=N``; the episodes come back to
the same single writer). Each records the same episodes (same policy, seeds and route) into a
fresh store. The rate is the store's committed steps over the recording's wall time, which starts
once the cluster is up; the cluster's start-up is printed beside it.

    python benchmarks/collect_scaling.py [--episodes 24] [--workers 2] [--rounds 2] [--policy expert]

Last line: scaling_<N>_workers=<steps/s with N workers / steps/s in one process> (target on the
2-core machine: scaling_2_workers >= 1.8).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (one process, N workers) runs")
    parser.add_argument("--route", default="racetrack")
    parser.add_argument("--policy", default="expert")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.episodes, args.workers, args.rounds) < 1:
        parser.error("--episodes, --workers and --rounds must be at least 1")

    seconds = {0: 0.0, args.workers: 0.0}
    steps = {0: 0, args.workers: 0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for workers in (0, args.workers):
                recording, wall, n = record(str(Path(tmp) / f"r{r}-w{workers}.zarr"), args, workers)
                seconds[workers] += recording
                steps[workers] += n
                label = "one process" if workers == 0 else f"{workers} dask workers"
                print(f"round {r}: {label}: {n / recording:.0f} steps/s recording, {wall:.1f} s wall in all "
                      f"({wall - recording:.1f} s of start-up)", flush=True)
    one, many = steps[0] / seconds[0], steps[args.workers] / seconds[args.workers]
    print(f"one process {one:.0f} steps/s, {args.workers} workers {many:.0f} steps/s ({os.cpu_count()} cores)")
    print(f"scaling_{args.workers}_workers={many / one:.3f}")


if __name__ == "__main__":
    main()
