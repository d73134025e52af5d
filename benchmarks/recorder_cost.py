"""What recording costs the env loop itself: the raw loop against ``run_episode`` (the same loop
with an ``EpisodeRecorder``), CPU time per step, in one process.

``collect_throughput.py`` compares whole ``collect`` calls, so its figure also holds the writer's
start and last commit and the hand-over thread, and the box's noise moves it by several percent.
This isolates the recorder's share of the env loop: both loops drive the same seeds with the same
env and policy, alternately (raw first in even rounds, last in odd ones), and the ratio is the
median over rounds of recorded / raw CPU per step. Episodes are kept until 16 have piled up, as
collect's hand-over keeps them for a moment.

    python benchmarks/recorder_cost.py [--policy expert] [--rounds 16]

Last line: recording_vs_raw=<recorded / raw CPU per step> (1.000 would be free; on the 2-core AMD
EPYC, 2026-12-07, 5 runs each: 1.029-1.058 with expert laps, 1.025-1.060 with random episodes). The recorder's
own calls take ~8 us a step of an expert lap's ~340 (its ``add`` ~7, its ``finish`` ~1 spread over
the lap); the rest is likely the memory it keeps until the episode ends pushing the env's own out
of the caches (not measured directly). Issue 17's collect_vs_raw >= 0.97
needs this, the hand-over and the writer's fixed costs together under 3%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="expert", choices=("expert", "random"),
                        help="expert (laps of ~270 steps) or random (~15 steps)")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps-per-round", type=int, default=1000)
    args = parser.parse_args()
    if min(args.rounds, args.steps_per_round) < 1:
        parser.error("--rounds and --steps-per-round must be at least 1")

    from pipeline.datasets.collect import CollectConfig, env_and_policy, keep_freed_memory, run_episode

    keep_freed_memory()  # as collect's env loop runs
    config = CollectConfig(out="unused", policy=args.policy, max_steps=400 if args.policy == "expert" else 200)
    env, policy = env_and_policy(config)

    def raw(seed: int) -> int:
        policy.reset(seed)
        obs, info = env.reset(seed=seed)
        steps = 0
        while True:
            obs, _, terminated, truncated, info = env.step(policy.act(obs, info))
            steps += 1
            if terminated or truncated:
                return steps

    waiting = []

    def recorded(seed: int) -> int:
        if len(waiting) == 16:
            waiting.clear()
        waiting.append(run_episode(config, seed))
        return waiting[-1].length

    loops = {"raw": raw, "recorded": recorded}
    for loop in loops.values():  # untimed: the first episodes of a process pay for its warm-up
        loop(10**6)
    per_step = {name: [] for name in loops}
    seed = 0
    for r in range(args.rounds):
        first = seed
        for name in (("raw", "recorded") if r % 2 == 0 else ("recorded", "raw")):
            seed, steps, started = first, 0, time.process_time()
            while steps < args.steps_per_round:
                steps += loops[name](seed)
                seed += 1
            per_step[name].append((time.process_time() - started) / steps)
    ratios = [b / a for a, b in zip(per_step["raw"], per_step["recorded"])]
    print(f"{args.policy}: raw {1e6 * statistics.median(per_step['raw']):.1f} us/step, recorded "
          f"{1e6 * statistics.median(per_step['recorded']):.1f} us/step (CPU, medians of {args.rounds} rounds)")
    print(f"recording_vs_raw={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
