"""Nothing lost, nothing laundered: readers check every chunk, merges never pass as whole (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.datasets import store as store_module
from pipeline.datasets.merge import merge_stores
from pipeline.datasets.remote import verify_store
from pipeline.datasets.replay import DictReplayBuffer
from pipeline.datasets.stats import dataset_stats
from pipeline.datasets.store import EpisodeWriter, TransitionStore
from pipeline.envs.spec import ObsSpec
from pipeline.errors import StoreError
from tests.test_store import assert_episode_equal, make_episode

SMALL = ObsSpec(image_size=16)


def episode(seed: int, steps: int):
    return make_episode(seed, steps, SMALL)


def store_of(tmp_path, name: str, episodes) -> str:
    url = str(tmp_path / name)
    with EpisodeWriter(url, SMALL) as writer:
        writer.append_many(episodes)
    return url


def flip(url: str, key: str) -> None:
    path = f"{url}/{key}"
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def delete(url: str, key: str) -> None:
    import os

    os.remove(f"{url}/{key}")


# ------------------------------------------------------------------------------------------------
# Checksum on read


@pytest.mark.parametrize("damage", [flip, delete])
@pytest.mark.parametrize("key, read", [
    ("frames/c/0/0/0", lambda s: s.read_frames(0, s.num_frames)),
    ("action/c/0/0", lambda s: s.action[: s.num_transitions]),
    ("reward/c/0", lambda s: s.episode(1)),
])
def test_a_damaged_data_chunk_stops_the_read_naming_array_chunk_and_store(tmp_path, damage, key, read):
    url = store_of(tmp_path, "a.zarr", [episode(0, 20), episode(1, 30)])
    damage(url, key)
    store = TransitionStore(url)  # the table is intact: opening works
    with pytest.raises(StoreError) as error:
        read(store)
    message = str(error.value)
    array = key.split("/c/")[0]
    assert f"chunk 0 of array {array}" in message and url in message and "\n" not in message
    assert ("missing" if damage is delete else "sha256") in message


def test_no_verify_reads_what_is_there(tmp_path):
    url = store_of(tmp_path, "a.zarr", [episode(0, 20)])
    delete(url, "action/c/0/0")
    actions = TransitionStore(url, verify=False).action[:20]
    assert not np.any(actions)  # zarr's fill value: exactly what verification exists to stop


def test_a_damaged_table_chunk_is_refused_on_open_and_info_checks_the_table(tmp_path):
    url = store_of(tmp_path, "a.zarr", [episode(0, 20), episode(1, 30)])
    delete(url, "episodes/length/c/0")
    with pytest.raises(StoreError, match="chunk 0 of array episodes/length"):
        TransitionStore(url)
    # unverified, the missing lengths read as zeros: the table no longer tiles the arrays
    with pytest.raises(StoreError, match="episodes table does not agree"):
        TransitionStore(url, verify=False)


def test_replay_loader_and_stats_verify_what_they_load(tmp_path):
    url = store_of(tmp_path, "a.zarr", [episode(0, 40), episode(1, 40)])
    good = DictReplayBuffer(url, online_capacity=0, online_mix=0.0, device="cpu", prefetch=0)
    batch = good.sample(8)
    assert batch["obs"]["image"].dtype == torch.uint8
    good.close()
    flip(url, "frames/c/0/0/0")
    with pytest.raises(StoreError, match="chunk 0 of array frames"):
        DictReplayBuffer(url, online_capacity=0, online_mix=0.0, device="cpu", prefetch=0)
    flip(url, "frames/c/0/0/0")  # undo
    flip(url, "vector/c/0/0")
    with pytest.raises(StoreError, match="chunk 0 of array vector"):
        dataset_stats(url)


def test_a_crashed_append_tail_still_reads_verified(tmp_path, monkeypatch):
    """The chunk holding the committed end is rewritten by a writer that dies before its commit:
    its committed rows are intact, and reading them must not be called corruption."""
    url = store_of(tmp_path, "a.zarr", [episode(0, 20)])
    writer = EpisodeWriter(url, SMALL, mode="append")
    monkeypatch.setattr(EpisodeWriter, "_commit", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        writer.append(episode(1, 30))
    assert_episode_equal(TransitionStore(url).episode(0), episode(0, 20))


def test_a_zero_episode_store_opens_and_describes_itself(tmp_path):
    url = str(tmp_path / "zero.zarr")
    EpisodeWriter(url, SMALL).close()
    summary = TransitionStore(url).summary()
    assert summary["episodes"] == 0 and summary["return_mean"] is None
    assert verify_store(url).ok
    assert dataset_stats(url)["transitions"] == 0


# ------------------------------------------------------------------------------------------------
# Merge


def test_a_damaged_source_fails_the_merge_and_leaves_no_output(tmp_path):
    a = store_of(tmp_path, "a.zarr", [episode(0, 20)])
    b = store_of(tmp_path, "b.zarr", [episode(1, 20)])
    flip(b, "action/c/0/0")
    out = tmp_path / "m.zarr"
    with pytest.raises(StoreError, match="chunk 0 of array action"):
        merge_stores([a, b], str(out))
    assert not out.exists()


def test_overlapping_merges_write_each_episode_once_and_say_so(tmp_path):
    a = store_of(tmp_path, "a.zarr", [episode(0, 20), episode(1, 9)])
    b = store_of(tmp_path, "b.zarr", [episode(2, 12)])
    ab = str(tmp_path / "ab.zarr")
    merge_stores([a, b], ab)
    result = merge_stores([ab, a, b], str(tmp_path / "again.zarr"))
    assert result["episodes"] == 3
    assert result["duplicates"] == [{"store": a, "episodes": 2, "of": ab}, {"store": b, "episodes": 1, "of": ab}]
    merged = TransitionStore(str(tmp_path / "again.zarr"))
    for i, ep in enumerate([episode(0, 20), episode(1, 9), episode(2, 12)]):
        assert_episode_equal(merged.episode(i), ep)
    with pytest.raises(StoreError, match="given twice"):
        merge_stores([a, a], str(tmp_path / "self.zarr"))


def test_an_interrupted_merge_is_refused_by_readers_and_resume_completes_it(tmp_path, monkeypatch):
    a = store_of(tmp_path, "a.zarr", [episode(0, 20), episode(1, 9)])
    b = store_of(tmp_path, "b.zarr", [episode(2, 12), episode(3, 5)])
    out = str(tmp_path / "m.zarr")
    original = store_module.EpisodeWriter.append

    def die_after_three(writer, ep, source=-1):
        if writer.committed_episodes == 3:
            raise KeyboardInterrupt  # as kill -9 between two episodes
        return original(writer, ep, source)

    with monkeypatch.context() as m:
        m.setattr(store_module.EpisodeWriter, "append", die_after_three)
        with pytest.raises(KeyboardInterrupt):
            merge_stores([a, b], out)
    with pytest.raises(StoreError, match="unfinished merge"):
        TransitionStore(out)
    assert TransitionStore(out, allow_unfinished=True).num_episodes == 3
    report = verify_store(out)
    assert [p.kind for p in report.problems] == ["unfinished"]
    with pytest.raises(StoreError, match="--resume"):
        merge_stores([a, b], out)
    with pytest.raises(StoreError, match="same sources"):
        merge_stores([b, a], out, resume=True)

    # a source that grew since is read up to the count the merge began with
    with EpisodeWriter(b, SMALL, mode="append") as writer:
        writer.append(episode(4, 7))
    result = merge_stores([a, b], out, resume=True)
    assert result["episodes"] == 4 and result["resumed"] == 3
    merged = TransitionStore(out)
    for i, ep in enumerate([episode(0, 20), episode(1, 9), episode(2, 12), episode(3, 5)]):
        assert_episode_equal(merged.episode(i), ep)
    assert verify_store(out).ok
    with pytest.raises(StoreError, match="nothing to resume"):
        merge_stores([a, b], out, resume=True)


def test_resuming_a_merge_killed_after_its_last_commit_is_done_already(tmp_path):
    a = store_of(tmp_path, "a.zarr", [episode(0, 20)])
    b = store_of(tmp_path, "b.zarr", [episode(1, 9)])
    out = str(tmp_path / "m.zarr")
    merge_stores([a, b], out)
    checksums = TransitionStore(out).attrs["checksums"]
    again = merge_stores([a, b], out, resume=True)
    assert again["episodes"] == 2 and again["resumed"] == 2
    assert TransitionStore(out).attrs["checksums"] == checksums  # nothing rewritten
    with pytest.raises(StoreError, match="nothing to resume"):
        merge_stores([b, a], out, resume=True)


@pytest.mark.parametrize("left", ["partial root document", "root group without attributes"])
def test_resume_restarts_a_store_whose_creation_was_cut_short(tmp_path, left):
    import zarr

    a = store_of(tmp_path, "a.zarr", [episode(0, 20)])
    b = store_of(tmp_path, "b.zarr", [episode(1, 9)])
    for name in ("c.zarr", "m.zarr"):
        path = tmp_path / name
        if left == "partial root document":  # zarr writes zarr.<uuid>.partial, then renames it
            path.mkdir()
            (path / "zarr.0123abcd.partial").write_text('{"zarr_format": 3, "node_')
        else:
            zarr.open_group(str(path), mode="w").create_array("frames", shape=(0, 16, 16), dtype="uint8")
    with EpisodeWriter(str(tmp_path / "c.zarr"), SMALL, mode="append") as writer:  # collect --resume
        assert writer.committed_episodes == 0
        writer.append(episode(2, 5))
    assert TransitionStore(str(tmp_path / "c.zarr")).num_episodes == 1
    assert merge_stores([a, b], str(tmp_path / "m.zarr"), resume=True)["episodes"] == 2
    # a foreign folder is never taken for one
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(StoreError):
        EpisodeWriter(str(tmp_path / "notes"), SMALL, mode="append")
    assert (tmp_path / "notes" / "todo.txt").exists()
