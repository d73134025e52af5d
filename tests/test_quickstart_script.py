"""benchmarks/quickstart_seeds.py at a tiny budget: its bookkeeping, caching and outputs (real
`pipeline collect/train/eval` calls), not whether anything learns."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quickstart_seeds.py"


@pytest.fixture(scope="module")
def quickstart():
    spec = importlib.util.spec_from_file_location("quickstart_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(quickstart, tmp_path_factory):
    from pipeline.datasets.collect import CollectConfig, collect

    work = tmp_path_factory.mktemp("qs")
    data = work / "a.zarr"
    collect(CollectConfig(out=str(data), episodes=2, policy="expert", max_steps=40), progress=False)
    # 30 updates, a checkpoint every 1,000 is none: last.pt is the only (final) checkpoint; two seeds side by side
    argv = ["--work-dir", str(work), "--data", str(data), "--seeds", "0", "1", "--jobs", "2", "--label", "t",
            "--train-arg=--steps=30", "--train-arg=--online-every=10", "--note", "tiny"]
    report = quickstart.main(argv)
    return {"work": work, "argv": argv, "report": report}


def test_every_seed_is_trained_and_its_checkpoints_scored_on_both_seed_sets(tiny):
    report = tiny["report"]
    assert [r["seed"] for r in report["results"]] == [0, 1]
    for r in report["results"]:
        assert "--seed " + str(r["seed"]) in r["train_command"] and "--steps=30" in r["train_command"]
        assert [p["updates"] for p in r["points"]] == [30] and r["points"][0]["checkpoint"] == "last.pt"
        held_out, fixed = r["points"][0]["held_out"], r["points"][0]["fixed"]
        assert len(held_out["per_seed"]) == 10 and len(fixed["per_seed"]) == 5
        for scores in (held_out, fixed):
            assert 0.0 <= scores["route_completion"] <= 100.0
            assert scores["route_completion"] == pytest.approx(sum(scores["per_seed"]) / len(scores["per_seed"]))
            assert sum(scores["terminations"].values()) == len(scores["per_seed"])
    # held-out seeds 100-109 are other episodes than the route's seeds 0-4
    report0 = json.loads((tiny["work"] / "t-s0" / "eval-held_out-30" / "report.json").read_text())
    assert sorted(e["seed"] for e in report0["episodes"]) == list(range(100, 110))


def test_summary_counts_seeds_at_90_from_the_final_held_out_scores(tiny, quickstart):
    report = tiny["report"]
    finals = [r["points"][-1]["held_out"]["route_completion"] for r in report["results"]]
    assert report["summary"]["seeds_at_90"] == sum(f >= 90 for f in finals)
    assert report["summary"]["held_out_mean"] == pytest.approx(sum(finals) / 2)
    fake = [{"seed": s, "train_s": 1.0, "points": [{"held_out": {"route_completion": v}, "fixed": {"route_completion": 50.0}}]}
            for s, v in enumerate([95.0, 89.9, 100.0])]
    assert quickstart.summarise(fake)["seeds_at_90"] == 2
    md = (tiny["work"] / "quickstart-t.md").read_text()
    assert "> tiny" in md and md.count("\n| 0 |") + md.count("\n| 1 |") == 2
    assert json.loads((tiny["work"] / "quickstart-t.json").read_text())["summary"] == report["summary"]


def test_a_rerun_keeps_finished_seeds_and_retrains_a_half_finished_one(tiny, quickstart):
    work = tiny["work"]
    kept = (work / "t-s0" / "result.json").read_text()
    (work / "t-s1" / "result.json").unlink()  # as if killed after training, before its result
    (work / "t-s1" / "stale.txt").write_text("left by the killed run")
    report = quickstart.main(tiny["argv"])
    assert (work / "t-s0" / "result.json").read_text() == kept  # not redone
    assert not (work / "t-s1" / "stale.txt").exists() and (work / "t-s1" / "result.json").is_file()
    assert [r["seed"] for r in report["results"]] == [0, 1]


def test_a_seed_cached_with_other_train_options_or_scored_with_the_online_actor_is_redone(tiny, quickstart):
    work = tiny["work"]
    assert quickstart.SCORED_WITH == "averaged"
    for seed, field, value in ((0, "scored_with", "online"), (1, "train_command", "train --steps=99")):
        path = work / f"t-s{seed}" / "result.json"
        record = json.loads(path.read_text())
        assert record[field] != value
        path.write_text(json.dumps({**record, field: value, "train_s": -1.0}))  # -1: only a reused record has it
    report = quickstart.main(tiny["argv"])
    for r in report["results"]:
        assert r["train_s"] > 0 and r["scored_with"] == "averaged" and "--steps=30" in r["train_command"]
