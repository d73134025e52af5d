"""The dataset store: one Zarr v3 group of frame-deduplicated episodes, crash-safe to append to.

Layout (``F`` frames, ``O`` observations, ``N`` transitions, ``E`` episodes; ``K`` frame stack)::

    frames      uint8   (F, H, W)  chunks (256, H, W)   an episode of T steps adds K - 1 + T + 1
    vector      float32 (O, D)     chunks (8192, D)     T + 1 rows per episode
    action      float32 (N, 2)     chunks (8192, 2)     T rows per episode
    reward      float32 (N,)
    terminated  bool    (N,)
    truncated   bool    (N,)
    expert_action float32 (N, 2) chunks (8192, 2)   the expert's label per step, NaN where none
                                                    (format 2; format-1 stores have no labels)
    episodes/   frame_offset, obs_offset, step_offset, length, seed: int64 (E,);
                return: float64 (E,); route: int16 (E,) index into attrs["routes"];
                termination: int8 (E,) index into ["", *TERMINATIONS];
                source: int16 (E,) index into attrs["sources"], -1 = recorded into this store
    attrs       format, format_version, id (random, names the dataset), obs_spec, action_spec,
                routes, meta, software_version, created, committed_episodes, appends, checksums,
                sources (merged stores), reward (the reward's definition and version, format 2)

Observation ``t`` of episode ``e`` is ``frames[f0 + t : f0 + t + K]`` with ``vector[o0 + t]``,
where ``f0, o0`` are the episode's ``frame_offset, obs_offset``; its transition ``t`` is global
transition ``step_offset + t``.

Crash safety comes from the write order. For each episode the writer (1) resizes and writes the
data arrays, (2) writes the episodes-table row, (3) sets ``committed_episodes`` last. Readers use
only the first ``committed_episodes`` rows, so a process killed at any moment leaves whole episodes
visible (:meth:`EpisodeWriter.stage` writes the data chunks that staged episodes fill before their
commit: more of step (1) done early, the order the same); arrays longer than the committed rows
imply are uncommitted tails, which opening for append cuts off. Each chunk and each metadata
document is replaced atomically by the stores we use (local files via rename, object stores via
PUT), so a kill mid-write never tears committed data.

``attrs["checksums"]`` maps every chunk object's key (``frames/c/3/0/0``) to the sha256 of its
bytes as stored (encoded), recorded by the writer as it writes them and committed together with
``committed_episodes`` (one metadata document), so ``sha256sum a.zarr/frames/c/3/0/0`` matches.
``datasets verify`` and ``push``/``pull`` compare against them (see ``datasets/remote.py``;
the checksum helpers and the store wrappers that record and check them are ``datasets/chunks.py``). A crash
between the data and the commit leaves the chunk holding the committed end rewritten but its
checksum old; that chunk also holds uncommitted rows, which is how verify recognises the case, and
opening for append re-hashes it.

A store is data only. There are no object or string arrays: strings live in attrs as lists and
arrays hold indices. Opening a store checks that before reading any chunk: only the known attrs
keys, numeric dtypes and a short list of plain compression codecs are accepted, so reading a
teammate's store never unpickles or runs anything it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import posixpath
import uuid
from datetime import datetime, timezone

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync

import pipeline
from pipeline.datasets.chunks import CHECKSUM_ALGORITHM, ChecksumStore, ChunkCacheStore, VerifyingStore, chunk_key
from pipeline.datasets.episode import Episode
from pipeline.datasets.urls import exists, fs_path, has_zarr_metadata, reason, zarr_store
from pipeline.envs.spec import TERMINATIONS, ActionSpec, ObsSpec
from pipeline.errors import PipelineError, SpecMismatchError, StoreError

FORMAT_NAME = "pipeline.transitions"
FORMAT_VERSION = 2
#: Versions this code reads. Version 1 stores have no ``expert_action`` and no ``reward`` attr;
#: they stay readable (info, verify, stats), while their obs spec (no camera) keeps them away
#: from envs that draw another picture.
READABLE_VERSIONS = (1, 2)

FRAME_CHUNK = 256
ROW_CHUNK = 8192
EPISODE_CHUNK = 4096
#: ``episodes/termination`` holds an index into this list ("" = not terminated by the env).
TERMINATION_NAMES: tuple[str, ...] = ("", *TERMINATIONS)

# Measured on the car-mounted camera's frames (few grey levels, large flat areas), 256-frame chunks
# (2026-12-06, benchmarks/results/collect_throughput.txt): plain zstd level 1 compresses them ~18x
# and encodes a frame in ~5 us; Blosc's zstd at level 3, used before, compressed them the same
# (~18x) in 13-26 us. Level 5 gains nothing here for 4x the time, and every append pays the encode
# of the partly filled last chunk again. Byte shuffle is a no-op for 1-byte items; bitshuffle
# compressed these frames worse. Numbers keep Blosc for its byte shuffle, which floats need.
_BYTE_CODEC = ZstdCodec(level=1)
_NUMBER_CODEC = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")

#: The data arrays, in the order a writer appends them.
DATA_ARRAYS = ("frames", "vector", "action", "reward", "terminated", "truncated", "expert_action")
#: Data arrays a store of an older format may lack.
_OPTIONAL_ARRAYS = frozenset({"expert_action"})
#: Data arrays with one row per transition.
_TRANSITION_ARRAYS = ("action", "reward", "terminated", "truncated", "expert_action")
#: name -> dtype of the episodes table's columns (``episodes/<name>``).
EPISODE_COLUMNS = {
    "frame_offset": "int64",
    "obs_offset": "int64",
    "step_offset": "int64",
    "length": "int64",
    "return": "float64",
    "seed": "int64",
    "route": "int16",
    "termination": "int8",
    "source": "int16",
}
_DTYPES = {**dict(zip(DATA_ARRAYS, ("uint8", "float32", "float32", "float32", "bool", "bool", "float32"))),
           **{f"episodes/{name}": dtype for name, dtype in EPISODE_COLUMNS.items()}}
#: The only attrs keys a store may hold: anything else is refused as not data we know.
ATTRS_KEYS = frozenset({
    "format", "format_version", "id", "obs_spec", "action_spec", "routes", "meta", "software_version",
    "created", "committed_episodes", "appends", "checksums", "sources", "reward", "unfinished",
})
# Plain zarr v3 codecs; a store naming any other codec (e.g. numcodecs' pickle) is refused.
_SAFE_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "crc32c", "transpose"})


# --------------------------------------------------------------------------------------------
# Reading


def _check_format(url: str, attrs: dict) -> None:
    fmt = attrs.get("format")
    if fmt != FORMAT_NAME:
        raise StoreError(
            f"{url} is not a pipeline dataset (format {fmt!r}, expected {FORMAT_NAME!r})"
        )
    version = attrs.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise StoreError(
            f"{url} has format_version {version!r}, newer than this pipeline reads "
            f"({FORMAT_VERSION}); upgrade pipeline (installed {pipeline.__version__})"
        )
    if version not in READABLE_VERSIONS:
        raise StoreError(
            f"{url} has unsupported format_version {version!r} (this pipeline reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )


def check_data_only(url: str, group: zarr.Group) -> None:
    """Refuse a store holding anything but known JSON attrs and plain numeric arrays.

    Runs before any chunk is read: unknown attrs keys, attrs on arrays or subgroups, non-numeric
    dtypes (object, string), dtypes other than the layout's, zarr v2 arrays and codecs outside a
    short list of plain compressors each raise :class:`StoreError` naming what was found.
    """
    unknown = sorted(set(group.attrs) - ATTRS_KEYS)
    if unknown:
        raise StoreError(f"{url} has unexpected attrs key(s) {', '.join(map(repr, unknown))}; "
                         "a dataset store holds only its known attributes")
    try:
        members = list(group.members(max_depth=None))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zarr.errors.BaseZarrError) as e:
        raise StoreError(f"{url} has an array zarr cannot open: {reason(e)}") from None
    for name, member in members:
        if dict(member.attrs):
            raise StoreError(f"{url}: {name} has attributes; a dataset keeps attributes at the top only")
        if not isinstance(member, zarr.Array):
            continue
        dtype = np.dtype(member.dtype) if isinstance(member.dtype, np.dtype) else None
        if member.metadata.zarr_format != 3 or dtype is None or dtype.kind not in "biuf":
            raise StoreError(f"{url}: array {name} has dtype {member.dtype} (zarr format "
                             f"{member.metadata.zarr_format}); a dataset holds only numeric zarr v3 arrays")
        if name in _DTYPES and dtype != np.dtype(_DTYPES[name]):
            raise StoreError(f"{url}: array {name} has dtype {dtype}, expected {_DTYPES[name]}")
        codecs = {c.to_dict()["name"] for c in member.metadata.codecs}
        if codecs - _SAFE_CODECS:
            raise StoreError(f"{url}: array {name} uses codec(s) {sorted(codecs - _SAFE_CODECS)}; "
                             f"allowed: {sorted(_SAFE_CODECS)}")


def open_group(url: str, storage_options: dict | None, read_only: bool, store=None) -> zarr.Group:
    """Open an existing pipeline dataset group, or raise :class:`StoreError` saying why not.

    ``store`` (a zarr store for ``url``) defaults to the plain one for the URL.
    """
    fs, path = fs_path(url, storage_options)
    if not exists(fs, path):
        raise StoreError(f"no dataset store at {url}")
    if not has_zarr_metadata(fs, path):
        raise StoreError(f"{url} is not a pipeline dataset (no zarr group there)")
    try:
        group = zarr.open_group(
            store or zarr_store(url, storage_options, read_only), mode="r" if read_only else "r+"
        )
    except (TypeError, AttributeError):  # JSON, but not a metadata document (say [1, 2, 3])
        raise StoreError(f"{url} is not a readable zarr group: its zarr.json is not zarr metadata") from None
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as e:
        raise StoreError(f"{url} is not a readable zarr group: {reason(e)}") from None
    _check_format(url, dict(group.attrs))
    check_data_only(url, group)
    return group


def committed_ends(table: dict[str, np.ndarray], frame_stack: int) -> dict[str, int]:
    """Rows of each data array (and ``episodes/<column>``) that the committed ``table`` occupies."""
    n = len(table["length"])
    ends = dict.fromkeys(DATA_ARRAYS, 0)
    if n:
        t = int(table["length"][-1])
        ends["frames"] = int(table["frame_offset"][-1]) + frame_stack + t
        ends["vector"] = int(table["obs_offset"][-1]) + t + 1
        for name in _TRANSITION_ARRAYS:
            ends[name] = int(table["step_offset"][-1]) + t
    ends.update({f"episodes/{name}": n for name in EPISODE_COLUMNS})
    return ends


def _arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """Every array of the store by path (``frames``, ``episodes/length``): one concurrent round
    of metadata reads, instead of one read per ``group[name]``."""
    return {name: member for name, member in group.members(max_depth=None) if isinstance(member, zarr.Array)}


def _read_table(arrays: dict[str, zarr.Array], n: int) -> dict[str, np.ndarray]:
    table = {}
    for name, dtype in EPISODE_COLUMNS.items():
        if name == "source" and f"episodes/{name}" not in arrays:
            table[name] = np.full(n, -1, dtype)  # written before stores recorded provenance
        else:
            table[name] = np.asarray(arrays[f"episodes/{name}"][:n])
    return table


def table_problems(table: dict[str, np.ndarray], attrs: dict, k: int) -> list[tuple[str, str]]:
    """``(column, message)`` for each way the episodes ``table`` fails to tile the data arrays
    (offsets must follow from the lengths) or indexes an unknown route, termination or source."""
    found = []
    length = table["length"].astype(np.int64)
    if len(length) and length.min() < 0:
        found.append(("episodes/length", "negative episode length"))
    for column, per_episode in (("frame_offset", k + length), ("obs_offset", length + 1),
                                ("step_offset", length)):
        expected = np.concatenate([[0], np.cumsum(per_episode)[:-1]]).astype(np.int64)[: len(length)]
        bad = np.flatnonzero(table[column] != expected)
        if len(bad):
            i = bad[0]
            found.append((f"episodes/{column}", f"episode {i} starts at {table[column][i]}, expected {expected[i]}"))
    for column, count, low in (("route", len(attrs.get("routes", [])), 0),
                               ("termination", len(TERMINATION_NAMES), 0),
                               ("source", len(attrs.get("sources", [])), -1)):
        bad = np.flatnonzero((table[column] < low) | (table[column] >= count))
        if len(bad):
            i = bad[0]
            found.append((f"episodes/{column}",
                          f"episode {i} has {column} index {table[column][i]}, outside the {count} known"))
    return found


def _tail_chunks(arrays: dict[str, zarr.Array], ends: dict[str, int]) -> set[str]:
    """Keys of the chunks holding both the committed end of an array and rows past it."""
    keys = set()
    for name, end in ends.items():
        array = arrays.get(name)
        if array is not None and array.shape[0] > end and end % array.chunks[0]:
            keys.add(chunk_key(array, end // array.chunks[0]))
    return keys


def _committed(url: str, group: zarr.Group, verifier: VerifyingStore | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, zarr.Array]]:
    """The committed rows of the episodes table, the rows of each data array they occupy, and
    the store's arrays by path.

    Refuses (:class:`StoreError`) a table that is short, unreadable or does not agree with the
    data arrays, so no reader computes on a damaged table. ``verifier`` (the group's
    :class:`VerifyingStore`) is told which tail chunks may differ from their checksums.
    """
    n = group.attrs.get("committed_episodes", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise StoreError(f"{url} is corrupt: committed_episodes is {n!r}, not a count")
    k = int(group.attrs["obs_spec"]["frame_stack"])
    try:
        arrays = _arrays(group)
        columns = {f"episodes/{name}": n for name in EPISODE_COLUMNS}
        if verifier is not None:
            verifier.tolerate(_tail_chunks(arrays, columns))
        table = _read_table(arrays, n)
    except KeyError as e:
        raise StoreError(f"{url} is corrupt: missing array {e}") from None
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged chunk read unverified may fail in any codec
        raise StoreError(f"{url}: cannot read the episodes table ({reason(e)})") from None
    if any(len(column) < n for column in table.values()):
        raise StoreError(f"{url} is corrupt: the episodes table has fewer than {n} committed rows")
    problems = table_problems(table, dict(group.attrs), k)
    if problems:
        where, message = problems[0]
        raise StoreError(f"{url} is corrupt: {where}: {message} (the episodes table does not agree "
                         f"with the arrays; see `pipeline datasets verify {url}`)")
    ends = committed_ends(table, k)
    for name, end in ends.items():
        array = arrays.get(name)
        if array is None and name in _OPTIONAL_ARRAYS:
            continue  # (expert_action, which format-1 stores lack)
        if array is None:
            raise StoreError(f"{url} is corrupt: missing array {name}")
        if array.shape[0] < end:
            raise StoreError(f"{url} is corrupt: {name} has {array.shape[0]} rows, its committed "
                             f"episodes need {end}")
    if verifier is not None:
        verifier.tolerate(_tail_chunks(arrays, ends))
    return table, ends, arrays


def unfinished_line(marker: dict) -> str:
    """What an interrupted merge's marker says, and the command that completes it."""
    sources = " ".join(marker.get("sources", []))
    return (f"stopped before its {marker.get('episodes')} episodes were all written; complete it with "
            f"`pipeline datasets merge {sources} -o {marker.get('out')} --resume` or replace it with --overwrite")


