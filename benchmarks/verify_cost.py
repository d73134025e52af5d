"""What checking every chunk's sha256 on read costs the replay loader.

Loads a store into a :class:`~pipeline.datasets.replay.DictReplayBuffer` (offline only, the
whole store in memory: the way ``pipeline train`` loads a dataset) with verification on and off,
interleaving repeats so both see the same machine load, and reports the median load times.
Two stores:

- ``racetrack``: expert laps recorded by ``pipeline collect``, written ``--copies`` times (real
  frames; zstd shrinks them ~18x, so hashing the stored bytes is cheap next to decoding);
- ``noise``: synthetic uniform-noise frames, which do not compress: the stored bytes are as big
  as the decoded ones, the worst case for hashing.

    python benchmarks/verify_cost.py [--episodes 8] [--steps 300] [--copies 8] [--repeats 5]

Wall time is what a user waits; CPU time (all threads of the process) is the cost itself, and
is steadier on a shared machine. Last line: ``verify_overhead_<store>_<wall|cpu>=<(t_verify -
t_plain) / t_plain>`` (target: < 0.10 for recorded data). Figures also go to benchmarks/results/verify_cost.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.datasets.chunks import checksum
from pipeline.datasets.episode import Episode
from pipeline.datasets.replay import DictReplayBuffer
from pipeline.datasets.store import EpisodeWriter, TransitionStore
from pipeline.envs.spec import ActionSpec, ObsSpec

RESULTS = Path(__file__).parent / "results" / "verify_cost.txt"


def recorded_store(path: Path, episodes: int, steps: int, copies: int) -> None:
    """``episodes`` recorded expert laps, written ``copies`` times over (recording is slow)."""
    laps = path.with_name("laps.zarr")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "collect", "--episodes", str(episodes),
                    "--max-steps", str(steps), "--out", str(laps), "--quiet"], check=True)
    recorded = TransitionStore(str(laps))
    with EpisodeWriter(str(path), recorded.obs_spec, recorded.action_spec) as writer:
        for _ in range(copies):
            writer.append_many([recorded.episode(i) for i in range(recorded.num_episodes)])


def noise_store(path: Path, episodes: int, steps: int, copies: int) -> None:
    rng = np.random.default_rng(0)
    spec = ObsSpec()
    with EpisodeWriter(str(path), spec, ActionSpec()) as writer:
        for i in range(episodes * copies):
            writer.append(Episode(
                frames=rng.integers(0, 256, (spec.frame_stack + steps, 84, 84), dtype=np.uint8),
                vector=rng.normal(size=(steps + 1, spec.vector_dim)).astype(np.float32),
                action=rng.uniform(-1, 1, (steps, 2)).astype(np.float32),
                reward=rng.normal(size=steps).astype(np.float32),
                terminated=np.zeros(steps, bool), truncated=np.eye(1, steps, steps - 1, dtype=bool)[0],
                route="racetrack", seed=i))


def load_seconds(url: str, verify: bool) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) to open ``url`` and load it."""
    wall, cpu = time.perf_counter(), time.process_time()
    buffer = DictReplayBuffer(TransitionStore(url, verify=verify), online_capacity=0, online_mix=0.0,
                              prefetch=0, refresh_duty=0.0, device="cpu", progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    buffer.close()
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--copies", type=int, default=8, help="Times the recorded episodes are written.")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lines = [f"# python benchmarks/verify_cost.py --episodes {args.episodes} --steps {args.steps} "
             f"--copies {args.copies} --repeats {args.repeats}"]
    overheads = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("racetrack", recorded_store), ("noise", noise_store)):
            url = str(Path(tmp) / f"{name}.zarr")
            make(Path(url), args.episodes, args.steps, args.copies)
            store = TransitionStore(url)
            times = {True: [], False: []}
            load_seconds(url, True)  # warm the page cache and imports
            for _ in range(args.repeats):
                for verify in (True, False):
                    times[verify].append(load_seconds(url, verify))
            chunks = [f.read_bytes() for f in Path(url).rglob("c/**/*") if f.is_file()]
            started = time.perf_counter()
            for data in chunks:
                checksum(data)
            hashing = time.perf_counter() - started
            lines.append(f"{name}: {store.num_transitions} transitions, {store.num_frames} frames, "
                         f"{len(chunks)} chunks of {sum(map(len, chunks)) / 2**20:.1f} MiB; hashing them "
                         f"all in a loop takes {hashing * 1e3:.1f} ms")
            for j, clock in enumerate(("wall", "cpu")):
                on = statistics.median(t[j] for t in times[True])
                off = statistics.median(t[j] for t in times[False])
                overheads[f"{name}_{clock}"] = (on - off) / off
                lines.append(f"  {clock:4s} load {off * 1e3:6.1f} ms plain, {on * 1e3:6.1f} ms verified "
                             f"(medians of {args.repeats}): {overheads[f'{name}_{clock}']:+.1%}")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    lines.append(f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
                 f"load average {os.getloadavg()[0]:.1f} (a shared machine)")
    lines.append(" ".join(f"verify_overhead_{name}={value:.3f}" for name, value in overheads.items()))
    print("\n".join(lines))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
