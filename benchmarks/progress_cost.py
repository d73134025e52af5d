"""What `pipeline collect`'s progress bar costs the env loop: the time rich spends redrawing it.

rich redraws a live bar on a thread of its own, in Python, holding the GIL that the env loop needs
while it draws. This runs, in one process and alternately, ``collect`` with its bar drawn to a
terminal (one that writes to /dev/null) at rich's default of 10 redraws a second and at ours
(``pipeline.progress.REFRESH_PER_S``), and sums the CPU time of every redraw.

    python benchmarks/progress_cost.py [--episodes 10] [--rounds 4]

Last line: redraw_share_rich_default=<% of collect's wall time> redraw_share=<% with ours>
redraw_ms=<CPU per redraw> (lower is better; the env loop waits for every redraw).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

RICH_DEFAULT_PER_S = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10, help="expert laps per collect call")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import rich
    import rich.live

    import pipeline.progress as progress
    from pipeline.datasets.collect import CollectConfig, collect, env_and_policy

    spent = {"s": 0.0, "redraws": 0}
    redraw = rich.live.Live.refresh

    def timed_redraw(live) -> None:
        started = time.thread_time()
        redraw(live)
        spent["s"] += time.thread_time() - started
        spent["redraws"] += 1

    rich.live.Live.refresh = timed_redraw
    rich.reconfigure(file=open(os.devnull, "w"), force_terminal=True, width=100)
    ours = progress.REFRESH_PER_S
    shares: dict[int, list[float]] = {RICH_DEFAULT_PER_S: [], ours: []}
    per_redraw: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        env_and_policy(CollectConfig(out=tmp, policy="expert", max_steps=args.max_steps))
        for round_ in range(args.rounds):
            for rate in (RICH_DEFAULT_PER_S, ours) if round_ % 2 == 0 else (ours, RICH_DEFAULT_PER_S):
                progress.REFRESH_PER_S = rate
                spent.update(s=0.0, redraws=0)
                started = time.perf_counter()
                collect(CollectConfig(out=str(Path(tmp) / f"r{round_}-{rate}.zarr"), policy="expert",
                                      max_steps=args.max_steps, episodes=args.episodes), progress=True)
                wall = time.perf_counter() - started
                shares[rate].append(100 * spent["s"] / wall)
                per_redraw.append(1000 * spent["s"] / max(spent["redraws"], 1))
                print(f"round {round_}: {rate:2d} redraws/s: {spent['redraws']} redraws in {wall:.2f} s, "
                      f"{shares[rate][-1]:.2f}% of the wall time")
    progress.REFRESH_PER_S = ours
    print(f"redraw_share_rich_default={statistics.median(shares[RICH_DEFAULT_PER_S]):.2f}% "
          f"redraw_share={statistics.median(shares[ours]):.2f}% redraw_ms={statistics.median(per_redraw):.2f}")


if __name__ == "__main__":
    main()
