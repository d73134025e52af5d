"""Can a CNN learn to drive from these pixels? Behaviour cloning, CNN trained vs frozen.

A supervised probe of the view and the task, before any RL: the image-dependent setting
(``--vector-fields speed``: the road is visible only in the image), expert laps recorded with
action noise (the store keeps the applied action and the expert's own label, DART-style), and the
project's own :class:`~pipeline.train.networks.Encoder` + :class:`~pipeline.train.networks.Actor`
(through a :class:`~pipeline.train.td3.TD3Agent`, so evaluation is ``pipeline eval``'s own
:func:`~pipeline.eval.runner.evaluate_policy`). Loss: MSE between the actor's action and the
expert's label, random-shift augmentation, Adam. Two variants on the same data and batches:

- ``trained``: the encoder is trained by the BC loss (end to end);
- ``frozen``:  the encoder keeps its random initial weights; only the actor learns.

Evaluation seeds are fixed before any run (0, 1, 2 by default: the route's own evaluation seeds);
the dataset's episodes use seeds from 1000 on, so no evaluation episode is in the data.

    python benchmarks/bc_probe.py                       # 60 laps, 3,000 updates at batch 64
    python benchmarks/bc_probe.py --episodes 10 --updates 200 --eval-seeds 0   # a quick look

Writes ``<out>.json`` (config, machine, per-seed results, wall times) and ``<out>.md``.
Last line: ``bc_trained_completion=... bc_frozen_completion=... bc_trained_length=...
bc_frozen_length=...`` (route completion in percent, episode length in steps, means over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VARIANTS = ("trained", "frozen")


def collect_dataset(out: str, args) -> None:
    from pipeline.datasets.collect import CollectConfig, collect

    if (Path(out) / "zarr.json").exists():
        return  # a dataset of an earlier run with the same options (the path names them)
    collect(CollectConfig(out=out, episodes=args.episodes, route=args.route, policy="expert", noise=args.noise,
                          seed=args.data_seed, vector_fields="speed", traffic=args.traffic), progress=False)


def make_agent(store, variant: str, seed: int):
    from pipeline.train.td3 import TD3Agent, TD3Config

    vectors = np.asarray(store.vector[: store.num_observations], dtype=np.float64)
    config = TD3Config(encoder_update="frozen" if variant == "frozen" else "critic", seed=seed, device="cpu")
    return TD3Agent(store.obs_spec, config=config, vector_mean=vectors.mean(0), vector_std=vectors.std(0))


def clone(agent, replay, updates: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """``updates`` BC steps on ``replay``'s batches; returns the loss every 100 updates."""
    from pipeline.train.networks import random_shift

    trains_encoder = agent.config.encoder_update != "frozen"
    params = list(agent.actor.parameters()) + (list(agent.encoder.parameters()) if trains_encoder else [])
    optimiser = torch.optim.Adam(params, lr=lr)
    shifts = torch.Generator().manual_seed(seed)
    losses = []
    for update in range(updates):
        batch = replay.sample(batch_size)
        obs = {"image": random_shift(batch["obs"]["image"], 4, generator=shifts), "vector": batch["obs"]["vector"]}
        with torch.set_grad_enabled(trains_encoder):
            features = agent.encoder(obs)
        loss = F.mse_loss(agent.actor(features), batch["bc_action"])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if update % 100 == 0 or update == updates - 1:
            losses.append(float(loss))
    return losses


def evaluate(agent, route: str, seeds: list[int]) -> list[dict]:
    from pipeline.eval.runner import evaluate_policy

    results = []
    for seed in seeds:
        summary = evaluate_policy(agent, [route], episodes=1, seed=seed)
        results.append({"seed": seed, "route_completion": summary["route_completion"], "length": summary["length"],
                        "episode_return": summary["episode_return"], "terminations": summary["terminations"]})
    return results


def per_seed(run: dict, sep: str) -> str:
    return sep.join(f"{e['route_completion']:.0f}" for e in run["episodes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=60, help="expert laps in the dataset")
    parser.add_argument("--noise", type=float, default=0.1, help="the expert's action noise while recording")
    parser.add_argument("--traffic", type=int, default=0)
    parser.add_argument("--route", default="racetrack")
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (network init, batches)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=1000, help="first episode seed of the dataset")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="keeps the dataset between runs [default: a temp dir]")
    parser.add_argument("--out", default="benchmarks/results/bc-probe-cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.datasets.replay import DictReplayBuffer
    from pipeline.datasets.store import TransitionStore

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bc-probe-"))
    data = str(work / f"expert-{args.route}-{args.episodes}ep-noise{args.noise}-traffic{args.traffic}.zarr")
    started = time.perf_counter()
    collect_dataset(data, args)
    store = TransitionStore(data)
    print(f"dataset: {store.num_episodes} episodes, {store.num_transitions} transitions "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    runs = []
    for seed in args.seeds:
        for variant in VARIANTS:
            t0 = time.perf_counter()
            agent = make_agent(store, variant, seed)
            with DictReplayBuffer(store, online_capacity=0, n_step=1, prefetch=1, seed=seed) as replay:
                losses = clone(agent, replay, args.updates, args.batch_size, args.lr, seed)
            trained_s = time.perf_counter() - t0
            episodes = evaluate(agent, args.route, args.eval_seeds)
            run = {"variant": variant, "seed": seed, "losses": losses, "train_seconds": trained_s,
                   "eval_seconds": time.perf_counter() - t0 - trained_s, "episodes": episodes,
                   "route_completion": float(np.mean([e["route_completion"] for e in episodes])),
                   "length": float(np.mean([e["length"] for e in episodes]))}
            runs.append(run)
            print(f"{variant:8s} seed {seed}: final loss {losses[-1]:.4f}, route completion "
                  f"{run['route_completion']:.1f}% (per eval seed: {per_seed(run, ', ')}), "
                  f"length {run['length']:.0f} steps; {trained_s:.0f} s training", flush=True)

    def mean(variant: str, key: str) -> float:
        return float(np.mean([r[key] for r in runs if r["variant"] == variant]))

    result = {
        "benchmark": "bc_probe", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
        "config": vars(args), "dataset": {"episodes": store.num_episodes, "transitions": store.num_transitions},
        "runs": runs, "wall_seconds": time.perf_counter() - started,
        "summary": {f"bc_{v}_{k}": mean(v, k) for v in VARIANTS for k in ("route_completion", "length")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    rows = [f"| {r['variant']} | {r['seed']} | {r['route_completion']:.1f} | {r['length']:.0f} | "
            f"{per_seed(r, ' / ')} | {r['losses'][-1]:.4f} |"
            for r in runs]
    out.with_suffix(".md").write_text(
        f"# BC probe ({result['date']}, {result['machine']['cpus']} CPUs, torch {torch.__version__})\n\n"
        f"{store.num_episodes} expert laps (noise {args.noise}, speed-only vector, traffic {args.traffic}), "
        f"{args.updates} updates at batch {args.batch_size}, evaluation seeds {args.eval_seeds}.\n\n"
        "| encoder | seed | route completion % | length | per eval seed | final loss |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows) + f"\n\nWall time {result['wall_seconds']:.0f} s.\n")
    s = result["summary"]
    print(f"bc_trained_completion={s['bc_trained_route_completion']:.1f} "
          f"bc_frozen_completion={s['bc_frozen_route_completion']:.1f} "
          f"bc_trained_length={s['bc_trained_length']:.0f} bc_frozen_length={s['bc_frozen_length']:.0f}")


if __name__ == "__main__":
    main()
