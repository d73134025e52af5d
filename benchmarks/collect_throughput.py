"""Recording overhead and storage size of `pipeline collect`.

Runs, in one process: the raw env (random policy, no recording) and then `collect` with the same
policy, episodes and seeds into a fresh store, and compares steps/s. Then measures stored bytes per
transition against the uint8 bytes an SB3 dict replay buffer keeps per transition
(obs + next_obs stacks: 2 x 4 x 84 x 84 = 56,448).

    python benchmarks/collect_throughput.py [--episodes 20] [--route racetrack]

Also, in the same process, the raw env's steps/s with today's car-mounted camera against the
world-aligned top-down camera it replaced (``WorldAlignedCamera`` below, kept here only as that
baseline: the track drawn once by highway-env, a window blitted per frame).

Each repeat runs raw and collect back to back (their order alternating, so drift in the machine's
load hits both alike); ``collect_vs_raw`` is the median of the repeats' ratios (the best-of
figures are printed beside it). ``collect_cpu_vs_raw`` compares the CPU time this process (the env
loop's) spends per step: raw's over collect's, with the writer process's own CPU left out. It says
how much store work is left on the env loop, and the machine's noise barely moves it.
``driving_vs_raw`` is the env loop's own rate while recording (collect's ``driving_s``: from the
store being opened, which for a new store the writer creates while the env loop drives, to the last
episode handed over) over raw's: ``collect_vs_raw`` less the fixed costs of the writer's start and
of waiting for the last commit and the trim (~50-70 ms in all since 2026-12-07), which weigh 2-5%
in a run of 1-3 s and nothing in a collection of minutes.

Last line: collect_vs_raw=<ratio> driving_vs_raw=<ratio> collect_cpu_vs_raw=<ratio> bytes_per_transition=<n>
sb3_layout_ratio=<ratio> raw_vs_old_camera=<ratio> (targets: collect_vs_raw >= 0.97; uint8 bytes
per transition <= 1/8 of SB3's before compression; raw_vs_old_camera >= 0.8).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SB3_UINT8_BYTES_PER_TRANSITION = 2 * 4 * 84 * 84


class WorldAlignedCamera:
    """The embedded camera before the car-mounted view (pipeline 0.1.0 up to format 1): a
    world-aligned top-down window centred on the ego, 1.6 px/m, drawn by highway-env's graphics."""

    def __init__(self, road, size: int = 84, pixels_per_m: float = 1.6):
        import numpy as np
        import pygame
        from highway_env.road.graphics import RoadGraphics, WorldSurface

        corners = np.asarray([lane.position(s, lat) for frm in road.network.graph.values()
                              for lanes in frm.values() for lane in lanes
                              for s in np.linspace(0.0, lane.length, 64) for lat in (-5.0, 5.0)])
        lo, hi = corners.min(0) - size / pixels_per_m, corners.max(0) + size / pixels_per_m
        width, height = (int(v) for v in np.ceil((hi - lo) * pixels_per_m) + 1)
        self.track = WorldSurface((width, height), 0, pygame.Surface((width, height)))
        self.track.scaling, self.track.origin = pixels_per_m, lo
        RoadGraphics.display(road, self.track)
        self.view = WorldSurface((size, size), 0, pygame.Surface((size, size)))
        self.view.scaling = pixels_per_m
        self.road = road

    def render(self, ego, vehicles):
        import numpy as np
        import pygame
        from highway_env.vehicle.graphics import VehicleGraphics

        view = self.view
        view.move_display_window_to(ego.position)
        view.fill(view.GREY)
        dx, dy = self.track.pos2pix(*view.origin)
        view.blit(self.track, (-dx, -dy))
        for vehicle in vehicles:
            VehicleGraphics.display(vehicle, view, offscreen=True)
        gray = np.tensordot(pygame.surfarray.array3d(view), [0.2989, 0.5870, 0.1140], axes=([2], [0]))
        return np.ascontiguousarray(gray.clip(0, 255).astype(np.uint8).T)


