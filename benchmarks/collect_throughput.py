"""Recording overhead and storage size of `pipeline collect`.

Runs, in one process: the raw env (random policy, no recording) and then `collect` with the same
policy, episodes and seeds into a fresh store, and compares steps/s. Then measures stored bytes per
transition against the uint8 bytes an SB3 dict replay buffer keeps per transition
(obs + next_obs stacks: 2 x 4 x 84 x 84 = 56,448).

    python benchmarks/collect_throughput.py [--episodes 20] [--route racetrack]

Last line: collect_vs_raw=<ratio> bytes_per_transition=<n> sb3_layout_ratio=<ratio>
(targets: collect_vs_raw >= 0.95; uint8 bytes per transition <= 1/8 of SB3's before compression).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SB3_UINT8_BYTES_PER_TRANSITION = 2 * 4 * 84 * 84


def raw_steps_per_s(route: str, policy_name: str, episodes: int, max_steps: int) -> tuple[float, int]:
    from pipeline.envs import make_env
    from pipeline.policies import make_policy

    env = make_env(route, max_steps=max_steps)
    policy = make_policy(policy_name, env)
    steps, started = 0, time.perf_counter()
    for seed in range(episodes):
        policy.reset(seed)
        obs, info = env.reset(seed=seed)
        while True:
            obs, reward, terminated, truncated, info = env.step(policy.act(obs, info))
            steps += 1
            if terminated or truncated:
                break
    return steps / (time.perf_counter() - started), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--route", default="racetrack")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--policy", default="random", help="random (the issue's figure) or expert (long episodes)")
    parser.add_argument("--repeats", type=int, default=3, help="alternate raw/collect runs, keep the best of each")
    args = parser.parse_args()

    from pipeline.datasets.collect import CollectConfig, collect
    from pipeline.datasets.store import TransitionStore

    raw_best, collect_best = 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            raw, steps = raw_steps_per_s(args.route, args.policy, args.episodes, args.max_steps)
            out = str(Path(tmp) / f"bench{repeat}.zarr")
            config = CollectConfig(out=out, episodes=args.episodes, route=args.route, policy=args.policy,
                                   max_steps=args.max_steps)
            started = time.perf_counter()
            summary = collect(config, progress=False)
            recorded = summary["steps"] / (time.perf_counter() - started)
            assert summary["steps"] == steps, "collect and the raw loop must drive the same episodes"
            print(f"repeat {repeat}: raw {raw:8.1f} steps/s   collect {recorded:8.1f} steps/s   ({steps} steps)")
            raw_best, collect_best = max(raw_best, raw), max(collect_best, recorded)
        store = TransitionStore(out)
        n = store.num_transitions
        uint8_per_transition = store.num_frames * 84 * 84 / n
        stored_per_transition = store.nbytes_stored() / n
    print(f"uint8 frame bytes per transition before compression: {uint8_per_transition:.0f} "
          f"({uint8_per_transition / SB3_UINT8_BYTES_PER_TRANSITION:.3f} of SB3's {SB3_UINT8_BYTES_PER_TRANSITION})")
    print(f"stored bytes per transition after compression (all arrays): {stored_per_transition:.0f}")
    print(f"collect_vs_raw={collect_best / raw_best:.3f} bytes_per_transition={stored_per_transition:.0f} "
          f"sb3_layout_ratio={uint8_per_transition / SB3_UINT8_BYTES_PER_TRANSITION:.4f}")


if __name__ == "__main__":
    main()
