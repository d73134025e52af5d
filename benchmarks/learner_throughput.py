"""Learner speed: our end-to-end TD3 update loop (replay sampling included) vs SB3's TD3.

Both learn from the same transitions at the same batch size (default 256) on the same device:
- ours: ``DictReplayBuffer`` over a dataset store (prefetch thread on) feeding ``TD3Agent.update``;
- SB3: ``TD3("MultiInputPolicy")`` with its in-RAM ``DictReplayBuffer``, ``model.train(gradient_steps)``.

    python benchmarks/learner_throughput.py [--device auto] [--updates 30] [--batch-size 64 256]
                                            [--compile] [--no-amp] [--profile]

Needs the `bench` extra (stable-baselines3). One line per batch size:
batch=<B> updates_per_s=<n> sb3_ratio=<ours / SB3 updates per s> replay_wait=<fraction of time
waiting for data> gflop_s=<achieved: FLOPs of one update (torch's FlopCounterMode) x updates/s>
sb3_gflop_s=<the same for SB3> flop_ratio=<SB3's FLOPs per update / ours>
efficiency_ratio=<gflop_s / sb3_gflop_s>; sb3_ratio = flop_ratio x efficiency_ratio.

``--profile`` also prints torch.profiler's table of one timed stretch of our updates (self CPU/CUDA
time per op), so a change can be aimed at where the time goes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_store(path: str, episodes: int, steps: int, seed: int = 0):
    """A store of random frames and vectors, shaped like real data (frames compress poorly: worst case)."""
    from pipeline.datasets.episode import Episode
    from pipeline.datasets.store import EpisodeWriter, TransitionStore
    from pipeline.envs.spec import ObsSpec

    rng = np.random.default_rng(seed)
    spec = ObsSpec()
    with EpisodeWriter(path, spec, meta={"policy": "synthetic"}) as writer:
        for e in range(episodes):
            writer.append(Episode(
                frames=rng.integers(0, 256, (steps + 4, 84, 84), dtype=np.uint8),
                vector=rng.normal(size=(steps + 1, spec.vector_dim)).astype(np.float32),
                action=rng.uniform(-1, 1, (steps, 2)).astype(np.float32),
                reward=rng.normal(size=steps).astype(np.float32),
                terminated=np.zeros(steps, bool), truncated=np.eye(1, steps, steps - 1, dtype=bool)[0],
                route="racetrack", seed=e, termination="timeout"))
    return TransitionStore(path)


def ours(store, args, batch_size: int) -> tuple[float, float, float]:
    """Our updates/s, the fraction of it spent waiting for replay, and FLOPs per update."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.datasets.replay import DictReplayBuffer
    from pipeline.train.td3 import TD3Agent, TD3Config

    config = TD3Config(device=args.device, compile=args.compile, amp=not args.no_amp)
    agent = TD3Agent(store.obs_spec, config=config)
    with DictReplayBuffer(offline=store, obs_spec=store.obs_spec, online_mix=0.0, device=args.device,
                          prefetch=True, memory_budget=2**33) as replay:
        for _ in range(args.warmup):
            agent.update(replay.sample(batch_size))
        counter = FlopCounterMode(display=False)
        with counter:  # two updates: one with the actor step (policy_delay 2), one without
            agent.update(replay.sample(batch_size))
            agent.update(replay.sample(batch_size))
        flops = counter.get_total_flops() / 2
        _sync()
        profiler = _profiler(args)
        with profiler:
            wait0, started = replay.wait_seconds, time.perf_counter()
            for _ in range(args.updates):
                agent.update(replay.sample(batch_size))
            _sync()
            elapsed = time.perf_counter() - started
        if args.profile:
            sort = "self_cuda_time_total" if torch.cuda.is_available() and args.device != "cpu" else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=sort, row_limit=15))
        return args.updates / elapsed, (replay.wait_seconds - wait0) / elapsed, flops


def _profiler(args):
    import contextlib

    if not args.profile:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (torch.cuda.is_available() and args.device != "cpu")
    return profile(activities=activities)


def sb3(store, args, batch_size: int) -> tuple[float, float]:
    """SB3's updates/s and FLOPs per update (counted the same way as ours)."""
    import gymnasium as gym
    from torch.utils.flop_counter import FlopCounterMode

    from stable_baselines3 import TD3
    from stable_baselines3.common.logger import configure

    class _SpecEnv(gym.Env):  # SB3 needs an env for spaces only; we never step it
        observation_space = store.obs_spec.observation_space()
        action_space = store.action_spec.action_space()

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    model = TD3("MultiInputPolicy", _SpecEnv(), buffer_size=store.num_transitions, batch_size=batch_size,
                learning_starts=0, device=device, verbose=0)
    model.set_logger(configure(None, []))  # train() logs; learn() would normally set this up
    buffer = model.replay_buffer
    for i in range(store.num_transitions):
        t = store.transition(i)
        buffer.add({k: v[None] for k, v in t["obs"].items()}, {k: v[None] for k, v in t["next_obs"].items()},
                   t["action"][None], np.array([t["reward"]]), np.array([t["terminated"]]), [{}])
    model.train(gradient_steps=args.warmup, batch_size=batch_size)
    counter = FlopCounterMode(display=False)
    with counter:  # two gradient steps: one with the actor step (policy_delay 2), one without
        model.train(gradient_steps=2, batch_size=batch_size)
    flops = counter.get_total_flops() / 2
    _sync()
    started = time.perf_counter()
    model.train(gradient_steps=args.updates, batch_size=batch_size)
    _sync()
    return args.updates / (time.perf_counter() - started), flops


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's op table for ours")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU ({torch.get_num_threads()} threads)"
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(str(Path(tmp) / "bench.zarr"), args.episodes, args.steps)
        for batch_size in args.batch_size:
            our_rate, wait, flops = ours(store, args, batch_size)
            print(f"ours: {our_rate:.2f} updates/s at batch {batch_size} on {device} "
                  f"(compile={args.compile}, amp={not args.no_amp}), replay wait {wait:.1%}, "
                  f"{flops / 1e9:.2f} GFLOP per update")
            sb3_rate, sb3_flops = sb3(store, args, batch_size)
            print(f"SB3 TD3 MultiInputPolicy: {sb3_rate:.2f} updates/s at batch {batch_size}, "
                  f"{sb3_flops / 1e9:.2f} GFLOP per update")
            # sb3_ratio = flop_ratio (how much less work an update of ours is) x efficiency_ratio
            # (our FLOP/s over SB3's on the same kernels): says which of the two a change moved.
            lines.append(f"batch={batch_size} updates_per_s={our_rate:.2f} sb3_ratio={our_rate / sb3_rate:.2f} "
                         f"replay_wait={wait:.3f} gflop_s={flops * our_rate / 1e9:.1f} "
                         f"sb3_gflop_s={sb3_flops * sb3_rate / 1e9:.1f} flop_ratio={sb3_flops / flops:.2f} "
                         f"efficiency_ratio={flops * our_rate / (sb3_flops * sb3_rate):.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
