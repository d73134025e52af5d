"""benchmarks/learning.py at a tiny budget: its bookkeeping and outputs, not whether anything learns.

One run of the script's ``main`` (image setting, online and offline starts, critic / frozen / SB3,
one seed, 60 env steps, batch 8) feeds every test below.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.train.td3 import native_bf16

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"
VARIANTS = ("critic", "frozen", "sb3", "sb3-mlp")
TINY = ["--budget", "60", "--warmup", "20", "--eval-every", "20", "--train-freq", "4", "--batch-size", "8",
        "--seeds", "0", "--settings", "image", "--variants", *VARIANTS, "--starts", "online", "offline",
        "--dataset-episodes", "1", "--eval-episodes", "1", "--final-episodes", "1", "--threads", "1",
        "--device", "cpu"]


def _load_script():
    spec = importlib.util.spec_from_file_location("learning_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the script's string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def learning():
    return _load_script()


@pytest.fixture(scope="module")
def bench(learning, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learning")
    out = tmp / "results" / "learning-test"
    returned = learning.main([*TINY, "--work-dir", str(tmp / "work"), "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    return {"out": out, "report": report, "returned": returned, "work": tmp / "work"}


def test_every_run_gets_the_same_env_steps_and_updates(bench):
    runs = bench["report"]["runs"]
    assert sorted((r["start"], r["variant"]) for r in runs) == sorted(  # sb3-mlp: online only
        (s, v) for s in ("online", "offline") for v in VARIANTS if s == "online" or v != "sb3-mlp")
    for run in runs:
        online = run["start"] == "online"
        # online: 20 random warm-up steps, then 40 learning steps at 1 update per 4 env steps
        assert run["env_steps"] == 60 and run["warmup"] == (20 if online else 0)
        assert run["updates"] == (10 if online else 15)
        assert [p["env_steps"] for p in run["curve"]] == ([40, 60] if online else [20, 40, 60])
        assert [p["updates"] for p in run["curve"]] == ([5, 10] if online else [5, 10, 15])
        for point in run["curve"] + [run["final"]]:
            assert 0.0 <= point["route_completion"] <= 100.0
            assert point["length"] >= 1 and np.isfinite(point["episode_return"])
        assert run["final"]["episodes"] == 1
    dataset = bench["report"]["datasets"]["image"]
    assert dataset["episodes"] == 1 and dataset["transitions"] > 0


def test_a_dataset_already_on_disk_is_described_from_the_store(bench, learning):
    """A rerun records no episode, and the report still gives the stored episodes' mean return."""
    first = bench["report"]["datasets"]["image"]
    args = learning.parse_args([*TINY, "--work-dir", str(bench["work"])])
    again = learning.expert_dataset(bench["work"] / "datasets" / "image.zarr", args, "image")
    assert first["episodes_recorded_now"] == 1 and again["episodes_recorded_now"] == 0
    assert again["episodes"] == first["episodes"] and again["transitions"] == first["transitions"]
    assert again["mean_return"] == pytest.approx(first["mean_return"])
    assert sum(again["terminations"].values()) == 1 and again["mean_route_completion"] is None


def test_the_image_setting_hides_the_road_from_the_vector(bench):
    report = bench["report"]
    assert report["settings"]["image"] == {"vector_fields": "speed", "traffic": 3}
    assert report["hardware"]["device"] == "cpu" and report["hardware"]["gpu"] is None
    import torch

    for run in report["runs"]:  # our checkpoints were trained on the speed-only vector
        if not run["variant"].startswith("sb3"):
            state = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
            assert state["obs_spec"]["vector_fields"] == ["speed"] and state["obs_spec"]["traffic"] == 3


