"""The Zarr dataset store: bit-exact round trips, crash safety, modes, errors, size.

Episodes are synthetic (random frames and floats built as :class:`Episode` objects) so these tests
do not depend on any simulator.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import zarr

import pipeline
from pipeline.datasets.episode import Episode
from pipeline.datasets.store import (
    FORMAT_NAME,
    FRAME_CHUNK,
    FORMAT_VERSION,
    EpisodeWriter,
    TransitionStore,
    open_store,
)
from pipeline.envs.spec import ActionSpec, ObsSpec
from pipeline.errors import PipelineError, SpecMismatchError, StoreError
from tests.s3_server import s3, s3_server  # noqa: F401  (pytest fixtures)

REPO = Path(__file__).resolve().parents[1]
SPEC = ObsSpec()
DATA_ARRAYS = ("frames", "vector", "action", "reward", "terminated", "truncated")


def make_episode(seed: int, steps: int, spec: ObsSpec = SPEC, route: str = "racetrack") -> Episode:
    """A random episode of ``steps`` steps, identical for identical arguments."""
    rng = np.random.default_rng(seed)
    k, s, t = spec.frame_stack, spec.image_size, steps
    reward = rng.standard_normal(t).astype(np.float32)
    if t:
        reward[0] = -0.0  # bit-exactness must keep the sign of zero
    terminated = np.zeros(t, bool)
    truncated = np.zeros(t, bool)
    if t and seed % 2:
        terminated[-1] = True
    elif t:
        truncated[-1] = True
    return Episode(
        frames=rng.integers(0, 256, (k - 1 + t + 1, s, s), dtype=np.uint8),
        vector=rng.standard_normal((t + 1, spec.vector_dim)).astype(np.float32),
        action=rng.uniform(-1, 1, (t, 2)).astype(np.float32),
        reward=reward,
        terminated=terminated,
        truncated=truncated,
        route=route,
        seed=seed,
        termination="collision" if t and seed % 2 else ("timeout" if t else ""),
    )


def test_the_recorder_rebuilds_every_observation_of_a_long_episode_and_keeps_no_view_of_them():
    from pipeline.datasets.episode import EpisodeRecorder

    want = make_episode(3, 150)  # past the recorder's first buffer of 64 frames, twice
    recorder = EpisodeRecorder(route=want.route, seed=want.seed)
    observations = [{"image": want.frames[t : t + 4].copy(), "vector": want.vector[t].copy()} for t in range(151)]
    recorder.start(observations[0])
    for t in range(150):
        recorder.add(want.action[t], want.reward[t], observations[t + 1], want.terminated[t], want.truncated[t])
    for obs in observations:  # an env may reuse its observation arrays
        obs["image"][:] = 0
    got = recorder.finish(want.termination)
    assert_episode_equal(got, want)
    assert got.frames.flags.c_contiguous
    assert np.isnan(got.expert_action).all() and got.expert_action.shape == (150, 2)


def assert_bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def assert_episode_equal(got: Episode, want: Episode):
    for name in DATA_ARRAYS:
        assert_bits_equal(getattr(got, name), getattr(want, name))
    assert (got.route, got.seed, got.termination) == (want.route, want.seed, want.termination)


def write(url, episodes, spec=SPEC, **kwargs) -> int:
    with EpisodeWriter(url, spec, **kwargs) as writer:
        for ep in episodes:
            count = writer.append(ep)
    return count


def memory_url() -> str:
    return f"memory://test-store-{uuid.uuid4().hex}.zarr"


# ------------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_is_bit_exact_for_every_episode_and_transition(tmp_path):
    # 300 steps crosses a 256-frame chunk; 0 steps is the degenerate episode; routes repeat.
    episodes = [
        make_episode(1, 37),
        make_episode(2, 300, route="racetrack-oval"),
        make_episode(3, 0),
        make_episode(4, 5),
    ]
    url = str(tmp_path / "a.zarr")
    assert write(url, episodes, meta={"policy": "random"}) == 4

    store = open_store(url)
    assert isinstance(store, TransitionStore)
    assert store.num_episodes == 4
    assert store.routes == ["racetrack", "racetrack-oval"]
    for i, ep in enumerate(episodes):
        assert_episode_equal(store.episode(i), ep)
    assert_episode_equal(store.episode(-1), episodes[-1])

    steps = [(ep, t) for ep in episodes for t in range(ep.length)]
    assert store.num_transitions == len(steps) == len(store)
    for i, (ep, t) in enumerate(steps):
        tr = store.transition(i)
        obs, next_obs = ep.observation(t), ep.observation(t + 1)
        assert_bits_equal(tr["obs"]["image"], obs["image"])
        assert_bits_equal(tr["obs"]["vector"], obs["vector"])
        assert_bits_equal(tr["next_obs"]["image"], next_obs["image"])
        assert_bits_equal(tr["next_obs"]["vector"], next_obs["vector"])
        assert_bits_equal(tr["action"], ep.action[t])
        assert_bits_equal(tr["reward"], ep.reward[t])
        assert tr["terminated"] is bool(ep.terminated[t])
        assert tr["truncated"] is bool(ep.truncated[t])
    with pytest.raises(IndexError):
        store.transition(len(steps))
    with pytest.raises(IndexError):
        store.episode(4)


@pytest.mark.parametrize("frame_stack", [4, 2])
def test_each_episode_adds_stack_minus_one_plus_steps_plus_one_frames(tmp_path, frame_stack):
    spec = ObsSpec(frame_stack=frame_stack, image_size=16)
    lengths = [10, 1, 257]
    url = str(tmp_path / "a.zarr")
    write(url, [make_episode(i, t, spec) for i, t in enumerate(lengths)], spec=spec)

    store = TransitionStore(url)
    per_episode = [frame_stack - 1 + t + 1 for t in lengths]
    assert store.num_frames == sum(per_episode)
    assert store.num_observations == sum(t + 1 for t in lengths)
    assert store.episodes["frame_offset"].tolist() == np.cumsum([0, *per_episode[:-1]]).tolist()
    assert store.episodes["length"].tolist() == lengths
    assert store.frames.shape == (sum(per_episode), 16, 16)  # closed writer trims padding


def test_read_frames_returns_the_concatenated_episode_frames(tmp_path):
    episodes = [make_episode(i, 150) for i in range(3)]
    url = str(tmp_path / "a.zarr")
    write(url, episodes)
    store = TransitionStore(url)
    everything = np.concatenate([ep.frames for ep in episodes])
    chunk = store.frames.chunks[0]
    parts = [
        store.read_frames(a, min(a + chunk, store.num_frames))
        for a in range(0, store.num_frames, chunk)
    ]
    assert_bits_equal(np.concatenate(parts), everything)
    with pytest.raises(IndexError):
        store.read_frames(0, store.num_frames + 1)


# ------------------------------------------------------------------------------------------------
# Append, crash safety


def test_append_mode_continues_and_keeps_earlier_episodes(tmp_path):
    url = str(tmp_path / "a.zarr")
    first = [make_episode(i, 40 + i) for i in range(2)]
    write(url, first, meta={"policy": "random", "noise": 0.1})
    with EpisodeWriter(url, SPEC, meta={"policy": "td3"}, mode="append") as writer:
        assert writer.committed_episodes == 2
        assert writer.append(make_episode(7, 20, route="racetrack-large")) == 3
    store = TransitionStore(url)
    assert store.num_episodes == 3
    for i, ep in enumerate([*first, make_episode(7, 20, route="racetrack-large")]):
        assert_episode_equal(store.episode(i), ep)
    assert store.meta == {"policy": "random", "noise": 0.1}  # creation meta is kept
    assert store.attrs["appends"][-1]["first_episode"] == 2
    assert store.attrs["appends"][-1]["meta"] == {"policy": "td3"}


def test_append_mode_on_an_empty_url_creates_the_store(tmp_path):
    url = str(tmp_path / "new.zarr")
    assert write(url, [make_episode(0, 3)], mode="append") == 1
    assert TransitionStore(url).num_episodes == 1


def _crash_in(monkeypatch, step: str):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")  # not an OSError: the writer must not swallow it

    monkeypatch.setattr(EpisodeWriter, step, killed)


@pytest.mark.parametrize("url_kind", ["local", "memory"])
@pytest.mark.parametrize("crash_before", ["_write_rows", "_commit"])
def test_crashed_append_is_invisible_and_truncated_on_append_open(
    tmp_path, monkeypatch, crash_before, url_kind
):
    url = str(tmp_path / "a.zarr") if url_kind == "local" else memory_url()
    kept = [make_episode(0, 30), make_episode(1, 300)]
    writer = EpisodeWriter(url, SPEC)
    for ep in kept:
        writer.append(ep)
    with monkeypatch.context() as m:
        _crash_in(m, crash_before)
        with pytest.raises(KeyboardInterrupt):
            writer.append(make_episode(2, 250))  # data arrays are written, the commit is not
    # (the process "dies" here: the writer is never closed)

    store = TransitionStore(url)
    assert store.num_episodes == 2
    assert store.num_frames == sum(len(ep.frames) for ep in kept)
    assert store.frames.shape[0] > store.num_frames  # the crashed episode's frames are there...
    for i, ep in enumerate(kept):  # ...but invisible, and the kept episodes are intact
        assert_episode_equal(store.episode(i), ep)
    if crash_before == "_commit":
        assert store.group["episodes"]["length"].shape[0] > 2  # an uncommitted row exists

    with EpisodeWriter(url, SPEC, mode="append") as resumed:
        group = resumed.group
        assert resumed.committed_episodes == 2
        assert group["frames"].shape[0] == store.num_frames  # tails cut off on open
        assert group["action"].shape[0] == store.num_transitions
        assert group["vector"].shape[0] == store.num_observations
        assert group["episodes"]["length"].shape[0] == 2
        resumed.append(make_episode(3, 12))
    store = TransitionStore(url)
    assert store.num_episodes == 3
    for i, ep in enumerate([*kept, make_episode(3, 12)]):
        assert_episode_equal(store.episode(i), ep)


_CHILD = """
import sys
from tests.test_store import make_episode, SPEC
from pipeline.datasets.store import EpisodeWriter
writer = EpisodeWriter(sys.argv[1], SPEC)
for i in range(10_000):
    writer.append(make_episode(i, 60 + i % 7))
