"""Does the README's quick start learn, over several training seeds? The protocol every CPU learner
change in benchmarks/results/quickstart-cpu.md was judged by, as one command.

    python benchmarks/quickstart_seeds.py --work-dir runs/qs                    # seeds 0-4, 2 at a time
    python benchmarks/quickstart_seeds.py --work-dir runs/qs --label fp32 --train-arg=--no-bf16

With the README's own commands (the CPU defaults unless ``--train-arg`` adds options):

1. the dataset: ``pipeline collect --episodes 200 --out <work-dir>/a.zarr`` (skipped with ``--data``);
2. per training seed S, ``--jobs`` at a time with ``--threads`` torch threads each:
   ``pipeline train --data a.zarr --online-mix 0.5 --checkpoint-every 1000 --seed S`` into
   ``<work-dir>/<label>-s<S>``;
3. every checkpoint of the run (``step_<n>.pt``, and ``last.pt`` for the final update count) scored
   by ``pipeline eval --route racetrack`` on held-out seeds 100-109 (``--seed 100 --episodes 10``:
   what a decision between two learners reads) and on the route's evaluation seeds 0-4 (the
   README's figure, which no decision reads).

A seed whose ``result.json`` is in its run folder is not redone, so an interrupted benchmark
continues where it stopped; a half-finished run folder is started afresh. Outputs: ``<out>.json``
(machine, commands, every seed's checkpoints with every evaluation episode's route completion)
and ``<out>.md`` (a table). Last line:
``seeds_at_90=<k>/<n> heldout_mean=<mean held-out route completion %, final checkpoints>``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(REPO))

from pipeline.policies import AgentPolicy  # noqa: E402

# What `pipeline eval --checkpoint` acts with (the Polyak averages since 968c5b5); a cached seed
# scored otherwise, or trained with other options, is done again.
SCORED_WITH = "averaged" if AgentPolicy.averaged else "online"
HELD_OUT = ["--seed", "100", "--episodes", "10"]  # seeds 100-109: never the route's evaluation seeds
LEARNED = 90.0  # route completion % on the held-out seeds that counts a training seed as learned


def pipeline_cmd(*args: str) -> list[str]:
    """The ``pipeline`` console script of this interpreter's environment."""
    return [sys.executable, "-m", "pipeline.cli", *args]


