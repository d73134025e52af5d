"""Learner speed: our end-to-end TD3 update loop (replay sampling included) vs SB3's TD3.

Both learn from the same transitions at the same batch size (default 256) on the same device:
- ours: ``DictReplayBuffer`` over a dataset store (prefetch thread on) feeding ``TD3Agent.update``;
- SB3: ``TD3("MultiInputPolicy")`` with its in-RAM ``DictReplayBuffer``, ``model.train(gradient_steps)``.

    python benchmarks/learner_throughput.py [--device auto] [--updates 30] [--rounds 3]
                                            [--batch-size 64 256] [--compile] [--bf16] [--profile]

Each batch size sets up both learners once, then times ``--rounds`` stretches of ``--updates``
updates, ours and SB3's alternating, and compares the summed times.

Needs the `bench` extra (stable-baselines3). One line per batch size:
batch=<B> updates_per_s=<n> sb3_ratio=<ours / SB3 updates per s> replay_wait=<fraction of time
waiting for data> gflop_s=<achieved: FLOPs of one update (torch's FlopCounterMode) x updates/s>
sb3_gflop_s=<the same for SB3> flop_ratio=<SB3's FLOPs per update / ours>
efficiency_ratio=<gflop_s / sb3_gflop_s> bf16_cnn=<whether our CNN ran in bf16>;
sb3_ratio = flop_ratio x efficiency_ratio. Our CNN runs as ``pipeline train`` runs it: its
convolutions in bf16 where the device has native bf16 (CUDA, a CPU with AVX512-BF16/AMX), else
fp32; ``--no-bf16`` measures fp32 there.

``--profile`` also prints torch.profiler's table of one timed stretch of our updates (self CPU/CUDA
time per op), so a change can be aimed at where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
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


class OurLearner:
    """Our update loop, set up once: ``run(n)`` times ``n`` updates (seconds, replay-wait seconds)."""

    def __init__(self, store, args, batch_size: int):
        from pipeline.datasets.replay import DictReplayBuffer
        from pipeline.train.td3 import TD3Agent, TD3Config

        self.agent = TD3Agent(store.obs_spec, config=TD3Config(device=args.device, compile=args.compile,
                                                               amp=args.bf16))
        self.replay = DictReplayBuffer(offline=store, obs_spec=store.obs_spec, online_mix=0.0, device=args.device,
                                       prefetch=True, memory_budget=2**33)
        self.batch_size = batch_size
        self.update(args.warmup)
        # two updates: one with the actor step (policy_delay 2), one without
        self.flops = count_flops(lambda: self.update(2)) / 2

    def update(self, n: int):
        # metrics of the last update only, as SB3's train(gradient_steps=n) logs once per call and
        # pipeline train once per --log-every
        for i in range(n):
            self.agent.update(self.replay.sample(self.batch_size), metrics=i == n - 1)

    def run(self, n: int, profiler=None) -> tuple[float, float]:
        _sync()
        with profiler or contextlib.nullcontext():
            wait0, started = self.replay.wait_seconds, time.perf_counter()
            self.update(n)
            _sync()
        return time.perf_counter() - started, self.replay.wait_seconds - wait0

    def close(self):
        self.replay.close()


class SB3Learner:
    """SB3's TD3 (``MultiInputPolicy``) on the same transitions: ``run(n)`` times ``n`` gradient steps."""

    def __init__(self, store, args, batch_size: int):
        import gymnasium as gym
        from stable_baselines3 import TD3
        from stable_baselines3.common.logger import configure

        class _SpecEnv(gym.Env):  # SB3 needs an env for spaces only; we never step it
            observation_space = store.obs_spec.observation_space()
            action_space = store.action_spec.action_space()

        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
        self.model = TD3("MultiInputPolicy", _SpecEnv(), buffer_size=store.num_transitions, batch_size=batch_size,
                         learning_starts=0, device=device, verbose=0)
        self.model.set_logger(configure(None, []))  # train() logs; learn() would normally set this up
        buffer = self.model.replay_buffer
        for i in range(store.num_transitions):
            t = store.transition(i)
            buffer.add({k: v[None] for k, v in t["obs"].items()}, {k: v[None] for k, v in t["next_obs"].items()},
                       t["action"][None], np.array([t["reward"]]), np.array([t["terminated"]]), [{}])
        self.batch_size = batch_size
        self.update(args.warmup)
        self.flops = count_flops(lambda: self.update(2)) / 2  # counted the same way as ours

    def update(self, n: int):
        self.model.train(gradient_steps=n, batch_size=self.batch_size)

    def run(self, n: int) -> float:
        _sync()
        started = time.perf_counter()
        self.update(n)
        _sync()
        return time.perf_counter() - started