def test_summary_and_targets_are_computed_from_the_runs(bench):
    report = bench["report"]
    assert bench["returned"]["summary"] == report["summary"]
    for run in report["runs"]:
        group = report["summary"][f"image/{run['start']}/{run['variant']}"]
        assert group["seeds"] == [0]
        for metric in ("route_completion", "episode_return", "length", "driving_score"):
            value = run["final"][metric]
            assert group["final"][metric] == {"mean": value, "std": 0.0, "values": [value]}
            assert [p[metric]["mean"] for p in group["curve"]] == [p[metric] for p in run["curve"]]
    by_name = {}
    for t in report["targets"]:
        by_name.setdefault(t["target"], []).append(t)
    length = next(t for t in by_name["end-to-end (critic) episode length >= 4x frozen"] if t["start"] == "online")
    critic = report["summary"]["image/online/critic"]["final"]["length"]["mean"]
    frozen = report["summary"]["image/online/frozen"]["final"]["length"]["mean"]
    assert (length["critic"], length["frozen"]) == (critic, frozen)
    assert length["ratio"] == pytest.approx(critic / frozen) and length["passed"] == (critic / frozen >= 4)
    sb3 = [t for t in report["targets"] if "sb3" in t]
    assert {t["start"] for t in sb3} == {"online", "offline"}
    assert all(t["passed"] == (t["critic"] >= t["sb3"]) for t in sb3)
    reach = by_name["offline+online reaches the online-only final route completion in fewer env steps"]
    assert {t["variant"] for t in reach} == set(VARIANTS) - {"sb3-mlp"}


def test_our_runs_are_also_tested_with_the_checkpoint_picked_on_the_validation_seeds(bench):
    """The curves are evaluated on the validation seeds; best.pt is the best point there (route
    completion, then driving score, a tie to the later) and gets the same final test as last.pt."""
    from pipeline.eval.seeds import VALIDATION_SEED

    report = bench["report"]
    for run in report["runs"]:
        assert run["job"]["eval_seed"] == VALIDATION_SEED
        if run["variant"].startswith("sb3"):  # SB3 keeps its last model only
            assert "final_best" not in run
            continue
        score = {p["updates"]: (p["route_completion"], p["driving_score"]) for p in run["curve"]}
        top = max(score.values())
        assert run["best_updates"] == max(u for u, s in score.items() if s == top)
        assert run["final_best"]["episodes"] == run["final"]["episodes"] == 1
        if run["best_updates"] == run["updates"]:  # the last policy was the best one: the same test
            assert run["final_best"]["route_completion"] == run["final"]["route_completion"]
    best_targets = [t for t in report["targets"] if "best.pt" in t["target"]]
    assert len(best_targets) == 2  # (a): >= 80% and >= 2x frozen, for best.pt
    for t in best_targets:
        assert t["critic"] == report["summary"]["image/offline/critic"]["final_best"]["route_completion"]["mean"]
    assert "final_best" not in report["summary"]["image/online/sb3"]


def test_markdown_and_png(bench):
    report, out = bench["report"], bench["out"]
    md = out.with_suffix(".md").read_text()
    assert "no GPU" in md
    assert "| image-online | image | online | critic, frozen, sb3, sb3-mlp | 60 | 20 | 20 | 0 |" in md
    assert "| image-offline | image | offline | critic, frozen, sb3 | 60 | — (dataset) | 20 | 0 |" in md
    for run in report["runs"]:  # every seed has its row, with its curve
        curve = ", ".join(f"{p['env_steps']}: {p['route_completion']:.0f}" for p in run["curve"])
        assert f"| {run['name']} | {run['final']['route_completion']:.1f} |" in md and curve in md
    for group in report["summary"].values():
        rc = group["final"]["route_completion"]
        row = f"| image | {group['start']} | {group['variant']} | 1 | 60 | {group['updates']['mean']:.0f} | " \
              f"{rc['mean']:.1f} ± {rc['std']:.1f} |"
        assert row in md
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(str(png)).shape[:2]
    assert (height, width) == (640, 1500)  # two panels (online, offline) x (completion, length, return)


def test_a_finished_run_is_reused(bench, learning):
    """Rerunning with the same --work-dir reads the runs' result.json instead of training again."""
    work = bench["work"]
    result = next((work / "runs").glob("image-online-critic-seed0-*/result.json"))
    record = json.loads(result.read_text())
    record["final"]["route_completion"] = 42.0  # a marker only a reused record can carry
    result.write_text(json.dumps(record))
    job = learning.Job(**record["job"])
    assert learning.run_job(job)["final"]["route_completion"] == 42.0