def run(cmd: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[2:4])} failed (exit {done.returncode}); see {log}")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(updates, path) of every checkpoint, oldest first: ``step_<n>.pt``, then ``last.pt`` unless a
    step checkpoint already holds its update count."""
    import torch

    found = {int(p.stem[5:]): p for p in run_dir.glob("step_*.pt") if p.stem[5:].isdigit()}
    last = run_dir / "last.pt"
    if last.is_file():
        found.setdefault(int(torch.load(last, map_location="cpu", weights_only=True)["num_updates"]), last)
    return sorted(found.items())


def scores(report_dir: Path) -> dict:
    """One evaluation's figures from ``pipeline eval``'s report.json (route completion in %)."""
    episodes = json.loads((report_dir / "report.json").read_text())["episodes"]
    completion = [round(float(e["route_completion"]), 1) for e in episodes]
    terminations: dict[str, int] = {}
    for e in episodes:
        terminations[e["termination"]] = terminations.get(e["termination"], 0) + 1
    return {"route_completion": sum(completion) / len(completion), "per_seed": completion,
            "length": sum(e["length"] for e in episodes) / len(episodes), "terminations": terminations}


def train_and_score(seed: int, args) -> dict:
    """One training seed, trained and every checkpoint scored; cached in ``result.json``."""
    run_dir = Path(args.work_dir) / f"{args.label}-s{seed}"
    result_path = run_dir / "result.json"
    train = pipeline_cmd("train", "--data", str(args.data), "--online-mix", "0.5", "--checkpoint-every", "1000",
                         "--seed", str(seed), "--out", str(run_dir / "run"), *args.train_arg)
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        if done.get("train_command") == " ".join(train[2:]) and done.get("scored_with") == SCORED_WITH:
            return done
    if run_dir.exists():
        shutil.rmtree(run_dir)  # killed before its result, or cached for other options: from the start
    run_dir.mkdir(parents=True)
    log = run_dir / "log.txt"
    started = time.perf_counter()
    run(train, log, args.threads)
    train_s = time.perf_counter() - started
    points = []
    for updates, checkpoint in checkpoints(run_dir / "run"):
        point = {"updates": updates, "checkpoint": checkpoint.name}
        for name, extra in (("held_out", HELD_OUT), ("fixed", [])):
            out = run_dir / f"eval-{name}-{updates}"
            run(pipeline_cmd("eval", "--checkpoint", str(checkpoint), "--route", "racetrack", *extra,
                             "--out", str(out), "--quiet"), log, args.threads)
            point[name] = scores(out)
        points.append(point)
    result = {"seed": seed, "train_s": round(train_s, 1), "train_command": " ".join(train[2:]),
              "scored_with": SCORED_WITH, "points": points}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)  # a result on disk is a whole one
    return result


def summarise(results: list[dict]) -> dict:
    """Final checkpoints: how many seeds reached LEARNED on the held-out seeds, and the means."""
    finals = [r["points"][-1] for r in results]
    held_out = [p["held_out"]["route_completion"] for p in finals]
    fixed = [p["fixed"]["route_completion"] for p in finals]
    return {"seeds": len(results), "seeds_at_90": sum(v >= LEARNED for v in held_out),
            "held_out_mean": sum(held_out) / len(held_out), "fixed_mean": sum(fixed) / len(fixed),
            "train_s": [r["train_s"] for r in results]}


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"## Quick start over {s['seeds']} training seeds: {report['label']}", ""]
    if report["note"]:
        lines += [f"> {report['note']}", ""]
    lines += [f"Machine: {report['machine']}; {report['jobs']} run(s) side by side, {report['threads']} torch "
             f"thread(s) each. Code: {report['commit']}. Train: `{report['results'][0]['train_command']}`.",
             "Route completion % on held-out seeds 100-109 (decides) / the route's evaluation seeds 0-4 "
             "(reported), at each checkpoint.", "",
             "| training seed | train s | " + " | ".join(f"{p['updates']} updates" for p in report["results"][0]["points"])
             + " |", "|---|---|" + "---|" * len(report["results"][0]["points"])]
    for r in report["results"]:
        cells = [f"{p['held_out']['route_completion']:.1f} / {p['fixed']['route_completion']:.1f}" for p in r["points"]]
        lines.append(f"| {r['seed']} | {r['train_s']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"Final checkpoints: {s['seeds_at_90']} of {s['seeds']} training seeds >= {LEARNED:.0f}% held out; "
              f"mean {s['held_out_mean']:.1f}% held out, {s['fixed_mean']:.1f}% on seeds 0-4.", ""]
    return "\n".join(lines)


def machine() -> str:
    import torch

    from pipeline.train.td3 import native_bf16

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"native bf16 {'yes' if native_bf16(torch.device('cpu')) else 'no'}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="dataset and run folders; a rerun continues here")
    p.add_argument("--data", default=None, help="an existing dataset instead of collecting one")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--jobs", type=int, default=2, help="training runs side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--label", default="default", help="names the run folders and the outputs")
    p.add_argument("--train-arg", action="append", default=[],
                   help="one more option for pipeline train, e.g. --train-arg=--no-bf16 (repeat for more)")
    p.add_argument("--note", default="", help="a line for the markdown (machine state, why)")
    p.add_argument("--out", default=None, help="output path without suffix [default: <work-dir>/quickstart-<label>]")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must not repeat")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        args.data = work / "a.zarr"
        run(pipeline_cmd("collect", "--episodes", "200", "--out", str(args.data), "--resume"),
            work / "collect.log", args.threads)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda seed: train_and_score(seed, args), args.seeds))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    report = {"label": args.label, "note": args.note, "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
              "machine": machine(), "commit": commit.stdout.strip() or "unknown", "jobs": args.jobs,
              "threads": args.threads, "data": str(args.data), "results": results, "summary": summarise(results)}
    out = Path(args.out) if args.out else work / f"quickstart-{args.label}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    s = report["summary"]
    print(f"seeds_at_90={s['seeds_at_90']}/{s['seeds']} heldout_mean={s['held_out_mean']:.1f}")
    return report


if __name__ == "__main__":
    main()