class TransitionStore:
    """Read-only view of the committed episodes of a store.

    Counts and :attr:`episodes` cover committed episodes only. The zarr arrays (``frames``,
    ``vector``, ``action``, ``reward``, ``terminated``, ``truncated``) may be longer than that
    (an append in progress, or a crashed one): index them through the episode offsets.
    """

    def __init__(self, url: str, storage_options: dict | None = None, cache: str | None = None,
                 verify: bool = True, allow_unfinished: bool = False):
        """``url``: a path or any fsspec URL (``s3://bucket/a.zarr``; chained ones such as
        ``simplecache::s3://...`` too). ``cache``: a local folder keeping a copy of every chunk
        read, keyed by its checksum, so a second run reads a remote store from disk and a chunk
        that changed remotely (the store grew) is fetched again (see ``datasets/chunks.py``).

        ``verify``: check every chunk read (the episodes table, and whatever is read from the
        arrays later) against its recorded sha256 as it is fetched; a missing or damaged chunk
        raises :class:`StoreError` instead of reading as zeros or garbage. ``allow_unfinished``:
        open a store an interrupted ``datasets merge`` left (refused by default: it is not whole).
        """
        self.url = str(url)
        store = None
        if cache is not None:
            store = ChunkCacheStore(zarr_store(self.url, storage_options, True), cache)
        verifier = None
        if verify:
            store = verifier = VerifyingStore(store or zarr_store(self.url, storage_options, True), self.url)
        self.group = open_group(self.url, storage_options, read_only=True, store=store)
        self.attrs: dict = dict(self.group.attrs)
        recorded = self.attrs.get("checksums") or {}
        chunks = recorded.get("chunks") if recorded.get("algorithm") == CHECKSUM_ALGORITHM else None
        if verify and not isinstance(chunks, dict):
            raise StoreError(f"{self.url} records no {CHECKSUM_ALGORITHM} chunk checksums; "
                             "pass --no-verify to read it unverified")
        if cache is not None:
            (store._store if verify else store).checksums = dict(chunks or {})
        if verifier is not None:
            verifier.arm(dict(chunks))
        #: An interrupted ``datasets merge``: what it was doing (None for a whole store).
        self.unfinished: dict | None = self.attrs.get("unfinished")
        if self.unfinished and not allow_unfinished:
            raise StoreError(f"{self.url} is an unfinished merge ({unfinished_line(self.unfinished)})")
        self.meta: dict = dict(self.attrs.get("meta") or {})
        self.routes: list[str] = list(self.attrs.get("routes", []))
        #: Merged stores: where each source came from (``episodes["source"]`` indexes this).
        self.sources: list[dict] = list(self.attrs.get("sources", []))
        try:
            self.obs_spec = ObsSpec.from_dict(self.attrs["obs_spec"])
            self.action_spec = ActionSpec.from_dict(self.attrs["action_spec"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"{self.url} has an invalid observation/action spec ({reason(e)})") from None
        self.episodes, ends, arrays = _committed(self.url, self.group, verifier)
        self.frames: zarr.Array = arrays["frames"]
        self.vector: zarr.Array = arrays["vector"]
        self.action: zarr.Array = arrays["action"]
        self.reward: zarr.Array = arrays["reward"]
        self.terminated: zarr.Array = arrays["terminated"]
        self.truncated: zarr.Array = arrays["truncated"]
        #: The expert's labels (float32 (N, 2), NaN where none), or None in a format-1 store.
        self.expert_action: zarr.Array | None = arrays.get("expert_action")
        #: The recorded reward definition (``RewardConfig.to_dict()``), None in a format-1 store.
        self.reward_definition: dict | None = self.attrs.get("reward")
        self.num_episodes = len(self.episodes["length"])
        self.num_transitions = ends["action"]
        self.num_frames = ends["frames"]
        self.num_observations = ends["vector"]

    def __len__(self) -> int:
        return self.num_transitions

    def __repr__(self) -> str:
        return (
            f"TransitionStore({self.url!r}, episodes={self.num_episodes}, "
            f"transitions={self.num_transitions})"
        )

    def _episode_index(self, i: int) -> int:
        if not -self.num_episodes <= i < self.num_episodes:
            raise IndexError(f"episode {i} out of range ({self.num_episodes} committed)")
        return i % self.num_episodes

    def episode(self, i: int) -> Episode:
        """Committed episode ``i``, bit-exact. ``info`` is not stored and comes back empty."""
        i = self._episode_index(i)
        row = {name: col[i].item() for name, col in self.episodes.items()}
        f0, o0, s0, t = row["frame_offset"], row["obs_offset"], row["step_offset"], row["length"]
        k = self.obs_spec.frame_stack
        return Episode(
            frames=np.asarray(self.frames[f0 : f0 + k + t]),
            vector=np.asarray(self.vector[o0 : o0 + t + 1]),
            action=np.asarray(self.action[s0 : s0 + t]),
            reward=np.asarray(self.reward[s0 : s0 + t]),
            terminated=np.asarray(self.terminated[s0 : s0 + t]),
            truncated=np.asarray(self.truncated[s0 : s0 + t]),
            expert_action=None if self.expert_action is None else np.asarray(self.expert_action[s0 : s0 + t]),
            route=self.routes[row["route"]],
            seed=row["seed"],
            termination=TERMINATION_NAMES[row["termination"]],
        )

    def transition(self, i: int) -> dict:
        """Global transition ``i`` as ``{obs, action, reward, next_obs, terminated, truncated}``.

        ``obs``/``next_obs`` are ``{'image': uint8 (K, H, W), 'vector': float32 (D,)}``; ``action``
        float32 ``(2,)``; ``reward`` a float32 scalar; the flags Python bools. One read per array:
        meant for inspection and tests, not for sampling batches (see ``datasets/replay/``).
        """
        if not 0 <= i < self.num_transitions:
            raise IndexError(f"transition {i} out of range ({self.num_transitions} committed)")
        e = int(np.searchsorted(self.episodes["step_offset"], i, side="right")) - 1
        t = i - int(self.episodes["step_offset"][e])
        f = int(self.episodes["frame_offset"][e]) + t
        o = int(self.episodes["obs_offset"][e]) + t
        k = self.obs_spec.frame_stack
        images = np.asarray(self.frames[f : f + k + 1])
        vectors = np.asarray(self.vector[o : o + 2])
        return {
            "obs": {"image": images[:k], "vector": vectors[0]},
            "action": np.asarray(self.action[i]),
            "reward": np.float32(self.reward[i]),
            "next_obs": {"image": images[1:], "vector": vectors[1]},
            "terminated": bool(self.terminated[i]),
            "truncated": bool(self.truncated[i]),
        }

    def read_frames(self, start: int, stop: int) -> np.ndarray:
        """Committed frames ``[start, stop)`` as uint8 ``(stop - start, H, W)``.

        Streaming readers should step through chunk-aligned ranges (``self.frames.chunks[0]``
        frames each): every chunk touched is fetched and decoded whole.
        """
        if not 0 <= start <= stop <= self.num_frames:
            raise IndexError(f"frames [{start}, {stop}) out of range ({self.num_frames} committed)")
        return np.asarray(self.frames[start:stop])

    def nbytes_stored(self) -> int:
        """Bytes the store occupies on disk or remote (every array, metadata included)."""
        store_path = self.group.store_path
        return int(sync(store_path.store.getsize_prefix(store_path.path)))

    def summary(self) -> dict:
        """JSON-able description: counts, returns, routes, policy, specs, size, provenance."""
        returns, lengths = self.episodes["return"], self.episodes["length"]
        stored = self.nbytes_stored()

        def counts(names, indices) -> dict[str, int]:
            found = np.bincount(indices.astype(np.int64), minlength=len(names))
            return {names[j]: int(c) for j, c in enumerate(found) if c}

        def stat(fn, values):
            return float(fn(values)) if len(values) else None

        return {
            "url": self.url,
            "format": self.attrs.get("format"),
            "format_version": self.attrs.get("format_version"),
            "episodes": self.num_episodes,
            "transitions": self.num_transitions,
            "frames": self.num_frames,
            "observations": self.num_observations,
            "return_mean": stat(np.mean, returns),
            "return_min": stat(np.min, returns),
            "return_max": stat(np.max, returns),
            "length_mean": stat(np.mean, lengths),
            "routes": counts(self.routes, self.episodes["route"]),
            "terminations": counts(TERMINATION_NAMES, self.episodes["termination"]),
            "policy": self.meta.get("policy"),
            "obs_spec": self.obs_spec.to_dict(),
            "action_spec": self.action_spec.to_dict(),
            "reward": self.reward_definition,
            "labelled_transitions": None if self.expert_action is None else int(
                np.isfinite(np.asarray(self.expert_action[: self.num_transitions])[:, 0]).sum()),
            "bytes_stored": stored,
            "bytes_per_transition": stored / self.num_transitions if self.num_transitions else None,
            "created": self.attrs.get("created"),
            "software_version": self.attrs.get("software_version"),
            "meta": self.meta,
            "appends": list(self.attrs.get("appends", [])),
            "sources": [
                {**source, "episodes_here": int(np.sum(self.episodes["source"] == j))}
                for j, source in enumerate(self.sources)
            ],
            "recorded_here": int(np.sum(self.episodes["source"] < 0)),
            "unfinished": unfinished_line(self.unfinished) if self.unfinished else None,
        }


def open_store(url: str, storage_options: dict | None = None, cache: str | None = None) -> TransitionStore:
    """Open a dataset store for reading (see :class:`TransitionStore`)."""
    return TransitionStore(url, storage_options, cache)


# --------------------------------------------------------------------------------------------
# Writing


class _Column:
    """One appendable array plus a copy of the committed rows in its partially filled last chunk.

    Rows are staged (:meth:`stage`), written (:meth:`write`) and then committed (:meth:`commit`).
    A write covers whole chunks only: from the chunk holding the committed end (its committed rows
    come from ``tail``) on, the last one padded with the fill value. So zarr never reads a chunk
    back, and the array is resized only when it needs another chunk; until :meth:`trim` its length
    is a whole number of chunks, past the committed end. ``write(whole_chunks_only=True)`` writes
    just the chunks the staged rows have filled, so a writer can compress them as they come and
    leave only the last, partial chunk for its commit.
    """

    def __init__(self, array: zarr.Array, end: int):
        # write_empty_chunks skips zarr's is-it-all-fill-value scan of every chunk written
        # (~1.5 ms per frame chunk); an all-zero chunk is rare and costs little to store.
        self.array = array.async_array.with_config({"write_empty_chunks": True})
        self.end = end
        self.chunk = array.chunks[0]
        # at a chunk boundary (a new store) there is nothing to read back: each read costs a
        # round trip to zarr's event loop, and a store's 16 of them were a third of its creation
        self.tail = (np.zeros((0, *array.shape[1:]), array.dtype) if end % self.chunk == 0
                     else np.asarray(array[end - end % self.chunk : end]))
        self.discard()

    def discard(self) -> None:
        """Forget the staged rows (after a failed write): the next write starts at the committed end."""
        self._start = self.end - len(self.tail)  # the first row not yet in a whole written chunk
        self._unwritten = [self.tail]  # the rows from _start on: the committed tail, then staged rows
        self._num_unwritten = len(self.tail)
        self._staged = 0  # rows staged after the committed end
        self._fresh = False  # rows staged since the last write

    def stage(self, rows: np.ndarray) -> None:
        """Add ``rows`` after the committed end and the rows staged before (nothing is written yet)."""
        self._unwritten.append(rows)
        self._num_unwritten += len(rows)
        self._staged += len(rows)
        self._fresh = self._fresh or len(rows) > 0

    async def write(self, whole_chunks_only: bool = False) -> None:
        """Write the staged rows: all of them (the last chunk padded), or only the chunks they fill."""
        count = self._num_unwritten // self.chunk * self.chunk
        if (whole_chunks_only and count == 0) or not self._fresh:
            return
        rows = np.concatenate(self._unwritten) if len(self._unwritten) > 1 else self._unwritten[0]
        if not whole_chunks_only:
            count = -(-len(rows) // self.chunk) * self.chunk
        block = rows[:count]
        if len(block) < count:
            block = np.zeros((count, *rows.shape[1:]), rows.dtype)
            block[: len(rows)] = rows
        if self.array.shape[0] < self._start + count:
            await self.array.resize((self._start + count, *self.array.shape[1:]))
        await self.array.setitem(slice(self._start, self._start + count), block)
        # Rows in whole chunks are on disk for good; the rest stays for the next write.
        done = len(rows) // self.chunk * self.chunk
        self._start += done
        self._unwritten = [rows[done:].copy() if done else rows]
        self._num_unwritten = len(rows) - done
        self._fresh = whole_chunks_only and self._num_unwritten > 0

    def commit(self) -> None:
        """The last :meth:`write` covered every staged row: move the end past them."""
        self.end += self._staged
        # a copy: the staged rows may be the caller's arrays, which are theirs again after the commit
        self.tail = np.concatenate(self._unwritten) if len(self._unwritten) > 1 else self._unwritten[0].copy()
        self.discard()

    async def trim(self) -> None:
        """Cut the array to the committed end (drops padding and any uncommitted rows)."""
        if self.array.shape[0] != self.end:
            await self.array.resize((self.end, *self.array.shape[1:]))

    def tail_key(self) -> str | None:
        """Store key of the chunk holding the committed end, or None when the end is aligned."""
        if self.end % self.chunk == 0:
            return None
        return chunk_key(self.array, self.end // self.chunk)

    @property
    def fills_a_chunk(self) -> bool:
        """Whether the rows not yet written fill a whole chunk."""
        return self._num_unwritten >= self.chunk

    @property
    def staged_end(self) -> int:
        """The end after the staged rows."""
        return self.end + self._staged


def interrupted_creation(url: str, storage_options: dict | None = None) -> bool:
    """True for what a writer killed while creating a store leaves, which holds no episode: the
    layout's arrays under a root group without attributes (they are written last), or not even
    the root document. zarr's local writes go through ``<name>.<uuid>.partial`` files, which a
    kill leaves behind too."""
    fs, path = fs_path(url, storage_options)
    try:
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
        names = {name for name in names if not name.endswith(".partial")}
        if "zarr.json" not in names:
            return not names  # the root document is written first: before it, only leftovers
        root = json.loads(fs.cat_file(path.rstrip("/") + "/zarr.json"))
    except (OSError, ValueError):
        return False
    return (isinstance(root, dict) and root.get("node_type") == "group" and not root.get("attributes")
            and names <= {"zarr.json", "episodes", *DATA_ARRAYS})


def check_destination(url: str, mode: str, storage_options: dict | None = None) -> bool:
    """Whether something is at ``url``; raises the :class:`StoreError` an :class:`EpisodeWriter`
    opened there with ``mode`` would: ``"create"`` refuses anything that exists, ``"overwrite"``
    anything that is not a zarr store (a mistyped --out must not wipe an unrelated directory).
    A collector checks this before driving while its writer creates the store."""
    fs, path = fs_path(url, storage_options)
    present = exists(fs, path)
    if mode == "create" and present:
        raise StoreError(f"{url} already exists; pass --resume to continue it or --overwrite to replace it")
    if mode == "overwrite" and present and not has_zarr_metadata(fs, path):
        raise StoreError(f"refusing to overwrite {url}: it exists and is not a zarr store")
    return present


def remove_store(url: str, storage_options: dict | None = None) -> None:
    """Delete the zarr store at ``url`` (nothing happens where there is none)."""
    fs, path = fs_path(url, storage_options)
    if not has_zarr_metadata(fs, path):
        return
    try:
        fs.rm(path, recursive=True)
    except OSError as e:
        raise StoreError(f"cannot delete {url}: {reason(e)}") from None


def _gather(*coroutines) -> None:
    """Run zarr writes concurrently on zarr's event loop: encoding and I/O of arrays overlap."""

    async def run_all():
        await asyncio.gather(*coroutines)

    sync(run_all())


def _json_meta(meta: dict | None) -> dict:
    try:
        return json.loads(json.dumps(dict(meta or {})))
    except (TypeError, ValueError) as e:
        raise StoreError(f"dataset meta must be JSON-serialisable: {e}") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class EpisodeWriter:
    """Appends whole episodes to a store; the only writer of that store while it is open.

    ``mode``: ``"create"`` (nothing may exist at ``url``), ``"append"`` (continue an existing store
    of the same specs, cutting off uncommitted tails; creates when nothing exists) or
    ``"overwrite"`` (delete the zarr store at ``url``, then create). ``sources`` (new stores only):
    where the episodes come from when the store is made from other stores (``datasets merge``),
    one JSON-able dict per source; :meth:`append` takes the index of each episode's source.
    ``reward``: the definition of the rewards recorded (``RewardConfig.to_dict()``), kept in
    ``attrs["reward"]``; appending episodes of another definition is refused.

    >>> with EpisodeWriter("runs/a.zarr", ObsSpec(), meta={"policy": "random"}) as writer:
    ...     writer.append(episode)          # returns the committed episode count
    """

    def __init__(
        self,
        url: str,
        obs_spec: ObsSpec,
        action_spec: ActionSpec = ActionSpec(),
        meta: dict | None = None,
        mode: str = "create",
        storage_options: dict | None = None,
        sources: list[dict] | None = None,
        reward: dict | None = None,
        unfinished: dict | None = None,
    ):
        if mode not in ("create", "append", "overwrite"):
            raise ValueError(f"mode must be 'create', 'append' or 'overwrite', not {mode!r}")
        self.url, self.obs_spec, self.action_spec = str(url), obs_spec, action_spec
        self.storage_options = storage_options
        self.reward = _json_meta(reward) if reward is not None else None
        meta = _json_meta(meta)
        fs, path = fs_path(self.url, storage_options)
        present = check_destination(self.url, mode, storage_options)
        if mode == "overwrite" and present:
            remove_store(self.url, storage_options)
            present = False
        elif mode == "append" and present and interrupted_creation(self.url, storage_options):
            try:  # a creation cut short holds no episode: appending to it starts it again
                fs.rm(path, recursive=True)
            except OSError as e:
                raise StoreError(f"cannot delete {self.url}: {reason(e)}") from None
            present = False
        if sources is not None and mode == "append" and present:
            raise ValueError("sources can only be given to a new store")
        # Every chunk written or deleted goes through this store, which keeps the checksums.
        self._store = ChecksumStore(zarr_store(self.url, storage_options, False))
        self._unfinished = _json_meta(unfinished) if unfinished else None
        try:
            if mode == "append" and present:
                self.group = self._open_for_append(meta)
            else:
                self.group = self._create(meta, _json_meta({"sources": sources or []})["sources"])
        except OSError as e:
            raise StoreError(f"cannot write dataset store at {self.url}: {reason(e)}") from None
        self._routes: list[str] = list(self.group.attrs["routes"])
        self._staged_routes, self._staged_episodes = list(self._routes), 0
        self._num_sources = len(self.group.attrs.get("sources", []))
        self._closed = False

    # -- opening

    def _create(self, meta: dict, sources: list[dict]) -> zarr.Group:
        s, d, a = self.obs_spec.image_size, self.obs_spec.vector_dim, self.action_spec.dim
        specs = {  # name -> (shape, chunks, dtype, codec, dimension names)
            "frames": ((0, s, s), (FRAME_CHUNK, s, s), "uint8", _BYTE_CODEC, ("frame", "y", "x")),
            "vector": ((0, d), (ROW_CHUNK, d), "float32", _NUMBER_CODEC, ("observation", "field")),
            "action": ((0, a), (ROW_CHUNK, a), "float32", _NUMBER_CODEC, ("transition", "field")),
            "reward": ((0,), (ROW_CHUNK,), "float32", _NUMBER_CODEC, ("transition",)),
            "terminated": ((0,), (ROW_CHUNK,), "bool", _BYTE_CODEC, ("transition",)),
            "truncated": ((0,), (ROW_CHUNK,), "bool", _BYTE_CODEC, ("transition",)),
            "expert_action": ((0, a), (ROW_CHUNK, a), "float32", _NUMBER_CODEC, ("transition", "field")),
            **{f"episodes/{name}": ((0,), (EPISODE_CHUNK,), dtype, _NUMBER_CODEC, ("episode",))
               for name, dtype in EPISODE_COLUMNS.items()},
        }

        async def create_all():
            # the 16 arrays at once on zarr's event loop (one after another they took ~25 ms)
            group = await zarr.api.asynchronous.open_group(store=self._store, mode="w-")
            await group.create_group("episodes")
            created = await asyncio.gather(*(
                # a chunk that is missing reads as NaN labels, never as plausible zero actions
                group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=codec,
                                   fill_value=False if dtype == "bool" else (
                                       float("nan") if name == "expert_action" else 0),
                                   dimension_names=dims)
                for name, (shape, chunks, dtype, codec, dims) in specs.items()))
            return zarr.Group(group), dict(zip(specs, map(zarr.Array, created)))

        group, arrays = sync(create_all())
        # The format attrs go last: a store whose creation was interrupted is "not a pipeline
        # dataset" (replace it with --overwrite) rather than a half-made one.
        group.update_attributes(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "id": uuid.uuid4().hex,
                "obs_spec": self.obs_spec.to_dict(),
                "action_spec": self.action_spec.to_dict(),
                "routes": [],
                "meta": meta,
                "software_version": pipeline.__version__,
                "created": _now(),
                "committed_episodes": 0,
                "appends": [],
                "checksums": self._checksums_attr(),
                "sources": sources,
                "reward": self.reward,
                # A store filled from others (merge) is marked unfinished in the same document
                # that makes it a dataset, until finish() clears the mark.
                **({"unfinished": self._unfinished} if self._unfinished else {}),
            }
        )
        self._columns = {name: _Column(arrays[name], 0) for name in DATA_ARRAYS}
        self._table = {name: _Column(arrays[f"episodes/{name}"], 0) for name in EPISODE_COLUMNS}
        self._committed = 0
        return group

    def _open_for_append(self, meta: dict) -> zarr.Group:
        group = open_group(self.url, self.storage_options, read_only=False, store=self._store)
        attrs = dict(group.attrs)
        if attrs.get("unfinished") and attrs["unfinished"] != self._unfinished:
            raise StoreError(f"{self.url} is an unfinished merge ({unfinished_line(attrs['unfinished'])})")
        self._store.checksums.update((attrs.get("checksums") or {}).get("chunks", {}))
        stored = ObsSpec.from_dict(attrs["obs_spec"])
        self.obs_spec.check_compatible(stored, f"dataset store {self.url}")
        self.action_spec.check_compatible(ActionSpec.from_dict(attrs["action_spec"]), f"dataset store {self.url}")
        from pipeline.envs.driving import reward_difference

        difference = reward_difference(attrs.get("reward"), self.reward)
        if difference:
            raise StoreError(f"dataset store {self.url} holds rewards of another definition ({difference}); "
                             "record into a new store")
        if "expert_action" not in group:
            raise StoreError(f"dataset store {self.url} is format {attrs.get('format_version')}; "
                             f"record into a new store to append (this pipeline writes format {FORMAT_VERSION})")
        table, ends, _ = _committed(self.url, group)
        self._committed = len(table["length"])
        if "source" not in group["episodes"]:  # a store from before provenance was recorded
            column = group["episodes"].create_array(
                "source", shape=(self._committed,), chunks=(EPISODE_CHUNK,), dtype="int16",
                compressors=_NUMBER_CODEC, fill_value=0, dimension_names=("episode",))
            column[:] = table["source"]
        self._columns = {name: _Column(group[name], ends[name]) for name in DATA_ARRAYS}
        self._table = {
            name: _Column(group["episodes"][name], self._committed) for name in EPISODE_COLUMNS
        }
        # A writer that died between its data and its commit rewrote the chunk holding each
        # committed end (committed rows + its uncommitted ones): record what is there now, then
        # cut off what it left past the committed rows before anything is added.
        columns = (*self._columns.values(), *self._table.values())
        _gather(*(self._store.rehash(c.tail_key()) for c in columns
                  if c.tail_key() and c.array.shape[0] > c.end))
        self._trim()
        appends = list(attrs.get("appends", []))
        appends.append(
            {"opened": _now(), "first_episode": self._committed, "meta": meta,
             "software_version": pipeline.__version__}
        )
        group.update_attributes({"appends": appends, "checksums": self._checksums_attr()})
        return group

    def _checksums_attr(self) -> dict:
        return {"algorithm": CHECKSUM_ALGORITHM, "chunks": dict(self._store.checksums)}

    # -- appending

    @property
    def committed_episodes(self) -> int:
        return self._committed

    @property
    def num_transitions(self) -> int:
        """Committed transitions."""
        return self._columns["action"].end

    def _check_episode(self, ep: Episode) -> dict[str, np.ndarray]:
        """The episode's arrays in the store's dtypes; SpecMismatchError on a wrong shape."""
        t, k, s = ep.length, self.obs_spec.frame_stack, self.obs_spec.image_size
        expected = {
            "frames": ((k + t, s, s), np.uint8),
            "vector": ((t + 1, self.obs_spec.vector_dim), np.float32),
            "action": ((t, self.action_spec.dim), np.float32),
            "reward": ((t,), np.float32),
            "terminated": ((t,), np.bool_),
            "truncated": ((t,), np.bool_),
            "expert_action": ((t, self.action_spec.dim), np.float32),
        }
        arrays = {}
        for name, (shape, dtype) in expected.items():
            value = getattr(ep, name)
            value = np.full(shape, np.nan, dtype) if value is None else np.asarray(value)
            if value.shape != shape:
                raise SpecMismatchError(
                    f"episode {name} has shape {value.shape}, the store expects {shape} "
                    f"({t} steps, frame_stack {k})"
                )
            arrays[name] = np.ascontiguousarray(value, dtype=dtype)
        if ep.termination not in TERMINATION_NAMES:
            raise ValueError(f"unknown termination {ep.termination!r}; known: {TERMINATION_NAMES}")
        return arrays

    def append(self, episode: Episode, source: int = -1) -> int:
        """Write one whole episode and commit it; returns the new committed episode count.

        ``source``: index into the store's ``sources`` (-1: recorded into this store).
        Raises :class:`StoreError` if the store cannot be written; the episodes committed before
        stay intact and the next ``append`` (or an append-open) overwrites the partial one.
        """
        return self.append_many([episode], [source])

    def append_many(self, episodes: list[Episode], sources: list[int] | None = None) -> int:
        """Write several whole episodes and commit them together; returns the committed count.

        Same guarantees as :meth:`append`, with one data write, one row write and one commit for
        the lot, which is what keeps a writer of many short episodes off the collector's back.
        """
        self.stage(episodes, sources)
        return self.commit()

    def stage(self, episodes: list[Episode], sources: list[int] | None = None) -> None:
        """Add whole episodes to the next :meth:`commit`; none is visible before it.

        The frame chunks they fill are compressed and written now, so a commit is left with the
        last, partial chunk of each array only. Their arrays are read until that commit: do not
        change them before. A bad episode (wrong shape, unknown source or termination) raises
        before any of ``episodes`` is staged; a failed write drops everything staged.
        """
        if self._closed:
            raise StoreError(f"writer for {self.url} is closed")
        sources = [-1] * len(episodes) if sources is None else list(sources)
        if len(sources) != len(episodes):
            raise ValueError("give one source per episode")
        routes = list(self._staged_routes)
        ends = {name: self._columns[name].staged_end for name in ("frames", "vector", "action")}
        data: dict[str, list[np.ndarray]] = {}
        rows: dict[str, list] = {name: [] for name in EPISODE_COLUMNS}
        for episode, source in zip(episodes, sources):
            if not -1 <= source < self._num_sources:
                raise ValueError(f"source {source} out of range ({self._num_sources} sources)")
            arrays = self._check_episode(episode)
            if episode.route not in routes:
                routes.append(episode.route)
            row = {
                "frame_offset": ends["frames"],
                "obs_offset": ends["vector"],
                "step_offset": ends["action"],
                "length": episode.length,
                "return": episode.episode_return,
                "seed": episode.seed,
                "route": routes.index(episode.route),
                "termination": TERMINATION_NAMES.index(episode.termination),
                "source": source,
            }
            for name, value in row.items():
                rows[name].append(value)
            for name, value in arrays.items():
                data.setdefault(name, []).append(value)
            for name in ends:
                ends[name] += len(arrays[name])
        for name, parts in data.items():
            for part in parts:
                self._columns[name].stage(part)
        for name, values in rows.items():
            self._table[name].stage(np.array(values, dtype=EPISODE_COLUMNS[name]))
        self._staged_routes = routes
        self._staged_episodes += len(episodes)
        filled = [column for column in self._columns.values() if column.fills_a_chunk]
        if filled:  # each trip to zarr's event loop costs ~1 ms: none when there is nothing to write
            with self._dropped_on_failure():
                _gather(*(column.write(whole_chunks_only=True) for column in filled))

    def commit(self) -> int:
        """Make the staged episodes part of the store, atomically; returns the committed count.

        Raises :class:`StoreError` if the store cannot be written; the episodes committed before
        stay intact, and what was staged is dropped.
        """
        if not self._staged_episodes:
            return self._committed
        with self._dropped_on_failure():
            self._write_data()
            self._write_rows()
            self._commit(self._committed + self._staged_episodes, self._staged_routes)
        for column in (*self._columns.values(), *self._table.values()):
            column.commit()
        self._committed += self._staged_episodes
        self._staged_episodes = 0
        self._routes = list(self._staged_routes)
        return self._committed

    @contextlib.contextmanager
    def _dropped_on_failure(self):
        """An OSError inside: drop what is staged and say so as a StoreError."""
        try:
            yield
        except OSError as e:
            for column in (*self._columns.values(), *self._table.values()):
                column.discard()
            self._staged_episodes, self._staged_routes = 0, list(self._routes)
            raise StoreError(
                f"writing episode {self._committed} to {self.url} failed ({reason(e)}); "
                f"the {self._committed} committed episodes are intact"
            ) from None

    # The three steps of a commit, in the order that makes a crash harmless (see module doc).

    def _write_data(self) -> None:
        _gather(*(column.write() for column in self._columns.values()))

    def _write_rows(self) -> None:
        _gather(*(column.write() for column in self._table.values()))

    def _commit(self, committed: int, routes: list[str]) -> None:
        # One metadata document: routes, checksums and the count change together, atomically.
        self.group.update_attributes(
            {"routes": routes, "committed_episodes": committed, "checksums": self._checksums_attr()}
        )

    def _trim(self) -> None:
        _gather(*(column.trim() for column in (*self._columns.values(), *self._table.values())))

    def finish(self) -> None:
        """Clear the store's unfinished mark (given at creation): all its episodes are written."""
        if "unfinished" in self.group.attrs:
            try:
                del self.group.attrs["unfinished"]
            except OSError as e:
                raise StoreError(f"cannot finish {self.url}: {reason(e)}") from None

    def close(self) -> None:
        """Cut the arrays to their committed lengths and refuse further appends.

        Nothing is buffered: every episode is committed when :meth:`append` returns, so a writer
        that is never closed loses nothing; its arrays just keep up to a chunk of padding.
        """
        if not self._closed:
            self._closed = True
            try:
                before = dict(self._store.checksums)
                self._trim()
                if self._store.checksums != before:  # trimming deleted chunks
                    self.group.update_attributes({"checksums": self._checksums_attr()})
            except OSError as e:
                raise StoreError(f"cannot finish {self.url}: {reason(e)}") from None

    def __enter__(self) -> "EpisodeWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except PipelineError:
            pass  # keep the original error; the next append-open trims the arrays anyway
