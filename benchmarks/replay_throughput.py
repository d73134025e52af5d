"""Replay sampling throughput and RAM: our DictReplayBuffer against stable-baselines3's.

In one process: writes a synthetic store with EpisodeWriter (random 84x84 frames, the default
23-field vector), fills SB3's in-RAM DictReplayBuffer with the same transitions, and samples
batches of 256 from each, the same number of batches per side, interleaving repeats so both see
the same machine load:

- ours, store loaded in memory, prefetch thread on (the default 2 batches ahead) and, for
  reference, off;
- ours in reservoir mode: a memory budget of 1/4 of what the store needs, refresh thread running;
- SB3 ``DictReplayBuffer`` (obs and next_obs stacks stored per transition).

Resident bytes are the stored arrays' nbytes. Needs the ``bench`` extra (stable-baselines3).

    python benchmarks/replay_throughput.py [--episodes 200] [--steps 200] [--batches 200] [--device cpu]

``--device cuda`` (issue #17's GPU row) delivers every batch on the GPU: ours from pinned host
frames by its prefetch thread, and, as ``ours_frames_on_device``, with the frames held on the GPU
(``frames_on_device=True``); SB3 moves each batch there as its ``sample`` does. The clock stops
after the GPU has finished each side's last batch.

Last line: sample_ratio_vs_sb3=<ours/sb3 samples per s> ram_ratio_vs_sb3=<our bytes / sb3 bytes>
reservoir_ratio_vs_sb3=<reservoir samples per s / sb3>
(targets: >= 2.0, <= 0.125, >= 1.0; the frames alone are 7056 * (T + 4) / T bytes per transition,
0.127 of SB3's 56,652 for T = 200, so the RAM target is out of reach of any bit-exact layout
of these episodes). Figures also go to benchmarks/results/replay_throughput.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.datasets.episode import Episode
from pipeline.datasets.replay import DictReplayBuffer
from pipeline.datasets.store import EpisodeWriter
from pipeline.envs.spec import ActionSpec, ObsSpec

RESULTS = Path(__file__).resolve().parent / "results" / "replay_throughput.txt"


def synthetic_episodes(episodes: int, steps: int, spec: ObsSpec, seed: int = 0):
    rng = np.random.default_rng(seed)
    k, s, d = spec.frame_stack, spec.image_size, spec.vector_dim
    for i in range(episodes):
        terminated = np.zeros(steps, bool)
        truncated = np.zeros(steps, bool)
        (terminated if i % 2 else truncated)[-1] = True
        yield Episode(
            frames=rng.integers(0, 256, (k + steps, s, s), dtype=np.uint8),
            vector=rng.standard_normal((steps + 1, d)).astype(np.float32),
            action=rng.uniform(-1, 1, (steps, 2)).astype(np.float32),
            reward=rng.standard_normal(steps).astype(np.float32),
            terminated=terminated,
            truncated=truncated,
            route="synthetic",
            seed=i,
            termination="collision" if i % 2 else "timeout",
        )


def write_store(url: str, episodes: int, steps: int, spec: ObsSpec) -> None:
    with EpisodeWriter(url, spec, meta={"policy": "synthetic"}) as writer:
        for episode in synthetic_episodes(episodes, steps, spec):
            writer.append(episode)


def sb3_buffer(episodes: int, steps: int, spec: ObsSpec, device: str = "cpu"):
    from stable_baselines3.common.buffers import DictReplayBuffer as SB3DictReplayBuffer

    buffer = SB3DictReplayBuffer(
        episodes * steps, spec.observation_space(), ActionSpec().action_space(), device=device, n_envs=1
    )
    for ep in synthetic_episodes(episodes, steps, spec):
        for t in range(ep.length):
            obs, nxt = ep.observation(t), ep.observation(t + 1)
            buffer.add(
                {k: v[None] for k, v in obs.items()}, {k: v[None] for k, v in nxt.items()},
                ep.action[t][None], ep.reward[t : t + 1], np.array([ep.terminated[t] or ep.truncated[t]]),
                [{"TimeLimit.truncated": bool(ep.truncated[t])}],
            )
    arrays = [*buffer.observations.values(), *buffer.next_observations.values(),
              buffer.actions, buffer.rewards, buffer.dones, buffer.timeouts]
    return buffer, sum(a.nbytes for a in arrays)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU only)"
    load = ", load average %.1f (shared machine)" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{os.cpu_count()} cores, {model}, {gpu}, torch {torch.__version__}, numpy {np.__version__}{load}"


def samples_per_s(sample, batch: int, batches: int) -> float:
    for _ in range(5):  # warm-up: first batches, prefetch queue
        sample(batch)
    _sync()
    started = time.perf_counter()
    for _ in range(batches):
        sample(batch)
    _sync()  # batches on a GPU count once they are there
    return batch * batches / (time.perf_counter() - started)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where batches are delivered")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = ObsSpec()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "bench.zarr")
        started = time.perf_counter()
        write_store(url, args.episodes, args.steps, spec)
        n = args.episodes * args.steps
        say(f"store: {args.episodes} episodes x {args.steps} steps = {n} transitions, "
            f"written in {time.perf_counter() - started:.1f} s")
        sb3, sb3_bytes = sb3_buffer(args.episodes, args.steps, spec, args.device)
        memory = DictReplayBuffer(url, online_capacity=0, memory_budget="64GiB", device=args.device)
        plain = DictReplayBuffer(url, online_capacity=0, memory_budget="64GiB", device=args.device, prefetch=0)
        budget = memory.nbytes // 4
        assert memory.offline_source.mode == "memory"

        reservoir = {"refreshes": 0, "waited": 0.0}

        def reservoir_rate() -> float:
            # Built and closed per measurement, so its refresh thread takes no CPU from the others.
            with DictReplayBuffer(url, online_capacity=0, memory_budget=budget, device=args.device) as buffer:
                rate = samples_per_s(buffer.sample, args.batch, args.batches)
                source = buffer.offline_source
                reservoir.update(source=source, nbytes=buffer.nbytes, refreshes=reservoir["refreshes"]
                                 + source.refreshes, waited=reservoir["waited"] + buffer.wait_seconds)
            return rate

        contenders = {
            "sb3": lambda: samples_per_s(sb3.sample, args.batch, args.batches),
            "ours": lambda: samples_per_s(memory.sample, args.batch, args.batches),
            "ours_no_prefetch": lambda: samples_per_s(plain.sample, args.batch, args.batches),
            "reservoir": reservoir_rate,
        }
        on_device = None
        if torch.device(args.device).type == "cuda":
            on_device = DictReplayBuffer(url, online_capacity=0, memory_budget="64GiB", device=args.device,
                                         frames_on_device=True)
            contenders["ours_frames_on_device"] = lambda: samples_per_s(on_device.sample, args.batch, args.batches)
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):  # interleaved: every contender sees the same machine load
            for name, measure in contenders.items():
                rates[name].append(measure())
        source = reservoir["source"]
        assert source.mode == "reservoir"
        say(f"reservoir: budget {budget} bytes = 1/4 of the store, {source.n_slots} slots of "
            f"{source.segment_frames} frames, {reservoir['nbytes']} bytes resident, "
            f"{reservoir['refreshes']} refreshes while sampling ({source.segments_per_cycle} per cycle), "
            f"sample() waited {reservoir['waited']:.2f} s")
        median = {name: statistics.median(r) for name, r in rates.items()}
        for name, r in rates.items():
            runs = ", ".join(f"{x:,.0f}" for x in r)
            say(f"{name:>17}: {median[name]:>9,.0f} samples/s (median of {runs})")
        say(f"resident bytes per transition: ours {memory.nbytes / n:,.0f}, sb3 {sb3_bytes / n:,.0f}, "
            f"reservoir {reservoir['nbytes'] / n:,.0f}")
        # Frames alone, (T + K) / T per transition, bound ram_ratio from below whatever else is kept.
        floor = (args.steps + spec.frame_stack) / args.steps * spec.image_size**2 / (sb3_bytes / n)
        say(f"ram floor of the frame-deduplicated layout (frames only, {args.steps}-step episodes): "
            f"{floor:.4f} of sb3's bytes")
        memory.close()
        plain.close()
        if on_device is not None:
            on_device.close()

    say(f"machine: {machine()}; batches delivered on {args.device}")
    say(f"sample_ratio_vs_sb3={median['ours'] / median['sb3']:.2f} "
        f"ram_ratio_vs_sb3={memory.nbytes / sb3_bytes:.4f} "
        f"reservoir_ratio_vs_sb3={median['reservoir'] / median['sb3']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