def test_runs_that_differ_only_in_an_option_the_name_leaves_out_keep_their_own_folders(bench, learning, tmp_path):
    """Two lrs in one work dir: each job gets its own folder, so the second never deletes the first's
    finished run (before, both were runs/image-online-critic-seed0 and the second trained over it)."""
    record = json.loads(next((bench["work"] / "runs").glob("image-online-critic-seed0-*/result.json")).read_text())
    job = learning.Job(**{**record["job"], "run_dir": ""})
    other = learning.dataclasses.replace(job, lr=job.lr * 3)
    runs = tmp_path / "runs"
    first, second = learning.run_dir_for(job, runs), learning.run_dir_for(other, runs)
    assert first != second and first.parent == second.parent == runs
    assert first.name.startswith(job.name + "-") and second.name.startswith(job.name + "-")
    assert learning.run_dir_for(job, runs) == first  # the same job finds the same folder again
    # a finished run in the plain <name> folder of an older work dir is still this job's cache...
    legacy = runs / job.name
    legacy.mkdir(parents=True)
    (legacy / "result.json").write_text(json.dumps({**record, "job": {**record["job"], "run_dir": str(legacy)}}))
    assert learning.run_dir_for(job, runs) == legacy
    # ...but not another lr's, which goes to its own folder and leaves the legacy run alone
    assert learning.run_dir_for(other, runs) == second
    # a finished run under another hash (written before a job field was added) is found too
    renamed = runs / f"{other.name}-0ldhash0"
    renamed.mkdir()
    (renamed / "result.json").write_text(json.dumps({**record, "job": {**record["job"], "lr": other.lr}}))
    assert learning.run_dir_for(other, runs) == renamed


@pytest.mark.parametrize("field, cached_value, value", [
    ("bf16", None, False),  # how a run cached before the precision was resolved reads
    ("deployed", "online", "averaged"),  # scored with the online actor (before 968c5b5: no field at all)
    ("deployed", None, "averaged"),
    ("exploration_noise", 0.1, 0.2),
    ("exploration_noise", None, 0.2),  # cached before the option: it ran with 0.1
    ("lr", None, 1e-3),  # cached before --lr: 3e-4
    ("n_step", None, 5),  # cached before --n-step: 3
])
def test_a_cached_run_of_another_precision_or_deployment_is_trained_again(bench, learning, tmp_path, monkeypatch,
                                                                           field, cached_value, value):
    """The CNN's precision is stored resolved (no "default" whose meaning changes between versions),
    and so are the networks evaluations act with and the exploration noise; a cached run that
    differs in any of them is not reused."""
    runs = bench["report"]["runs"]
    # CPU, no --bf16: bf16 convolutions where this CPU has native bf16, else fp32, written resolved
    assert {r["job"]["bf16"] for r in runs} == {native_bf16(torch.device("cpu"))}
    assert {r["job"]["deployed"] for r in runs} == {learning.DEPLOYED_POLICY} == {"averaged"}
    cached = next((bench["work"] / "runs").glob("image-online-critic-seed0-*/result.json"))
    record = json.loads(cached.read_text())
    if cached_value is None and field != "bf16":
        del record["job"][field]
    else:
        record["job"][field] = cached_value
    run_dir = tmp_path / "image-online-critic-seed0"
    run_dir.mkdir()
    record["job"]["run_dir"] = str(run_dir)
    (run_dir / "result.json").write_text(json.dumps(record))
    trained = []
    monkeypatch.setattr(learning, "run_ours", lambda job, sched: trained.append(job) or {"final": {}})
    job = learning.Job(**{**record["job"], field: value})
    learning.run_job(job)
    assert trained == [job]
    assert json.loads((run_dir / "result.json").read_text())["job"][field] == value


@pytest.mark.parametrize("field, old_value", [("exploration_noise", 0.1), ("lr", 3e-4), ("n_step", 3)])
def test_a_run_cached_before_a_job_field_existed_is_reused_with_that_fields_old_value(bench, learning, tmp_path,
                                                                                      field, old_value):
    """result.json files written before --exploration-noise, --lr or --n-step have no such field;
    they ran with pipeline train's defaults of the time."""
    record = json.loads(next((bench["work"] / "runs").glob("image-online-critic-seed0-*/result.json")).read_text())
    assert record["job"][field] == learning.JOB_FIELDS_ADDED[field] == old_value
    del record["job"][field]
    record["job"]["run_dir"] = str(tmp_path)
    record["final"]["route_completion"] = 43.0  # a marker only a reused record can carry
    (tmp_path / "result.json").write_text(json.dumps(record))
    job = learning.Job(**{**record["job"], field: old_value})
    assert learning.run_job(job)["final"]["route_completion"] == 43.0