def count_flops(work) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        work()
    return counter.get_total_flops()


def _profiler(args):
    if not args.profile:
        return None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (torch.cuda.is_available() and args.device != "cpu")
    return profile(activities=activities)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(store, args, batch_size: int) -> str:
    """Alternate timed stretches of ours and SB3's (``--rounds`` of each), so that a machine whose
    speed drifts from second to second slows both alike; the ratio is of the summed times."""
    ours = OurLearner(store, args, batch_size)
    try:
        sb3 = SB3Learner(store, args, batch_size)
        our_time = our_wait = sb3_time = 0.0
        for round_ in range(args.rounds):
            profiler = _profiler(args) if round_ == 0 else None
            seconds, wait = ours.run(args.updates, profiler)
            if profiler is not None:
                sort = "self_cuda_time_total" if torch.cuda.is_available() and args.device != "cpu" else "self_cpu_time_total"
                print(profiler.key_averages().table(sort_by=sort, row_limit=15))
            sb3_seconds = sb3.run(args.updates)
            print(f"round {round_}: ours {args.updates / seconds:.2f} updates/s, SB3 {args.updates / sb3_seconds:.2f} "
                  f"updates/s (x{sb3_seconds / seconds:.2f})")
            our_time, our_wait, sb3_time = our_time + seconds, our_wait + wait, sb3_time + sb3_seconds
    finally:
        ours.close()
    n = args.updates * args.rounds
    our_rate, sb3_rate = n / our_time, n / sb3_time
    bf16 = ours.agent.bf16_cnn
    print(f"ours: {our_rate:.2f} updates/s at batch {batch_size} on {_device_name(args)} (compile={args.compile}, "
          f"bf16 CNN={bf16}), replay wait {our_wait / our_time:.1%}, {ours.flops / 1e9:.2f} GFLOP per update")
    print(f"SB3 TD3 MultiInputPolicy: {sb3_rate:.2f} updates/s at batch {batch_size}, {sb3.flops / 1e9:.2f} GFLOP per update")
    # sb3_ratio = flop_ratio (how much less work an update of ours is) x efficiency_ratio
    # (our FLOP/s over SB3's on the same kernels): says which of the two a change moved.
    return (f"batch={batch_size} updates_per_s={our_rate:.2f} sb3_ratio={our_rate / sb3_rate:.2f} "
            f"replay_wait={our_wait / our_time:.3f} gflop_s={ours.flops * our_rate / 1e9:.1f} "
            f"sb3_gflop_s={sb3.flops * sb3_rate / 1e9:.1f} flop_ratio={sb3.flops / ours.flops:.2f} "
            f"efficiency_ratio={ours.flops * our_rate / (sb3.flops * sb3_rate):.2f} bf16_cnn={bf16}")


def _device_name(args) -> str:
    if torch.cuda.is_available() and args.device != "cpu":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--updates", type=int, default=30, help="updates per timed stretch")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed stretches of ours and SB3's")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="our CNN's convolutions in bf16 (default as pipeline train: where native; --no-bf16: fp32)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's op table for ours")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(str(Path(tmp) / "bench.zarr"), args.episodes, args.steps)
        lines = [compare(store, args, batch_size) for batch_size in args.batch_size]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