def raw_steps_per_s(route: str, policy_name: str, episodes: int, max_steps: int,
                    old_camera: bool = False) -> tuple[float, int, float]:
    """(steps/s, steps, this process's CPU seconds) of the env loop alone."""
    from pipeline.envs import make_env
    from pipeline.policies import make_policy

    env = make_env(route, max_steps=max_steps)
    if old_camera:  # build the env's camera at reset as usual, then swap in the baseline
        env.reset(seed=0)
        env.unwrapped._camera = WorldAlignedCamera(env.unwrapped._sim.road)
    policy = make_policy(policy_name, env)
    steps, started, cpu = 0, time.perf_counter(), time.process_time()
    for seed in range(episodes):
        policy.reset(seed)
        obs, info = env.reset(seed=seed)
        while True:
            obs, reward, terminated, truncated, info = env.step(policy.act(obs, info))
            steps += 1
            if terminated or truncated:
                break
    return steps / (time.perf_counter() - started), steps, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--route", default="racetrack")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--policy", default="random", help="random (the issue's figure) or expert (long episodes)")
    parser.add_argument("--repeats", type=int, default=5, help="raw/collect pairs (median of their ratios)")
    args = parser.parse_args()

    import statistics

    from pipeline.datasets.collect import CollectConfig, collect, env_and_policy
    from pipeline.datasets.store import TransitionStore

    ratios, driving_ratios, camera_ratios, best = [], [], [], {"raw": 0.0, "collect": 0.0, "old": 0.0}
    cpu = {"raw": 0.0, "collect": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        # collect builds its env and policy once per process; build them before any clock starts,
        # as raw_steps_per_s builds its own, so that the first repeat does not time their start-up
        env_and_policy(CollectConfig(out=tmp, route=args.route, policy=args.policy, max_steps=args.max_steps))
        for repeat in range(args.repeats):
            old, _, _ = raw_steps_per_s(args.route, args.policy, args.episodes, args.max_steps, old_camera=True)
            config = CollectConfig(out=str(Path(tmp) / f"bench{repeat}.zarr"), episodes=args.episodes,
                                   route=args.route, policy=args.policy, max_steps=args.max_steps)
            for which in (("raw", "collect") if repeat % 2 == 0 else ("collect", "raw")):
                if which == "raw":
                    raw, steps, raw_cpu = raw_steps_per_s(args.route, args.policy, args.episodes, args.max_steps)
                    continue
                started, cpu_started = time.perf_counter(), time.process_time()
                summary = collect(config, progress=False)
                recorded = summary["steps"] / (time.perf_counter() - started)
                collect_cpu = time.process_time() - cpu_started
            assert summary["steps"] == steps, "collect and the raw loop must drive the same episodes"
            ratios.append(recorded / raw)
            driving_ratios.append(summary["steps"] / summary["driving_s"] / raw)
            camera_ratios.append(raw / old)
            cpu["raw"] += raw_cpu
            cpu["collect"] += collect_cpu
            best = {"raw": max(best["raw"], raw), "collect": max(best["collect"], recorded),
                    "old": max(best["old"], old)}
            print(f"repeat {repeat}: raw {raw:8.1f} steps/s   collect {recorded:8.1f} steps/s (x{recorded / raw:.3f}; driving x{driving_ratios[-1]:.3f})   "
                  f"raw with the old camera {old:8.1f} steps/s   ({steps} steps; env process CPU: raw "
                  f"{1000 * raw_cpu / steps:.2f} ms/step, collect {1000 * collect_cpu / steps:.2f} ms/step)")
        store = TransitionStore(config.out)
        n = store.num_transitions
        uint8_per_transition = store.num_frames * 84 * 84 / n
        stored_per_transition = store.nbytes_stored() / n
    print(f"uint8 frame bytes per transition before compression: {uint8_per_transition:.0f} "
          f"({uint8_per_transition / SB3_UINT8_BYTES_PER_TRANSITION:.3f} of SB3's {SB3_UINT8_BYTES_PER_TRANSITION})")
    print(f"stored bytes per transition after compression (all arrays): {stored_per_transition:.0f}")
    print(f"best of {args.repeats}: collect {best['collect']:.1f} / raw {best['raw']:.1f} steps/s = "
          f"{best['collect'] / best['raw']:.3f}")
    print(f"collect_vs_raw={statistics.median(ratios):.3f} driving_vs_raw={statistics.median(driving_ratios):.3f} "
          f"collect_cpu_vs_raw={cpu['raw'] / cpu['collect']:.3f} "
          f"bytes_per_transition={stored_per_transition:.0f} "
          f"sb3_layout_ratio={uint8_per_transition / SB3_UINT8_BYTES_PER_TRANSITION:.4f} "
          f"raw_vs_old_camera={statistics.median(camera_ratios):.3f}")


if __name__ == "__main__":
    main()