@pytest.mark.parametrize("field, value", [("exploration_noise", 0.3), ("lr", 1e-3), ("n_step", 5)])
def test_exploration_noise_learning_rate_and_n_step_reach_our_learner(bench, learning, tmp_path, monkeypatch,
                                                                      field, value):
    import pipeline.train.loop as loop

    record = json.loads(next((bench["work"] / "runs").glob("image-online-critic-seed0-*/result.json")).read_text())
    job = learning.Job(**{**record["job"], field: value, "run_dir": str(tmp_path)})
    seen = []

    class Stop(Exception):
        pass

    def fake_train(config, progress):
        seen.append(getattr(config, field))
        raise Stop  # before any env is built

    monkeypatch.setattr(loop, "train", fake_train)
    with pytest.raises(Stop):
        learning.run_ours(job, learning.make_schedule(job))
    assert seen == [value]


def test_the_cpu_preset_is_the_issues_comparison(learning):
    """(a) image/offline e2e vs frozen vs actor+critic from 60 expert laps at online-mix 0.5; (b) full
    vector online: ours vs SB3 MultiInput vs SB3 Mlp within 4k env steps; (c) image online: ours vs
    frozen; 3 seeds, batch 64, two runs side by side with one thread each."""
    args = learning.parse_args(["--preset", "cpu"])
    parts = {p["name"]: p for p in args.parts}
    assert (parts["a"]["setting"], parts["a"]["start"]) == ("image", "offline")
    assert set(parts["a"]["variants"]) == {"critic", "frozen", "actor+critic"} and parts["a"]["budget"] == 6_000
    assert (parts["b"]["setting"], parts["b"]["start"], parts["b"]["budget"]) == ("full", "online", 4_000)
    assert set(parts["b"]["variants"]) == {"critic", "sb3", "sb3-mlp"}
    # actor/critic lr 1e-3 in (b) and (c) (held-out screens chose it), (a) keeps pipeline train's 3e-4
    assert {name: part["lr"] for name, part in parts.items()} == {"a": 3e-4, "b": 1e-3, "c": 1e-3}
    assert (parts["c"]["setting"], parts["c"]["start"], parts["c"]["budget"]) == ("image", "online", 6_000)
    assert set(parts["c"]["variants"]) == {"critic", "frozen"}
    assert (args.seeds, args.batch_size, args.jobs, args.threads) == ([0, 1, 2], 64, 2, 1)
    assert (args.dataset_episodes, args.online_mix, args.traffic) == (60, 0.5, 3)
    # precision is the machine's, like --threads: allowed beside the preset; unset it is pipeline train's
    assert args.bf16 is None and learning.parse_args(["--preset", "cpu", "--bf16"]).bf16 is True
    hw = {"device": "cpu", "native_bf16": True}
    assert [learning.cnn_precision(hw, asked) for asked in (None, True, False)] == ["bf16", "bf16", "fp32"]
    assert learning.cnn_precision({"device": "cpu", "native_bf16": False}, None) == "fp32"
    assert learning.cnn_precision({"device": "cpu", "native_bf16": False}, True) == "fp32"
    assert learning.cnn_precision({"device": "cuda", "native_bf16": True}, None) == "bf16"
    assert args.out.endswith("learning-cpu")
    with pytest.raises(SystemExit):  # a preset's own option given beside it is refused, not ignored
        learning.parse_args(["--preset", "cpu", "--budget", "100"])
    gpu = learning.parse_args(["--preset", "gpu", "--seeds", "0"])
    assert {p["budget"] for p in gpu.parts} == {100_000} and gpu.batch_size == 256 and gpu.seeds == [0]


