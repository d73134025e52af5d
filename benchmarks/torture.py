"""kill -9 at random moments during collect, train, pull, merge and push; check nothing is lost.

Each trial runs the real command line (``pipeline.cli.main``) in a child process, sends it SIGKILL
after a random delay drawn over the command's whole run time (measured once beforehand), then:

1. what the killed command left either opens and passes ``verify`` as a whole result, or is
   refused by readers (an unfinished merge, a copy without its root document, nothing at all):
   no half output passes as whole;
2. a rerun, or ``--resume`` where the command has one, reaches the exact count (episodes,
   updates, copied episodes) and the result verifies;
3. every episode committed before the kill is still there, bit for bit, after the rerun.

Children are forked from a forkserver that imported the pipeline (and torch) once, so a trial
costs the command's work rather than Python's start-up: 5 x 20 trials fit in a few minutes on 2
cores. Small data throughout: 2-4 short episodes.

    python benchmarks/torture.py [--trials 20] [--seed 0] [--only collect,merge]

Prints one line per failure, a summary per command, and ``torture_trials=N failures=M`` last.
The same lines are appended to benchmarks/results/torture.txt.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "torture.txt"

COLLECT = ["collect", "--episodes", "4", "--max-steps", "10", "--quiet"]
TRAIN_STEPS = 20
TRAIN = ["train", "--online-mix", "0.5", "--steps", str(TRAIN_STEPS), "--batch-size", "8", "--checkpoint-every",
         "10", "--log-every", "10", "--online-every", "10", "--quiet", "--device", "cpu"]


def _child(argv: list[str], log: str) -> None:
    """Run ``pipeline <argv>`` as the console script would, output to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["pipeline", *argv]
    from pipeline.cli import main

    try:
        main()
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    os._exit(0)


class Runner:
    def __init__(self, ctx, log: str):
        self.ctx, self.log = ctx, log

    def last_line(self) -> str:
        """The last line the latest child printed (its error, when it failed)."""
        lines = Path(self.log).read_text().strip().splitlines()
        return lines[-1][:160] if lines else "(no output)"

    def start(self, argv):
        process = self.ctx.Process(target=_child, args=([str(a) for a in argv], self.log))
        process.start()
        return process

    def run(self, argv, timeout: float = 300) -> int:
        process = self.start(argv)
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            return -9
        return process.exitcode

    def kill_after(self, argv, delay: float) -> int | None:
        """Start ``argv``, SIGKILL it after ``delay`` s; None if it finished first, else -9."""
        process = self.start(argv)
        process.join(delay)
        if not process.is_alive():
            return None
        process.kill()  # SIGKILL: no handler, no cleanup, as kill -9
        process.join()
        return -9


# ------------------------------------------------------------------------------------------------
# What a killed command left, and what its rerun made


def committed(url: str) -> list:
    """The committed episodes of the store at ``url`` (opened as any reader would)."""
    from pipeline.datasets.store import TransitionStore

    store = TransitionStore(url)
    return [store.episode(i) for i in range(store.num_episodes)]


def same_episodes(got: list, want: list) -> bool:
    fields = ("frames", "vector", "action", "reward", "terminated", "truncated")
    return len(got) == len(want) and all(
        all(getattr(g, f).tobytes() == getattr(w, f).tobytes() for f in fields) and g.seed == w.seed
        for g, w in zip(got, want))


def verified(url: str) -> str | None:
    """None if ``url`` verifies, else the first problem."""
    from pipeline.datasets.remote import verify_store

    report = verify_store(url)
    return None if report.ok else str(report.problems[0])


def left_behind(url: str, expected: list | None) -> tuple[list, str | None]:
    """(episodes committed at ``url``, a failure or None): a store that opens must verify, and
    when it is a copy or merge (``expected``: its complete episodes) it must be whole."""
    from pipeline.errors import PipelineError

    if not os.path.exists(url.removeprefix("file://")):
        return [], None
    try:
        episodes = committed(url)
    except PipelineError:
        return [], None  # refused: unfinished, or not a dataset yet; nothing passes as whole
    problem = verified(url)
    if problem:
        return episodes, f"what it left opens but does not verify: {problem}"
    if expected is not None and not same_episodes(episodes, expected):
        return episodes, f"a half output passes as whole ({len(episodes)} of {len(expected)} episodes)"
    return episodes, None


