"""DictReplayBuffer: sampled rows equal the stored transitions, n-step targets, mixing, reservoir,
online store, threads.

Stores are tiny (16x16 frames, a 1-field vector) so a store of 20 frame chunks writes in about a
second; every sampled row is identified by its action (random floats, unique per transition) and
checked against the episode it came from.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.datasets.episode import Episode
from pipeline.datasets.replay import DictReplayBuffer, parse_bytes
from pipeline.datasets.store import EpisodeWriter, TransitionStore
from pipeline.envs.spec import ObsSpec
from pipeline.errors import PipelineError, SpecMismatchError
from tests.test_store import make_episode

torch.set_num_threads(1)
SPEC = ObsSpec(vector_fields="speed", image_size=16)
GAMMA = 0.9


def write_store(path, episodes: list[Episode], spec: ObsSpec = SPEC) -> str:
    with EpisodeWriter(str(path), spec) as writer:
        for episode in episodes:
            writer.append(episode)
    return str(path)


def random_episodes(n: int, seed: int = 0, spec: ObsSpec = SPEC) -> list[Episode]:
    lengths = np.random.default_rng(seed).integers(1, 160, n)
    return [make_episode(seed * 1000 + i, int(t), spec) for i, t in enumerate(lengths)]


def feed(buffer: DictReplayBuffer, episodes: list[Episode]) -> None:
    """Add episodes step by step, as a training loop would."""
    for ep in episodes:
        for t in range(ep.length):
            buffer.add(ep.observation(t), ep.action[t], ep.reward[t], ep.observation(t + 1),
                       ep.terminated[t], ep.truncated[t], {"termination": ep.termination})


def check_batch(batch: dict, episodes: list[Episode], n_step: int, gamma: float = GAMMA) -> list[tuple]:
    """Assert every row of ``batch`` is a correct n-step transition of ``episodes``; returns the
    ``(episode, t)`` of each row."""
    where = {ep.action[t].tobytes(): (e, t) for e, ep in enumerate(episodes) for t in range(ep.length)}
    found = []
    for i in range(len(batch["action"])):
        e, t = where[batch["action"][i].numpy().tobytes()]
        ep = episodes[e]
        n = min(n_step, ep.length - t)  # never past the episode end
        obs, nxt = ep.observation(t), ep.observation(t + n)
        np.testing.assert_array_equal(batch["obs"]["image"][i].cpu().numpy(), obs["image"])
        np.testing.assert_array_equal(batch["obs"]["vector"][i].numpy(), obs["vector"])
        np.testing.assert_array_equal(batch["next_obs"]["image"][i].cpu().numpy(), nxt["image"])
        np.testing.assert_array_equal(batch["next_obs"]["vector"][i].numpy(), nxt["vector"])
        expected = sum(gamma**j * float(ep.reward[t + j]) for j in range(n))
        assert batch["reward"][i].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert batch["discount"][i].item() == pytest.approx(gamma**n)
        assert batch["done"][i].item() == float(ep.terminated[t + n - 1])
        found.append((e, t))
    return found


def check_dtypes(batch: dict, b: int, spec: ObsSpec = SPEC) -> None:
    k, s, d = spec.frame_stack, spec.image_size, spec.vector_dim
    for key in ("obs", "next_obs"):
        assert batch[key]["image"].dtype == torch.uint8 and batch[key]["image"].shape == (b, k, s, s)
        assert batch[key]["vector"].dtype == torch.float32 and batch[key]["vector"].shape == (b, d)
    assert batch["action"].dtype == torch.float32 and batch["action"].shape == (b, 2)
    for key in ("reward", "done", "discount"):
        assert batch[key].dtype == torch.float32 and batch[key].shape == (b,)
    assert batch["offline"].dtype == torch.bool and batch["offline"].shape == (b,)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """~20 frame chunks: big enough for a reservoir of 2+ segments at a quarter of its size."""
    episodes = random_episodes(100, seed=1)
    return write_store(tmp_path_factory.mktemp("replay") / "big.zarr", episodes), episodes


def store_bytes(url: str) -> int:
    """Decompressed bytes of what the buffer loads: frames, vectors, per-step arrays, offsets."""
    s = TransitionStore(url)
    return (s.num_frames * s.obs_spec.image_size**2 + s.num_observations * 4 * s.obs_spec.vector_dim
            + s.num_transitions * (8 + 4 + 1) + s.num_episodes * 4 * 8)


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, n_step, prefetch, on_device",
    [("memory", 1, 0, False), ("memory", 4, 2, False), ("reservoir", 3, 2, False), ("online", 3, 2, False),
     # frames in a torch tensor (on CPU here; on the GPU with CUDA): the torch gather and write paths
     ("memory", 2, 0, True), ("reservoir", 1, 0, True), ("online", 1, 2, True)],
)
def test_sampled_rows_are_the_stored_transitions(big_store, mode, n_step, prefetch, on_device):
    url, episodes = big_store
    kwargs = dict(n_step=n_step, gamma=GAMMA, prefetch=prefetch, device="cpu", seed=3,
                  frames_on_device=on_device)
    if mode == "online":
        buffer = DictReplayBuffer(None, online_capacity=1000, obs_spec=SPEC, **kwargs)
        feed(buffer, episodes[:40])
    else:
        budget = store_bytes(url) // 4 if mode == "reservoir" else "1GiB"
        buffer = DictReplayBuffer(url, online_capacity=0, memory_budget=budget, refresh_duty=1.0, **kwargs)
        assert buffer.offline_source.mode == mode
    assert isinstance(buffer.offline_source.frames if mode != "online" else buffer.online.frames,
                      torch.Tensor if on_device else np.ndarray)
    with buffer:
        seen = set()
        for _ in range(8):
            batch = buffer.sample(64)
            check_dtypes(batch, 64)
            seen.update(check_batch(batch, episodes, n_step))
            assert bool(batch["offline"].all()) == (mode != "online")
        if mode == "online":
            # the ring keeps the last 1000 transitions; older ones are never sampled
            total = sum(ep.length for ep in episodes[:40])
            first = {(e, t): i for i, (e, t) in enumerate(
                (e, t) for e, ep in enumerate(episodes[:40]) for t in range(ep.length))}
            assert min(first[row] for row in seen) >= total - 1000
        if mode == "reservoir":  # rows stay correct while the refresh thread replaces slots
            deadline = time.monotonic() + 20
            while buffer.offline_source.refreshes < 3 and time.monotonic() < deadline:
                check_batch(buffer.sample(32), episodes, n_step)
            assert buffer.offline_source.refreshes >= 3
        assert len(seen) > 300  # rows are spread, not one transition repeated


def hand_episode(rewards, terminated: bool, seed: int) -> Episode:
    t = len(rewards)
    ep = make_episode(seed, t, SPEC)
    ep.reward = np.asarray(rewards, np.float32)
    ep.terminated = np.zeros(t, bool)
    ep.truncated = np.zeros(t, bool)
    (ep.terminated if terminated else ep.truncated)[-1] = True
    ep.termination = "collision" if terminated else "timeout"
    return ep


# gamma 0.5, n_step 3: (episode, t) -> (reward, discount, done, index of next_obs)
N_STEP_TABLE = {
    (0, 0): (1 + 0.5 * 2 + 0.25 * 3, 0.125, 0.0, 3),
    (0, 1): (2 + 0.5 * 3 + 0.25 * 4, 0.125, 0.0, 4),
    (0, 2): (3 + 0.5 * 4 + 0.25 * 5, 0.125, 1.0, 5),  # terminates at its 3rd step
    (0, 3): (4 + 0.5 * 5, 0.25, 1.0, 5),  # only 2 steps left
    (0, 4): (5.0, 0.5, 1.0, 5),
    (1, 0): (10 + 0.5 * 20 + 0.25 * 30, 0.125, 0.0, 3),
    (1, 1): (20 + 0.5 * 30, 0.25, 0.0, 3),  # truncated: bootstraps from the last obs
    (1, 2): (30.0, 0.5, 0.0, 3),
}


@pytest.mark.parametrize("source", ["offline", "online"])
def test_n_step_targets_by_hand(tmp_path, source):
    episodes = [hand_episode([1, 2, 3, 4, 5], True, 11), hand_episode([10, 20, 30], False, 12)]
    kwargs = dict(n_step=3, gamma=0.5, prefetch=0, device="cpu")
    if source == "offline":
        url = write_store(tmp_path / "hand.zarr", episodes)
        buffer = DictReplayBuffer(url, online_capacity=0, **kwargs)
    else:
        buffer = DictReplayBuffer(None, online_capacity=50, obs_spec=SPEC, **kwargs)
        feed(buffer, episodes)
    with buffer:
        batch = buffer.sample(200)
    rows = check_batch(batch, episodes, 3, gamma=0.5)
    assert set(rows) == set(N_STEP_TABLE)  # 200 draws of 8 transitions reach all of them
    for i, (e, t) in enumerate(rows):
        reward, discount, done, nxt = N_STEP_TABLE[(e, t)]
        assert batch["reward"][i].item() == pytest.approx(reward)
        assert batch["discount"][i].item() == pytest.approx(discount)
        assert batch["done"][i].item() == done
        next_image = episodes[e].observation(nxt)["image"]
        np.testing.assert_array_equal(batch["next_obs"]["image"][i].numpy(), next_image)


def test_running_episode_waits_for_its_n_step_target():
    episodes = [hand_episode([1, 2, 3, 4, 5], True, 11)]
    ep = episodes[0]
    with DictReplayBuffer(None, online_capacity=50, obs_spec=SPEC, n_step=3, gamma=GAMMA, prefetch=0,
                          device="cpu") as buffer:
        with pytest.raises(RuntimeError, match="nothing to sample"):
            buffer.sample(4)
        for t in range(3):
            buffer.add(ep.observation(t), ep.action[t], ep.reward[t], ep.observation(t + 1), False, False)
        assert len(buffer) == 1  # only step 0 has its 3 steps
        rows = check_batch(buffer.sample(16), episodes, 3)
        assert {t for _, t in rows} == {0}


@pytest.mark.parametrize("prefetch", [0, 2])
def test_cpu_batches_recycle_their_buffers(big_store, prefetch):
    # fresh pages for every batch cost more than the gather; the contract is "clone what you keep"
    url, episodes = big_store
    with DictReplayBuffer(url, online_capacity=0, prefetch=prefetch, device="cpu") as buffer:
        pointers = {buffer.sample(32)["obs"]["image"].data_ptr() for _ in range(20)}
        assert len(pointers) <= prefetch + 2
        check_batch(buffer.sample(32), episodes, 1, gamma=0.99)


def test_online_ring_with_short_episodes_keeps_only_whole_transitions():
    # episodes of 1-3 steps need more frames than steps: frames run out before steps do
    episodes = [make_episode(200 + i, 1 + i % 3, SPEC) for i in range(120)]
    with DictReplayBuffer(None, online_capacity=100, obs_spec=SPEC, n_step=2, gamma=GAMMA, prefetch=0,
                          device="cpu") as buffer:
        feed(buffer, episodes)
        assert 0 < len(buffer) < 100
        rows = check_batch(buffer.sample(256), episodes, 2)
        assert min(e for e, _ in rows) >= 120 - 100  # only recent episodes


def test_online_offline_split(big_store):
    url, episodes = big_store
    fresh = [make_episode(70, 50, SPEC)] + random_episodes(6, seed=7)
    with DictReplayBuffer(url, online_capacity=500, online_mix=0.307, gamma=GAMMA, prefetch=2,
                          device="cpu") as buffer:
        assert buffer.sample(100)["offline"].all()
        feed(buffer, fresh[:1])
        assert buffer.online_size == 50
        for _ in range(5):  # the online source joins only once it holds one batch
            assert buffer.sample(100)["offline"].all()
        feed(buffer, fresh[1:])
        assert buffer.online_size >= 100
        for _ in range(5):  # batches prefetched before the ring filled are drained
            batch = buffer.sample(100)
        assert int(batch["offline"].sum()) == 100 - 31  # round(30.7)
        offline = batch["offline"].numpy()
        check_batch({**batch, **_rows(batch, offline)}, episodes, 1)
        check_batch({**batch, **_rows(batch, ~offline)}, fresh, 1)
    with DictReplayBuffer(None, online_capacity=500, online_mix=0.3, obs_spec=SPEC, prefetch=0,
                          device="cpu") as online_only:
        feed(online_only, fresh[:1])
        assert not online_only.sample(100)["offline"].any()  # no offline source: all online


def _rows(batch: dict, mask: np.ndarray) -> dict:
    index = torch.from_numpy(np.flatnonzero(mask))
    return {k: ({kk: vv[index] for kk, vv in v.items()} if isinstance(v, dict) else v[index])
            for k, v in batch.items()}


def test_reservoir_cycles_the_whole_store_within_budget(big_store):
    url, episodes = big_store
    budget = store_bytes(url) // 4
    with DictReplayBuffer(url, online_capacity=0, memory_budget=budget, refresh_duty=0, gamma=GAMMA,
                          prefetch=0, device="cpu") as buffer:
        source = buffer.offline_source
        assert source.mode == "reservoir" and source.n_slots >= 2
        assert buffer.nbytes <= budget
        steps = np.cumsum([0] + [ep.length for ep in episodes])

        def touched() -> set[int]:
            return {e for lo, hi in source.ranges() for e in range(len(episodes))
                    if steps[e] < hi and steps[e + 1] > lo}

        seen = touched()
        assert len(seen) < len(episodes)  # a quarter of the store is not all of it
        bound = source.segments_per_cycle
        for refresh in range(1, bound + 1):
            buffer.refresh()
            seen |= touched()
            assert buffer.nbytes <= budget
            check_batch(buffer.sample(32), episodes, 1)
            if len(seen) == len(episodes):
                break
        assert seen == set(range(len(episodes))), f"{len(seen)} of {len(episodes)} after {refresh}"
        covered = np.zeros(len(TransitionStore(url)), bool)
        for _ in range(bound):  # over one more cycle every transition (not just episode) is sampleable
            buffer.refresh()
            for lo, hi in source.ranges():
                covered[lo:hi] = True
        assert covered.all()


def test_threads_stop_on_close_and_exit(big_store):
    url, _ = big_store

    def ours():
        return [t for t in threading.enumerate() if t.name.startswith("replay-")]

    assert not ours()
    buffer = DictReplayBuffer(url, online_capacity=0, memory_budget=store_bytes(url) // 4, prefetch=3,
                              device="cpu")
    buffer.sample(16)
    assert {t.name for t in ours()} == {"replay-prefetch", "replay-refresh"}
    buffer.close()
    buffer.close()  # idempotent
    assert not ours()
    with pytest.raises(RuntimeError, match="closed"):
        buffer.sample(16)
    with DictReplayBuffer(url, online_capacity=0, prefetch=2, device="cpu") as buffer:
        buffer.sample(16)
        buffer.sample(16)
        assert buffer.wait_seconds > 0  # the first batch had to wait for the thread
        assert ours()
    assert not ours()


def test_dropped_buffer_stops_its_threads_and_thread_errors_reach_sample(big_store):
    url, _ = big_store
    buffer = DictReplayBuffer(url, online_capacity=0, memory_budget=store_bytes(url) // 4, prefetch=2,
                              device="cpu")
    buffer.sample(16)
    threads = [t for t in threading.enumerate() if t.name.startswith("replay-")]
    assert len(threads) == 2
    del buffer  # never closed
    gc.collect()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()

    def broken_disk():
        raise OSError("disk gone")

    with DictReplayBuffer(url, online_capacity=0, memory_budget=store_bytes(url) // 4, prefetch=2,
                          refresh_duty=1.0, device="cpu") as buffer:
        buffer.offline_source.refresh = broken_disk
        with pytest.raises(OSError, match="disk gone"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                buffer.sample(16)


def test_online_episodes_go_to_the_online_store(tmp_path):
    fresh = random_episodes(4, seed=9)
    fresh.append(hand_episode([1.0, 2.0], True, 5))
    online = tmp_path / "online.zarr"
    with DictReplayBuffer(None, online_capacity=100, obs_spec=SPEC, prefetch=0, device="cpu",
                          online_store=online, online_route="racetrack") as buffer:
        feed(buffer, fresh[:3])
        # a reset without terminated/truncated: the unfinished episode stays out of the store
        ep = fresh[3]
        buffer.add(ep.observation(0), ep.action[0], ep.reward[0], ep.observation(1), False, False)
        assert TransitionStore(online).num_episodes == 3  # committed as they complete
        feed(buffer, fresh[4:])
    store = TransitionStore(online)
    assert store.num_episodes == 4
    for i, ep in enumerate(fresh[:3] + fresh[4:]):
        stored = store.episode(i)
        for name in ("frames", "vector", "action", "reward", "terminated", "truncated"):
            np.testing.assert_array_equal(getattr(stored, name), getattr(ep, name))
        assert stored.termination == ep.termination
        assert stored.route == "racetrack"  # online.zarr names its route, so it can be trained on
    with DictReplayBuffer(None, online_capacity=100, obs_spec=SPEC, prefetch=0, device="cpu",
                          online_store=online) as buffer:  # a resumed run appends
        feed(buffer, fresh[:1])
    assert TransitionStore(online).num_episodes == 5


def test_refill_online_restores_the_newest_whole_episodes_of_the_online_store(tmp_path):
    # a resumed run's ring starts with the run's own rollouts, not empty
    episodes = [make_episode(300 + i, 30 + 7 * i, SPEC) for i in range(6)]  # 30, 37, ..., 65 steps
    online = tmp_path / "online.zarr"
    with DictReplayBuffer(None, online_capacity=1000, obs_spec=SPEC, n_step=3, gamma=GAMMA, prefetch=0,
                          device="cpu", online_store=online) as buffer:
        feed(buffer, episodes)
    capacity = 65 + 58 + 10  # room for the two newest episodes only
    with DictReplayBuffer(None, online_capacity=capacity, obs_spec=SPEC, n_step=3, gamma=GAMMA, prefetch=0,
                          device="cpu", online_store=online) as buffer:
        with pytest.raises(RuntimeError, match="nothing to sample"):
            buffer.sample(4)
        assert buffer.refill_online() == 65 + 58
        assert buffer.online_size == 65 + 58  # finished episodes: every step has its n-step target
        rows = check_batch(buffer.sample(512), episodes, 3)
        assert {e for e, _ in rows} == {4, 5}
        assert {t for e, t in rows if e == 5} >= {0, 64}  # first and last steps of an episode
    assert TransitionStore(online).num_episodes == 6  # refilled, not written again


def test_spec_mismatch_is_refused(big_store):
    url, _ = big_store
    with pytest.raises(SpecMismatchError, match="vector_fields.*image_size|image_size"):
        DictReplayBuffer(url, obs_spec=ObsSpec(), device="cpu")
    with pytest.raises(SpecMismatchError, match="image_size"):
        DictReplayBuffer(url, obs_spec=ObsSpec(vector_fields="speed", image_size=32), device="cpu")


def test_bad_arguments_are_one_line_errors(big_store):
    url, _ = big_store
    assert parse_bytes("1.5KiB") == 1536 and parse_bytes("2MB") == 2_000_000
    assert parse_bytes("8G") == 8 * 2**30 and parse_bytes(4096) == 4096
    for bad in ("lots", "-3GB", "0"):
        with pytest.raises(PipelineError, match="memory"):
            parse_bytes(bad)
    with pytest.raises(PipelineError, match="too small"):
        DictReplayBuffer(url, memory_budget="20KB", device="cpu")
    with pytest.raises(PipelineError, match="online mix"):
        DictReplayBuffer(url, online_mix=1.5, device="cpu")
    with pytest.raises(PipelineError, match="obs_spec"):
        DictReplayBuffer(None, device="cpu")