"""


def test_process_killed_mid_write_leaves_only_whole_episodes(tmp_path):
    url = str(tmp_path / "killed.zarr")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, url], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        seen = 0
        while seen < 4:  # also reads a store while it is being written
            assert child.poll() is None, "writer process died"
            assert time.monotonic() < deadline, "writer made no progress"
            try:
                seen = TransitionStore(url).num_episodes
            except StoreError:
                pass  # not created yet
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    store = TransitionStore(url)
    n = store.num_episodes
    assert n >= 4
    for i in range(n):
        assert_episode_equal(store.episode(i), make_episode(i, 60 + i % 7))
    with EpisodeWriter(url, SPEC, mode="append") as writer:
        assert writer.committed_episodes == n
        assert writer.group["frames"].shape[0] == store.num_frames
        writer.append(make_episode(n, 5))
    assert_episode_equal(TransitionStore(url).episode(n), make_episode(n, 5))


# ------------------------------------------------------------------------------------------------
# Modes and errors


def test_create_refuses_an_existing_store(tmp_path):
    url = str(tmp_path / "a.zarr")
    write(url, [make_episode(0, 5)])
    with pytest.raises(StoreError, match="already exists.*--resume.*--overwrite"):
        EpisodeWriter(url, SPEC)
    assert TransitionStore(url).num_episodes == 1


def test_create_accepts_an_existing_empty_directory(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    assert write(str(tmp_path / "empty.zarr"), [make_episode(0, 5)]) == 1


def test_overwrite_replaces_a_store(tmp_path):
    url = str(tmp_path / "a.zarr")
    write(url, [make_episode(0, 5), make_episode(1, 5)], meta={"policy": "old"})
    write(url, [make_episode(9, 8)], meta={"policy": "new"}, mode="overwrite")
    store = TransitionStore(url)
    assert store.num_episodes == 1 and store.meta == {"policy": "new"}
    assert_episode_equal(store.episode(0), make_episode(9, 8))


def test_overwrite_refuses_to_delete_something_that_is_not_a_zarr_store(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match="not a zarr store"):
        EpisodeWriter(str(precious), SPEC, mode="overwrite")
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize(
    "other, field",
    [
        (ObsSpec(vector_fields="speed"), "vector_fields"),
        (ObsSpec(frame_stack=3), "frame_stack"),
        (ObsSpec(traffic=5), "traffic"),
    ],
)
def test_append_with_another_obs_spec_names_the_field(tmp_path, other, field):
    url = str(tmp_path / "a.zarr")
    write(url, [make_episode(0, 5)])
    with pytest.raises(SpecMismatchError, match=field):
        EpisodeWriter(url, other, mode="append")


def test_append_with_another_action_spec_names_the_field(tmp_path):
    url = str(tmp_path / "a.zarr")
    write(url, [make_episode(0, 5)])
    with pytest.raises(SpecMismatchError, match="fields"):
        EpisodeWriter(url, SPEC, ActionSpec(fields=("steer", "throttle")), mode="append")


def test_an_episode_that_does_not_fit_the_spec_is_refused(tmp_path):
    ep = make_episode(0, 10)
    ep.frames = ep.frames[1:]  # one frame short of frame_stack - 1 + T + 1
    with EpisodeWriter(str(tmp_path / "a.zarr"), SPEC) as writer:
        with pytest.raises(SpecMismatchError, match="frames"):
            writer.append(ep)
        assert writer.committed_episodes == 0


def test_not_a_store_is_a_one_line_store_error(tmp_path):
    with pytest.raises(StoreError, match="no dataset store at"):
        TransitionStore(str(tmp_path / "missing.zarr"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a pipeline dataset"):
        TransitionStore(str(tmp_path / "notes"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something-else"
    for open_it in (
        lambda: TransitionStore(str(tmp_path / "other.zarr")),
        lambda: EpisodeWriter(str(tmp_path / "other.zarr"), SPEC, mode="append"),
    ):
        with pytest.raises(StoreError, match="not a pipeline dataset") as err:
            open_it()
        assert "\n" not in str(err.value)


def test_wrong_format_version_is_refused(tmp_path):
    url = str(tmp_path / "a.zarr")
    write(url, [make_episode(0, 5)])
    zarr.open_group(url, mode="r+").attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StoreError, match=f"format_version {FORMAT_VERSION + 1}.*upgrade"):
        TransitionStore(url)
    with pytest.raises(StoreError, match="format_version"):
        EpisodeWriter(url, SPEC, mode="append")


def test_unwritable_path_is_a_one_line_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError) as err:
        EpisodeWriter(str(blocker / "a.zarr"), SPEC)  # a directory inside a regular file
    assert isinstance(err.value, PipelineError)
    assert "cannot write dataset store" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# URLs, format, size, summary


def test_memory_url_round_trip():
    url = memory_url()
    episodes = [make_episode(0, 20), make_episode(1, 270)]
    write(url, episodes)
    with pytest.raises(StoreError, match="already exists"):
        EpisodeWriter(url, SPEC)
    store = TransitionStore(url)
    assert store.num_episodes == 2
    for i, ep in enumerate(episodes):
        assert_episode_equal(store.episode(i), ep)
    assert store.nbytes_stored() > 0


def test_s3_url_round_trip(s3):
    url = s3.url("runs/a.zarr")  # endpoint and credentials come from the environment only
    episodes = [make_episode(0, 20), make_episode(1, 30)]
    write(url, episodes)
    write(url, [make_episode(2, 5)], mode="append")
    store = TransitionStore(url)
    assert store.num_episodes == 3
    assert_episode_equal(store.episode(1), episodes[1])
    assert "key" not in json.dumps(store.attrs).lower()  # no credentials stored


def test_store_holds_only_numeric_arrays_and_json_attrs(tmp_path):
    url = str(tmp_path / "a.zarr")
    write(url, [make_episode(0, 12, route="racetrack"), make_episode(1, 3, route="oval")])
    group = zarr.open_group(url, mode="r")
    arrays = dict(group.arrays())
    arrays.update({f"episodes/{k}": v for k, v in group["episodes"].arrays()})
    assert set(arrays) >= {*DATA_ARRAYS, "episodes/route", "episodes/termination", "episodes/seed"}
    for name, array in arrays.items():
        assert np.dtype(array.dtype).kind in "biuf", (name, array.dtype)
    attrs = dict(group.attrs)
    assert json.loads(json.dumps(attrs)) == attrs
    assert attrs["format"] == FORMAT_NAME and attrs["format_version"] == FORMAT_VERSION
    assert attrs["routes"] == ["racetrack", "oval"]
    assert attrs["committed_episodes"] == 2
    for path in Path(url).rglob("*"):  # nothing that would need unpickling
        assert not path.name.endswith((".pkl", ".pickle", ".npy"))


def test_frames_per_transition_are_about_an_eighth_of_the_sb3_layout(tmp_path):
    steps, k, hw = 200, SPEC.frame_stack, SPEC.image_size**2
    url = str(tmp_path / "a.zarr")
    write(url, [make_episode(i, steps) for i in range(3)])
    store = TransitionStore(url)
    ours = store.num_frames * hw / store.num_transitions  # uint8 frame bytes, before compression
    sb3 = 2 * k * hw  # obs and next_obs stacks stored per transition
    assert ours == (k - 1 + steps + 1) / steps * hw
    # 2KT/(K+T) = 7.84 for T=200: the 3 extra frames that start each episode keep this a hair
    # above exactly 1/8, which only an infinitely long episode reaches.
    assert sb3 / ours >= 7.8


def test_summary(tmp_path):
    url = str(tmp_path / "a.zarr")
    episodes = [make_episode(0, 10), make_episode(1, 20, route="oval"), make_episode(2, 30)]
    meta = {"backend": "embedded", "policy": "random", "noise": 0.3, "seed": 7}
    write(url, episodes, meta=meta)
    store = TransitionStore(url)
    summary = store.summary()
    assert json.loads(json.dumps(summary)) == summary
    returns = [ep.episode_return for ep in episodes]
    assert summary["episodes"] == 3
    assert summary["transitions"] == 60
    assert summary["frames"] == 60 + 3 * SPEC.frame_stack
    assert summary["return_mean"] == pytest.approx(np.mean(returns))
    assert summary["return_min"] == pytest.approx(min(returns))
    assert summary["return_max"] == pytest.approx(max(returns))
    assert summary["routes"] == {"racetrack": 2, "oval": 1}
    assert summary["terminations"] == {"collision": 1, "timeout": 2}
    assert summary["policy"] == "random"
    assert summary["meta"] == meta
    assert summary["obs_spec"] == SPEC.to_dict()
    assert summary["action_spec"] == ActionSpec().to_dict()
    assert summary["bytes_stored"] == store.nbytes_stored() > 0
    assert summary["bytes_per_transition"] == pytest.approx(summary["bytes_stored"] / 60)
    assert summary["software_version"] == pipeline.__version__
    assert datetime.fromisoformat(summary["created"]).tzinfo is not None


def test_summary_of_an_empty_store(tmp_path):
    url = str(tmp_path / "a.zarr")
    EpisodeWriter(url, SPEC).close()
    summary = TransitionStore(url).summary()
    assert summary["episodes"] == summary["transitions"] == 0
    assert summary["return_mean"] is None and summary["bytes_per_transition"] is None


def test_staged_episodes_write_the_chunks_they_fill_and_stay_invisible_until_the_commit(tmp_path):
    episodes = [make_episode(0, 300), make_episode(1, 17), make_episode(2, 200)]
    frames = sum(len(ep.frames) for ep in [make_episode(9, 40), *episodes])
    assert frames % FRAME_CHUNK and frames // FRAME_CHUNK == 2  # two whole chunks and a partial one
    url, reference = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    write(reference, [make_episode(9, 40), *episodes])
    writer = EpisodeWriter(url, SPEC)
    writer.append(make_episode(9, 40))  # a committed tail in the first chunk
    writer.stage(episodes[:1])
    assert sorted(p.name for p in (Path(url) / "frames" / "c").iterdir()) == ["0"]
    writer.stage(episodes[1:])
    # the two whole chunks are written, the partial third one waits for the commit
    assert sorted(p.name for p in (Path(url) / "frames" / "c").iterdir()) == ["0", "1"]
    assert TransitionStore(url).num_episodes == 1  # staged is not committed
    assert writer.commit() == 4
    writer.close()
    got, want = TransitionStore(url), TransitionStore(reference)
    assert got.num_frames == want.num_frames == frames
    np.testing.assert_array_equal(got.frames[:], want.frames[:])
    for name in want.episodes:
        np.testing.assert_array_equal(got.episodes[name], want.episodes[name])
    for i, ep in enumerate(episodes, start=1):
        assert_episode_equal(got.episode(i), ep)


def test_a_bad_episode_stages_nothing_and_a_failed_write_drops_what_was_staged(tmp_path, monkeypatch):
    url = str(tmp_path / "a.zarr")
    writer = EpisodeWriter(url, SPEC)
    writer.append(make_episode(0, 10))
    bad = make_episode(2, 5)
    bad.termination = "flying"
    with pytest.raises(ValueError, match="unknown termination"):
        writer.stage([make_episode(1, 300), bad])  # the good one before it is not staged either
    writer.stage([make_episode(1, 300)])
    with monkeypatch.context() as m:
        m.setattr(EpisodeWriter, "_write_rows", lambda self: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(StoreError, match="disk full.*the 1 committed episodes are intact"):
            writer.commit()
    assert writer.commit() == 1  # nothing is left staged
    assert writer.append(make_episode(3, 7)) == 2
    writer.close()
    store = TransitionStore(url)
    assert_episode_equal(store.episode(0), make_episode(0, 10))
    assert_episode_equal(store.episode(1), make_episode(3, 7))


def test_append_many_commits_a_batch_like_single_appends(tmp_path):
    episodes = [make_episode(i, length) for i, length in enumerate((5, 0, 300, 17))]
    one_by_one, batched = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    with EpisodeWriter(one_by_one, SPEC) as writer:
        for ep in episodes:
            writer.append(ep)
    with EpisodeWriter(batched, SPEC) as writer:
        assert writer.append_many(episodes[:1]) == 1
        assert writer.append_many(episodes[1:]) == 4
    a, b = TransitionStore(one_by_one), TransitionStore(batched)
    for name in a.episodes:
        np.testing.assert_array_equal(a.episodes[name], b.episodes[name])
    for i, ep in enumerate(episodes):
        assert_episode_equal(b.episode(i), ep)