def test_the_traffic8_preset_is_part_a_with_eight_cars(learning):
    """Everything as the cpu preset's part (a), but 8 other cars, end-to-end vs frozen only, and
    3,000 updates (the cpu preset's part (a) moved to 6,000 on 2026-12-06): its runs are the ones
    behind learning-cpu-a-traffic8-10seeds.md (same jobs, so the same cache)."""
    cpu, t8 = learning.parse_args(["--preset", "cpu"]), learning.parse_args(["--preset", "cpu-traffic8"])
    (part,) = t8.parts
    a = next(p for p in cpu.parts if p["name"] == "a")
    own = ("variants", "budget")
    assert {k: v for k, v in part.items() if k not in own} == {k: v for k, v in a.items() if k not in own}
    assert (part["budget"], a["budget"]) == (3_000, 6_000)
    assert part["variants"] == ["critic", "frozen"] and (cpu.traffic, t8.traffic) == (3, 8)
    others = ("parts", "traffic", "out", "preset")
    assert ({k: v for k, v in vars(t8).items() if k not in others}
            == {k: v for k, v in vars(cpu).items() if k not in others})
    assert t8.out.endswith("learning-cpu-traffic8")


def test_bad_budgets_fail_before_training(learning, tmp_path):
    with pytest.raises(SystemExit):
        learning.parse_args(["--eval-every", "10", "--train-freq", "4"])
    with pytest.raises(SystemExit):
        learning.parse_args(["--online-mix", "0"])
    with pytest.raises(PipelineError, match="no --eval-every"):
        learning.main(["--budget", "30", "--warmup", "20", "--eval-every", "20", "--batch-size", "8",
                       "--seeds", "0", "--settings", "full", "--variants", "frozen", "--starts", "online",
                       "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "work").exists()
    # 12,000 env steps after a 500-step warm-up are not whole periods of 1,000: refused, not run as 11,500
    with pytest.raises(PipelineError, match="use --budget 11500 or 12500"):
        learning.main(["--budget", "12000", "--warmup", "500", "--eval-every", "1000", "--batch-size", "8",
                       "--seeds", "0", "--settings", "full", "--variants", "frozen", "--starts", "online",
                       "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "work").exists()
    # from the command line: one line and exit 2
    done = subprocess.run([sys.executable, str(SCRIPT), "--budget", "12000", "--warmup", "500", "--eval-every",
                           "1000", "--settings", "full", "--variants", "frozen", "--starts", "online",
                           "--work-dir", str(tmp_path / "work2"), "--out", str(tmp_path / "out2")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --budget 12000 is not 500 warm-up steps plus whole --eval-every 1000 periods; "
        "use --budget 11500 or 12500"]


def test_the_default_evaluation_period_divides_each_parts_budget(learning):
    """Without --eval-every each part gets about 20 periods that fill its budget exactly: an online
    start spends its warm-up first, an offline start has none."""
    args = learning.parse_args(["--budget", "1030", "--warmup", "30", "--train-freq", "2", "--batch-size", "8",
                                "--starts", "online", "offline", "--settings", "image"])
    periods = {p["start"]: p["eval_every"] for p in args.parts}
    assert periods == {"online": 50, "offline": 206}  # 1,000 = 20 x 50; 1,030 = 2 x 5 x 103: 5 x 206
    for part in args.parts:
        warmup = 0 if part["start"] == "offline" else 30
        assert (part["budget"] - warmup) % part["eval_every"] == 0 and part["eval_every"] % 2 == 0
    for part in learning.parse_args(["--preset", "gpu"]).parts + learning.parse_args(["--preset", "cpu"]).parts:
        warmup = 0 if part["start"] == "offline" else part["warmup"]
        assert (part["budget"] - warmup) % part["eval_every"] == 0, part["name"]


def _state_and_parent(stat: Path) -> tuple[str, int] | None:
    """A ``/proc/<pid>/stat`` file's process state and parent pid; None once the process is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
            if (found := _state_and_parent(stat)) is not None and found[0] != "Z" and found[1] == pid]


def _alive(pid: int) -> bool:
    found = _state_and_parent(Path(f"/proc/{pid}/stat"))
    return found is not None and found[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_pool_workers_end_when_the_benchmark_is_killed(tmp_path):
    """kill -9 of learning.py must not leave its workers training for minutes with nobody to collect."""
    command = [sys.executable, str(SCRIPT), "--budget", "100000", "--warmup", "20", "--eval-every", "20",
               "--batch-size", "8", "--seeds", "0", "1", "--settings", "full", "--variants", "critic",
               "--starts", "online", "--threads", "1", "--jobs", "2", "--device", "cpu",
               "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "work" / "runs").glob("*/train"))) < 2:  # both workers are training
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = _children(parent.pid)
        assert len(workers) >= 2
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert left == []
