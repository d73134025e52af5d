"""Sharing datasets: push/pull over a real S3 API on loopback, verify, merge, stats, safety.

The S3 server is moto's, on 127.0.0.1 (``tests/s3_server.py``). Stores are small and random
(``tests.test_store.make_episode`` with 16x16 frames, except for training, which needs the env's
84x84); an episode of 300 steps crosses a 256-frame chunk so stores have several frame chunks.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.datasets import remote
from pipeline.datasets.merge import merge_stores
from pipeline.datasets.remote import copy_store, verify_store
from pipeline.datasets.stats import dataset_stats
from pipeline.datasets.store import EpisodeWriter, TransitionStore
from pipeline.envs.spec import ObsSpec
from pipeline.errors import SpecMismatchError, StoreError
from tests.cli_helpers import assert_one_line_error, cli_env, pipeline_cmd
from tests.s3_server import s3, s3_server  # noqa: F401 - pytest fixtures
from tests.test_store import assert_episode_equal, make_episode, write

SMALL = ObsSpec(image_size=16)


def episode(seed: int, steps: int, **kwargs):
    return make_episode(seed, steps, SMALL, **kwargs)


EPISODES = [episode(0, 300), episode(1, 40, route="racetrack-oval"), episode(2, 7)]


def run(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real ``pipeline`` CLI in a subprocess, with extra environment variables."""
    return subprocess.run(pipeline_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**cli_env(), **(env or {})})


def local_store(tmp_path: Path, name: str = "a.zarr", episodes=EPISODES, spec=SMALL, **kwargs) -> str:
    url = str(tmp_path / name)
    write(url, episodes, spec=spec, **kwargs)
    return url


def grow(url: str, episodes) -> None:
    write(url, episodes, spec=SMALL, mode="append")


def assert_episodes(url: str, episodes) -> None:
    store = TransitionStore(url)
    assert store.num_episodes == len(episodes)
    for i, ep in enumerate(episodes):
        assert_episode_equal(store.episode(i), ep)


def objects(fs, root: str) -> dict[str, str]:
    """Relative key -> sha256 of every object under ``root``."""
    fs.invalidate_cache()
    return {path[len(root.rstrip("/")) + 1:]: hashlib.sha256(fs.cat_file(path)).hexdigest()
            for path in fs.find(root)}