def check_rerun(url: str, before: list, want: list | None, count: int) -> str | None:
    from pipeline.errors import PipelineError

    try:
        after = committed(url)
    except PipelineError as e:
        return f"the rerun's result does not open: {e}"
    if len(after) != count:
        return f"the rerun reached {len(after)} episodes, not {count}"
    if not same_episodes(after[: len(before)], before):
        return "an episode committed before the kill changed or is gone"
    if want is not None and not same_episodes(after, want):
        return "the rerun's episodes differ from the source's"
    if len({e.seed for e in after}) != len(after) and want is None:
        return "an episode was recorded twice"
    return verified(url)


# ------------------------------------------------------------------------------------------------
# One trial per command


def trial_collect(runner: Runner, work: Path, delay: float, data: dict) -> str | None:
    out = str(work / "c.zarr")
    runner.kill_after([*COLLECT, "--out", out], delay)
    before, failure = left_behind(out, None)
    if failure:
        return failure
    resume = ["--resume"] if os.path.exists(out) else []
    if (rc := runner.run([*COLLECT, "--out", out, *resume])) != 0:
        return f"collect {' '.join(resume)} exited {rc}: {runner.last_line()}"
    return check_rerun(out, before, None, int(COLLECT[2]))


def trial_train(runner: Runner, work: Path, delay: float, data: dict) -> str | None:
    import torch

    out = work / "run"
    argv = [*TRAIN, "--data", data["a"], "--out", out]
    runner.kill_after(argv, delay)
    online = str(out / "online.zarr")
    before, failure = left_behind(online, None)
    if failure:
        return failure
    last = out / "last.pt"
    if last.exists():
        try:
            torch.load(last, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            return f"last.pt left by the kill does not load: {str(e).splitlines()[0]}"
    resume = ["--resume"] if last.exists() else []
    if (rc := runner.run([*argv, *resume])) != 0:
        return (f"train {' '.join(resume) or 'rerun'} exited {rc}: "
                f"{runner.last_line()}")
    state = torch.load(last, map_location="cpu", weights_only=True)
    if state["loop"]["update"] != TRAIN_STEPS:
        return f"the run reached update {state['loop']['update']}, not {TRAIN_STEPS}"
    after, failure = left_behind(online, None)
    if failure:
        return failure
    if not same_episodes(after[: len(before)], before):
        return "an online episode committed before the kill changed or is gone"
    return None


def trial_copy(runner: Runner, work: Path, delay: float, data: dict, verb: str) -> str | None:
    dst = str(work / "copy.zarr")
    if verb == "push":
        dst = "file://" + dst
    argv = ["datasets", verb, data["a"], dst, "--quiet"]
    runner.kill_after(argv, delay)
    _, failure = left_behind(dst, data["a_episodes"])
    if failure:
        return failure
    if (rc := runner.run(argv)) != 0:
        return f"the rerun of {verb} exited {rc}"
    return check_rerun(dst, [], data["a_episodes"], len(data["a_episodes"]))


def trial_merge(runner: Runner, work: Path, delay: float, data: dict) -> str | None:
    out = str(work / "m.zarr")
    argv = ["datasets", "merge", data["a"], data["b"], "-o", out, "--quiet"]
    runner.kill_after(argv, delay)
    want = data["a_episodes"] + data["b_episodes"]
    _, failure = left_behind(out, want)
    if failure:
        return failure
    from pipeline.datasets.store import TransitionStore
    from pipeline.errors import PipelineError

    try:
        before = [] if not os.path.exists(out) else committed_unfinished(TransitionStore)(out)
    except PipelineError:
        before = []  # cut before the store was made
    resume = ["--resume"] if os.path.exists(out) else []
    if (rc := runner.run([*argv, *resume])) != 0:
        return f"merge {' '.join(resume)} exited {rc}: {runner.last_line()}"
    return check_rerun(out, before, want, len(want))


def committed_unfinished(store_type):
    def read(url: str) -> list:
        store = store_type(url, allow_unfinished=True)
        return [store.episode(i) for i in range(store.num_episodes)]

    return read


TRIALS = {
    "collect": trial_collect,
    "train": trial_train,
    "pull": lambda *a: trial_copy(*a, verb="pull"),
    "merge": trial_merge,
    "push": lambda *a: trial_copy(*a, verb="push"),
}


def calibrate(runner: Runner, name: str, work: Path, data: dict) -> float:
    """Seconds one uninterrupted run of ``name``'s command takes here (kills are drawn over it)."""
    argv = {"collect": [*COLLECT, "--out", work / "c.zarr"],
            "train": [*TRAIN, "--data", data["a"], "--out", work / "run"],
            "pull": ["datasets", "pull", data["a"], work / "copy.zarr", "--quiet"],
            "push": ["datasets", "push", data["a"], "file://" + str(work / "copy.zarr"), "--quiet"],
            "merge": ["datasets", "merge", data["a"], data["b"], "-o", work / "m.zarr", "--quiet"]}[name]
    started = time.perf_counter()
    rc = runner.run(argv)
    if rc != 0:
        raise SystemExit(f"{name} fails even without a kill (exit {rc}); see {runner.log}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="Trials per command.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(TRIALS), help="Comma-separated commands.")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Killed children cannot release their semaphores; the tracker's warning about them at exit
    # would otherwise print after the last line.
    os.environ["PYTHONWARNINGS"] = "ignore::UserWarning"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.cli", "pipeline.train.loop", "pipeline.train.td3", "pipeline.datasets.collect",
                                "pipeline.datasets.merge", "pipeline.datasets.remote", "pipeline.datasets.replay",
                                "pipeline.envs.embedded", "highway_env", "torch"])
    rng = random.Random(args.seed)
    lines, trials, failures = [], 0, 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="torture-") as tmp:
        root = Path(tmp)
        runner = Runner(ctx, str(root / "child.log"))
        data = {"a": str(root / "a.zarr"), "b": str(root / "b.zarr")}
        for name, seed in (("a", 0), ("b", 10)):  # two small recorded stores as sources
            if runner.run(["collect", "--episodes", "3", "--max-steps", "30", "--seed", seed, "--quiet",
                           "--out", data[name]]) != 0:
                raise SystemExit(f"cannot record the source stores; see {runner.log}")
            data[f"{name}_episodes"] = committed(data[name])
        for name in args.only.split(","):
            work = root / name
            work.mkdir()
            full = calibrate(runner, name, work, data)
            shutil.rmtree(work)
            failed, killed = 0, 0
            for i in range(args.trials):
                work.mkdir()
                delay = rng.uniform(0.0, full)
                Path(runner.log).write_text("")
                try:
                    failure = TRIALS[name](runner, work, delay, data)
                except Exception as e:  # noqa: BLE001 - a crash of the checks is a failure too
                    failure = f"the checks raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                trials += 1
                if failure:
                    failed += 1
                    lines.append(f"FAIL {name} trial {i} (kill after {delay:.2f} s): {failure}")
                    print(lines[-1], flush=True)
                shutil.rmtree(work)
            failures += failed
            lines.append(f"{name}: {args.trials} trials, kills drawn over its {full:.1f} s run, {failed} failed")
            print(lines[-1], flush=True)
    lines.append(f"machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
                 f"load average {os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.0f} s in all")
    lines.append(f"torture_trials={trials} failures={failures}")
    print("\n".join(lines[-2:]))
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as results:  # appended: earlier runs are the history of the figures
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results.write(f"# {when}: python benchmarks/torture.py --trials {args.trials} --seed {args.seed}\n"
                      + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