def local_objects(url: str) -> dict[str, str]:
    return {str(p.relative_to(url)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in Path(url).rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------
# push / pull / train over S3


def test_push_then_pull_over_s3_is_bit_exact_verified_and_holds_no_credentials(s3, tmp_path):
    src = local_store(tmp_path)
    url = s3.url("team/a.zarr")

    pushed = run("datasets", "push", src, url, env=s3.env())
    assert pushed.returncode == 0, pushed.stderr
    assert "3 episodes" in pushed.stdout and "verified" in pushed.stdout
    assert objects(s3.fs, f"{s3.bucket}/team/a.zarr") == local_objects(src)  # byte for byte

    again = copy_store(src, url)
    assert again["copied"] == 0 and again["skipped"] == len([k for k in local_objects(src) if "/c/" in k])

    dst = str(tmp_path / "pulled.zarr")
    pulled = CliRunner().invoke(cli, ["datasets", "pull", url, dst])
    assert pulled.exit_code == 0, pulled.output
    assert local_objects(dst) == local_objects(src)
    assert_episodes(dst, EPISODES)
    assert verify_store(dst).ok

    metadata = " ".join(s3.fs.cat_file(p).decode() for p in s3.fs.find(s3.bucket) if p.endswith("zarr.json"))
    assert "testing" not in metadata and s3.endpoint not in metadata  # nothing of the environment


def test_train_streams_a_few_updates_from_s3(s3, tmp_path):
    url = s3.url("a.zarr")
    copy_store(local_store(tmp_path, episodes=[make_episode(i, 30) for i in range(3)], spec=ObsSpec()), url)
    out, cache = tmp_path / "run", tmp_path / "chunk-cache"
    result = run("train", "--data", url, "--data-cache", cache, "--steps", "3", "--batch-size", "8",
                 "--online-mix", "0", "--out", out, "--quiet", env=s3.env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "last.pt").is_file()
    assert "3 updates" in result.stdout
    assert any(p.is_file() for p in cache.rglob("*")), "the remote chunks were cached locally"


def test_push_interrupted_then_resumed_copies_only_the_rest(s3, tmp_path, monkeypatch):
    src = local_store(tmp_path)
    url = s3.url("a.zarr")
    real_write, calls = remote._write, []

    def connection_lost_after_two_rounds(fs, root, objs):
        calls.append(len(objs))
        if len(calls) > 2:
            raise ConnectionResetError(104, "Connection reset by peer")
        real_write(fs, root, objs)

    with monkeypatch.context() as m:
        m.setattr(remote, "_BATCH_OBJECTS", 4)
        m.setattr(remote, "_write", connection_lost_after_two_rounds)
        with pytest.raises(StoreError, match="stopped.*run the same command again"):
            copy_store(src, url)
    with pytest.raises(StoreError, match="not a pipeline dataset"):
        TransitionStore(url)  # the metadata goes last: a partial copy is no dataset

    result = copy_store(src, url)
    assert result["skipped"] == 8  # the two rounds that made it
    assert result["copied"] == len([k for k in local_objects(src) if "/c/" in k]) - 8
    assert result["verify"]["ok"]
    assert_episodes(url, EPISODES)


def test_push_after_the_source_grew_sends_only_what_changed(s3, tmp_path):
    src = local_store(tmp_path)
    url = s3.url("a.zarr")
    first = copy_store(src, url)
    grow(src, [episode(3, 20)])
    second = copy_store(src, url)
    # the new episode rewrites the tail chunk of each array; full frame chunks stay
    assert second["skipped"] >= 1 and second["copied"] <= first["copied"]
    assert_episodes(url, [*EPISODES, episode(3, 20)])


def test_copy_refuses_to_replace_another_dataset_or_a_foreign_folder(tmp_path):
    src = local_store(tmp_path)
    other = local_store(tmp_path, "other.zarr", [episode(5, 3)])
    before = local_objects(other)
    with pytest.raises(StoreError, match="holds another dataset.*--overwrite"):
        copy_store(src, other)
    assert local_objects(other) == before
    copy_store(src, other, overwrite=True)
    assert_episodes(other, EPISODES)

    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    result = run("datasets", "pull", src, home)
    assert_one_line_error(result, "is not a dataset store")
    assert (home / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------------------------------------
# verify


def _flip(data: bytes) -> bytes:
    data = bytearray(data)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_verify_names_the_damaged_chunk(tmp_path, damage):
    url = local_store(tmp_path)
    key = Path(url) / "frames/c/1/0/0"
    if damage == "flip":
        key.write_bytes(_flip(key.read_bytes()))
    else:
        key.unlink()
    kind = "corrupt_chunk" if damage == "flip" else "missing_chunk"
    report = verify_store(url)
    assert [(p.kind, p.where) for p in report.problems] == [(kind, "frames/c/1/0/0")]
    with pytest.raises(StoreError, match="frames/c/1/0/0"):
        copy_store(url, str(tmp_path / "copy.zarr"))  # a damaged store is not spread further
    assert not (tmp_path / "copy.zarr").exists()


def test_verify_over_s3_names_a_flipped_and_a_deleted_chunk(s3, tmp_path):
    url = s3.url("a.zarr")
    copy_store(local_store(tmp_path), url)  # verified clean at the end of the copy
    root = f"{s3.bucket}/a.zarr"
    s3.fs.pipe_file(f"{root}/frames/c/1/0/0", _flip(s3.fs.cat_file(f"{root}/frames/c/1/0/0")))
    s3.fs.rm_file(f"{root}/vector/c/0/0")

    result = run("datasets", "verify", url, env=s3.env())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("corrupt_chunk frames/c/1/0/0") for line in lines), result.stdout
    assert any(line.startswith("missing_chunk vector/c/0/0") for line in lines), result.stdout
    assert "2 problem(s)" in lines[-1]

    no_credentials = {name: "" for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    result = run("datasets", "verify", url, env={**s3.env(), **no_credentials, "HOME": str(tmp_path),
                                                "AWS_EC2_METADATA_DISABLED": "true"})
    assert_one_line_error(result, "cannot reach", "credentials")


def test_verify_names_a_truncated_array_and_a_damaged_table(tmp_path):
    url = local_store(tmp_path)
    group = zarr.open_group(url, mode="r+")
    group["action"].resize((100, 2))  # the episodes need 347 rows
    group["episodes/length"][1] = 41  # episode 2 no longer starts where episode 1 ends
    report = verify_store(url)
    found = {(p.kind, p.where) for p in report.problems}
    assert ("truncated", "action") in found
    assert ("table", "episodes/frame_offset") in found
    # the rewritten length chunk no longer matches the checksum recorded at commit time
    assert ("corrupt_chunk", "episodes/length/c/0") in found


def test_verify_accepts_a_crashed_then_resumed_store(tmp_path, monkeypatch):
    url = local_store(tmp_path)
    writer = EpisodeWriter(url, SMALL, mode="append")
    with monkeypatch.context() as m:
        m.setattr(EpisodeWriter, "_commit", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            writer.append(episode(9, 200))  # data written, commit never happens
    crashed = verify_store(url)
    assert crashed.ok, crashed.problems  # the committed episodes are intact...
    assert any("uncommitted rows" in note for note in crashed.notes)  # ...the tail is explained

    grow(url, [episode(3, 20)])  # resume
    resumed = verify_store(url)
    assert resumed.ok and not resumed.notes, (resumed.problems, resumed.notes)
    assert_episodes(url, [*EPISODES, episode(3, 20)])


def test_verify_of_something_that_is_no_store_is_one_line(tmp_path):
    assert_one_line_error(run("datasets", "verify", tmp_path / "missing.zarr"), "no dataset store at")


# ------------------------------------------------------------------------------------------------
# merge


def test_merge_reads_back_every_episode_bit_exactly_with_provenance(tmp_path):
    alice = [episode(10 + i, 100 + 90 * i) for i in range(3)]
    bob = [episode(20, 30, route="racetrack-oval"), episode(21, 0), episode(22, 280)]
    a = local_store(tmp_path, "alice.zarr", alice, meta={"policy": "expert", "backend": "embedded",
                                                         "recorded_by": "alice", "recorded_on": "box1"})
    b = local_store(tmp_path, "bob.zarr", bob, meta={"policy": "random", "backend": "embedded",
                                                     "recorded_by": "bob", "recorded_on": "box2"})
    before = {url: local_objects(url) for url in (a, b)}
    out = str(tmp_path / "team.zarr")

    result = run("datasets", "merge", a, b, "-o", out)
    assert result.returncode == 0, result.stderr
    assert {url: local_objects(url) for url in (a, b)} == before  # sources untouched
    assert_episodes(out, [*alice, *bob])
    store = TransitionStore(out)
    assert store.episodes["source"].tolist() == [0, 0, 0, 1, 1, 1]
    assert [s["url"] for s in store.sources] == [a, b]
    assert [s["meta"]["recorded_by"] for s in store.sources] == ["alice", "bob"]
    assert [s["created"] for s in store.sources] == [TransitionStore(u).attrs["created"] for u in (a, b)]
    assert store.meta == {"backend": "embedded", "merged_stores": 2}  # what both agree on
    assert verify_store(out).ok

    info = json.loads(CliRunner().invoke(cli, ["datasets", "info", out, "--json"]).output)
    assert [s["episodes_here"] for s in info["sources"]] == [3, 3]
    card = CliRunner().invoke(cli, ["datasets", "info", out], terminal_width=200).output
    assert "alice@box1" in card and "bob@box2" in card and "provenance" in card

    # merging a merged store keeps the original sources instead of nesting them, and alice's
    # episodes, already in it, are written once
    again = merge_stores([out, a], str(tmp_path / "again.zarr"))
    assert [s["url"] for s in again["sources"]] == [a, b]
    assert again["duplicates"] == [{"store": a, "episodes": 3, "of": out}]
    assert TransitionStore(str(tmp_path / "again.zarr")).episodes["source"].tolist() == [0, 0, 0, 1, 1, 1]


def test_merge_of_incompatible_specs_is_refused_naming_the_fields(tmp_path):
    a = local_store(tmp_path, "a.zarr", [episode(0, 5)])
    spec = ObsSpec(vector_fields="speed", traffic=2, image_size=16)
    b = local_store(tmp_path, "b.zarr", [make_episode(1, 5, spec=spec)], spec=spec)
    out = tmp_path / "c.zarr"
    line = assert_one_line_error(run("datasets", "merge", a, b, "-o", out), "cannot merge")
    assert "obs_spec.vector_fields" in line and "obs_spec.traffic: 2 != 0" in line
    assert "frame_stack" not in line  # only the fields that differ
    assert not out.exists()
    with pytest.raises(SpecMismatchError):
        merge_stores([a, b], str(out))


def test_merge_never_writes_into_a_source(tmp_path):
    a = local_store(tmp_path, "a.zarr", [episode(0, 5)])
    b = local_store(tmp_path, "b.zarr", [episode(1, 5)])
    before = local_objects(a)
    with pytest.raises(StoreError, match="one of the sources"):
        merge_stores([a, b], str(tmp_path / "." / "a.zarr"), overwrite=True)
    assert local_objects(a) == before


# ------------------------------------------------------------------------------------------------
# stats


def test_stats_match_numpy_and_plot(tmp_path):
    url = local_store(tmp_path)
    png = tmp_path / "stats.png"
    stats = dataset_stats(url, bins=8, png=str(png))
    vector = np.concatenate([ep.vector for ep in EPISODES]).astype(np.float64)
    action = np.concatenate([ep.action for ep in EPISODES]).astype(np.float64)
    reward = np.concatenate([ep.reward for ep in EPISODES]).astype(np.float64)
    np.testing.assert_allclose(stats["vector"]["mean"], vector.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats["vector"]["std"], vector.std(0), rtol=1e-6)
    counts, edges = np.histogram(reward, bins=8, range=(reward.min(), reward.max()))
    assert stats["reward"]["hist"]["counts"] == counts.tolist()
    np.testing.assert_allclose(stats["reward"]["hist"]["edges"], edges)
    for j in range(2):
        assert stats["action"]["hist"][j]["counts"] == np.histogram(action[:, j], 8, (-1, 1))[0].tolist()
    assert stats["terminated"] == sum(int(ep.terminated.sum()) for ep in EPISODES)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    printed = CliRunner().invoke(cli, ["datasets", "stats", url, "--json"])
    assert json.loads(printed.output)["transitions"] == sum(ep.length for ep in EPISODES)


# ------------------------------------------------------------------------------------------------
# a store is data only; remote reads with a local chunk cache


def test_a_store_with_foreign_attrs_dtypes_or_codecs_is_refused_before_reading(tmp_path):
    url = local_store(tmp_path)
    group = zarr.open_group(url, mode="r+")
    group.attrs["__reduce__"] = "os.system"
    with pytest.raises(StoreError, match="unexpected attrs key.*'__reduce__'"):
        TransitionStore(url)
    del group.attrs["__reduce__"]

    group.create_array("notes", shape=(2,), dtype=str)
    with pytest.raises(StoreError, match="array notes has dtype"):
        TransitionStore(url)
    del group["notes"]
    TransitionStore(url)

    meta_path = Path(url) / "reward" / "zarr.json"
    plain = meta_path.read_text()
    for codec, error in (("numcodecs.zlib", "array reward uses codec"),  # zarr knows it; we don't
                         ("numcodecs.pickle", "Unknown codec")):  # not even zarr opens it
        meta = json.loads(plain)
        meta["codecs"].append({"name": codec, "configuration": {}})
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(StoreError, match=error) as err:
            TransitionStore(url)
        assert "\n" not in str(err.value)
    assert_one_line_error(run("datasets", "verify", url), "numcodecs.pickle")


def test_remote_reads_through_a_local_chunk_cache_stay_exact_when_the_store_grows(s3, tmp_path):
    src = local_store(tmp_path)
    url = s3.url("a.zarr")
    copy_store(src, url)
    cache = tmp_path / "cache"
    assert_episode_equal(TransitionStore(url, cache=str(cache)).episode(0), EPISODES[0])
    cached = {p.name for p in cache.rglob("*") if p.is_file()}
    assert cached  # chunks are kept under their checksums
    digests = TransitionStore(url).attrs["checksums"]["chunks"]
    assert cached <= set(digests.values())

    # served from the cache: the remote chunk is gone, yet the episode reads back exactly
    s3.fs.rm_file(f"{s3.bucket}/a.zarr/frames/c/0/0/0")
    assert_episode_equal(TransitionStore(url, cache=str(cache)).episode(0), EPISODES[0])

    # the store grows: rewritten tail chunks have new checksums, so nothing stale is served
    grow(src, [episode(3, 20)])
    copy_store(src, url)  # (also puts back the deleted chunk)
    grown = TransitionStore(url, cache=str(cache))
    for i, ep in enumerate([*EPISODES, episode(3, 20)]):
        assert_episode_equal(grown.episode(i), ep)

    # fsspec's own cache chaining works too
    assert_episode_equal(TransitionStore(f"simplecache::{url}").episode(1), EPISODES[1])
