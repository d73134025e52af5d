"""The dataset store: one Zarr v3 group of frame-deduplicated episodes, crash-safe to append to.

Layout (``F`` frames, ``O`` observations, ``N`` transitions, ``E`` episodes; ``K`` frame stack)::

    frames      uint8   (F, H, W)  chunks (256, H, W)   an episode of T steps adds K - 1 + T + 1
    vector      float32 (O, D)     chunks (8192, D)     T + 1 rows per episode
    action      float32 (N, 2)     chunks (8192, 2)     T rows per episode
    reward      float32 (N,)
    terminated  bool    (N,)
    truncated   bool    (N,)
    episodes/   frame_offset, obs_offset, step_offset, length, seed: int64 (E,);
                return: float64 (E,); route: int16 (E,) index into attrs["routes"];
                termination: int8 (E,) index into ["", *TERMINATIONS]
    attrs       format, format_version, obs_spec, action_spec, routes, meta, software_version,
                created, committed_episodes, appends

Observation ``t`` of episode ``e`` is ``frames[f0 + t : f0 + t + K]`` with ``vector[o0 + t]``,
where ``f0, o0`` are the episode's ``frame_offset, obs_offset``; its transition ``t`` is global
transition ``step_offset + t``.

Crash safety comes from the write order. For each episode the writer (1) resizes and writes the
data arrays, (2) writes the episodes-table row, (3) sets ``committed_episodes`` last. Readers use
only the first ``committed_episodes`` rows, so a process killed at any moment leaves whole episodes
visible; arrays longer than the committed rows imply are uncommitted tails, which opening for
append cuts off. Each chunk and each metadata document is replaced atomically by the stores we use
(local files via rename, object stores via PUT), so a kill mid-write never tears committed data.

There are no object or string arrays: strings live in attrs as lists and arrays hold indices, so a
store holds nothing that needs unpickling.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

import pipeline
from pipeline.datasets.episode import Episode
from pipeline.envs.spec import TERMINATIONS, ActionSpec, ObsSpec
from pipeline.errors import PipelineError, SpecMismatchError, StoreError

FORMAT_NAME = "pipeline.transitions"
FORMAT_VERSION = 1

FRAME_CHUNK = 256
ROW_CHUNK = 8192
EPISODE_CHUNK = 4096
#: ``episodes/termination`` holds an index into this list ("" = not terminated by the env).
TERMINATION_NAMES: tuple[str, ...] = ("", *TERMINATIONS)

# Measured on highway-env racetrack frames (few grey levels, large flat areas), 256-frame chunks:
# zstd level 3 compresses them ~32x, encodes a chunk in ~4-7 ms and decodes it in ~1 ms; level 5
# gains ~20% in size for twice the encode time, which every append pays for the partly filled last
# chunk. Byte shuffle is a no-op for 1-byte items; bitshuffle compressed these frames worse (~20x)
# (it wins on noisy camera-like images: ~1.3x vs ~1.1x, both poor).
_BYTE_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")
_NUMBER_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")

_DATA_ARRAYS = ("frames", "vector", "action", "reward", "terminated", "truncated")
# name -> dtype of the episodes table columns
_EPISODE_COLUMNS = {
    "frame_offset": "int64",
    "obs_offset": "int64",
    "step_offset": "int64",
    "length": "int64",
    "return": "float64",
    "seed": "int64",
    "route": "int16",
    "termination": "int8",
}


# --------------------------------------------------------------------------------------------
# URLs


def _fs_path(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except (ValueError, ImportError) as e:  # unknown protocol, missing fsspec backend
        raise StoreError(f"cannot open {url}: {e}") from None


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def _zarr_store(url: str, storage_options: dict | None, read_only: bool):
    """A zarr store for ``url``. Local paths get zarr's LocalStore, which writes files atomically
    (temp file + rename); fsspec's local filesystem would write chunks in place."""
    fs, path = _fs_path(url, storage_options)
    if _is_local(fs):
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(
        str(url), storage_options=storage_options, read_only=read_only
    )


def _exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """True if anything but an empty directory is at ``path``."""
    if not fs.exists(path):
        return False
    return not (fs.isdir(path) and not fs.ls(path, detail=False))


def _has_zarr_metadata(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return fs.exists(path.rstrip("/") + "/zarr.json")


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


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
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{url} has unsupported format_version {version!r} (expected {FORMAT_VERSION})"
        )


def _open_group(url: str, storage_options: dict | None, read_only: bool) -> zarr.Group:
    """Open an existing pipeline dataset group, or raise :class:`StoreError` saying why not."""
    fs, path = _fs_path(url, storage_options)
    if not _exists(fs, path):
        raise StoreError(f"no dataset store at {url}")
    if not _has_zarr_metadata(fs, path):
        raise StoreError(f"{url} is not a pipeline dataset (no zarr group there)")
    try:
        group = zarr.open_group(
            _zarr_store(url, storage_options, read_only), mode="r" if read_only else "r+"
        )
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as e:
        raise StoreError(f"{url} is not a readable zarr group: {_reason(e)}") from None
    _check_format(url, dict(group.attrs))
    return group


def _committed(url: str, group: zarr.Group) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The committed rows of the episodes table, and the rows of each data array they occupy."""
    n = int(group.attrs.get("committed_episodes", 0))
    try:
        table = {name: np.asarray(group["episodes"][name][:n]) for name in _EPISODE_COLUMNS}
        lengths = {name: group[name].shape[0] for name in _DATA_ARRAYS}
    except KeyError as e:
        raise StoreError(f"{url} is corrupt: missing array {e}") from None
    if any(len(column) < n for column in table.values()):
        raise StoreError(f"{url} is corrupt: the episodes table has fewer than {n} committed rows")
    ends = dict.fromkeys(_DATA_ARRAYS, 0)
    if n:
        t = int(table["length"][-1])
        k = int(group.attrs["obs_spec"]["frame_stack"])
        ends["frames"] = int(table["frame_offset"][-1]) + k + t
        ends["vector"] = int(table["obs_offset"][-1]) + t + 1
        for name in ("action", "reward", "terminated", "truncated"):
            ends[name] = int(table["step_offset"][-1]) + t
    short = [name for name in _DATA_ARRAYS if lengths[name] < ends[name]]
    if short:
        raise StoreError(f"{url} is corrupt: {short[0]} is shorter than its committed episodes")
    return table, ends


class TransitionStore:
    """Read-only view of the committed episodes of a store.

    Counts and :attr:`episodes` cover committed episodes only. The zarr arrays (``frames``,
    ``vector``, ``action``, ``reward``, ``terminated``, ``truncated``) may be longer than that
    (an append in progress, or a crashed one): index them through the episode offsets.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = str(url)
        self.group = _open_group(self.url, storage_options, read_only=True)
        self.attrs: dict = dict(self.group.attrs)
        self.meta: dict = dict(self.attrs.get("meta") or {})
        self.routes: list[str] = list(self.attrs.get("routes", []))
        self.obs_spec = ObsSpec.from_dict(self.attrs["obs_spec"])
        self.action_spec = ActionSpec.from_dict(self.attrs["action_spec"])
        self.episodes, ends = _committed(self.url, self.group)
        self.frames: zarr.Array = self.group["frames"]
        self.vector: zarr.Array = self.group["vector"]
        self.action: zarr.Array = self.group["action"]
        self.reward: zarr.Array = self.group["reward"]
        self.terminated: zarr.Array = self.group["terminated"]
        self.truncated: zarr.Array = self.group["truncated"]
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
            route=self.routes[row["route"]],
            seed=row["seed"],
            termination=TERMINATION_NAMES[row["termination"]],
        )

    def transition(self, i: int) -> dict:
        """Global transition ``i`` as ``{obs, action, reward, next_obs, terminated, truncated}``.

        ``obs``/``next_obs`` are ``{'image': uint8 (K, H, W), 'vector': float32 (D,)}``; ``action``
        float32 ``(2,)``; ``reward`` a float32 scalar; the flags Python bools. One read per array:
        meant for inspection and tests, not for sampling batches (see ``datasets/replay.py``).
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
            "bytes_stored": stored,
            "bytes_per_transition": stored / self.num_transitions if self.num_transitions else None,
            "created": self.attrs.get("created"),
            "software_version": self.attrs.get("software_version"),
            "meta": self.meta,
        }


def open_store(url: str, storage_options: dict | None = None) -> TransitionStore:
    """Open a dataset store for reading (see :class:`TransitionStore`)."""
    return TransitionStore(url, storage_options)


# --------------------------------------------------------------------------------------------
# Writing


class _Column:
    """One appendable array plus a copy of the committed rows in its partially filled last chunk.

    A write covers whole chunks only: from the chunk holding the committed end (its committed rows
    come from ``tail``) to the chunk holding the new end, padded with the fill value. So zarr
    never reads a chunk back, and the array is resized only when it needs another chunk; until
    :meth:`trim` its length is a whole number of chunks, past the committed end.
    """

    def __init__(self, array: zarr.Array, end: int):
        # write_empty_chunks skips zarr's is-it-all-fill-value scan of every chunk written
        # (~1.5 ms per frame chunk); an all-zero chunk is rare and costs little to store.
        self.array = array.async_array.with_config({"write_empty_chunks": True})
        self.end = end
        self.chunk = array.chunks[0]
        self.tail = np.asarray(array[end - end % self.chunk : end])
        self._block: np.ndarray | None = None
        self._pending_end = end

    async def write(self, rows: np.ndarray) -> None:
        """Write ``rows`` after the committed end (growing the array by whole chunks)."""
        start, stop = self.end - len(self.tail), self.end + len(rows)
        padded_stop = -(-stop // self.chunk) * self.chunk
        block = np.zeros((padded_stop - start, *self.array.shape[1:]), rows.dtype)
        block[: len(self.tail)] = self.tail
        block[len(self.tail) : stop - start] = rows
        if self.array.shape[0] < padded_stop:
            await self.array.resize((padded_stop, *self.array.shape[1:]))
        if len(rows):
            await self.array.setitem(slice(start, padded_stop), block)
        self._block, self._pending_end = block, stop

    def commit(self) -> None:
        """The last write is committed: move the end past it and keep the new partial chunk."""
        start = self.end - len(self.tail)
        self.end = self._pending_end
        self.tail = self._block[self.end - self.end % self.chunk - start : self.end - start].copy()
        self._block = None

    async def trim(self) -> None:
        """Cut the array to the committed end (drops padding and any uncommitted rows)."""
        if self.array.shape[0] != self.end:
            await self.array.resize((self.end, *self.array.shape[1:]))


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
    ``"overwrite"`` (delete the zarr store at ``url``, then create).

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
    ):
        if mode not in ("create", "append", "overwrite"):
            raise ValueError(f"mode must be 'create', 'append' or 'overwrite', not {mode!r}")
        self.url, self.obs_spec, self.action_spec = str(url), obs_spec, action_spec
        self.storage_options = storage_options
        meta = _json_meta(meta)
        fs, path = _fs_path(self.url, storage_options)
        exists = _exists(fs, path)
        if mode == "create" and exists:
            raise StoreError(
                f"{self.url} already exists; "
                "pass --resume to continue it or --overwrite to replace it"
            )
        if mode == "overwrite" and exists:
            self._delete(fs, path)
        try:
            if mode == "append" and exists:
                self.group = self._open_for_append(meta)
            else:
                self.group = self._create(meta)
        except OSError as e:
            raise StoreError(f"cannot write dataset store at {self.url}: {_reason(e)}") from None
        self._routes: list[str] = list(self.group.attrs["routes"])
        self._closed = False

    # -- opening

    def _delete(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        # Only ever delete a zarr store: a mistyped --out must not wipe an unrelated directory.
        if not _has_zarr_metadata(fs, path):
            raise StoreError(f"refusing to overwrite {self.url}: it exists and is not a zarr store")
        try:
            fs.rm(path, recursive=True)
        except OSError as e:
            raise StoreError(f"cannot delete {self.url}: {_reason(e)}") from None

    def _create(self, meta: dict) -> zarr.Group:
        group = zarr.open_group(_zarr_store(self.url, self.storage_options, False), mode="w-")
        s, d, a = self.obs_spec.image_size, self.obs_spec.vector_dim, self.action_spec.dim
        specs = {  # name -> (shape, chunks, dtype, codec, dimension names)
            "frames": ((0, s, s), (FRAME_CHUNK, s, s), "uint8", _BYTE_CODEC, ("frame", "y", "x")),
            "vector": ((0, d), (ROW_CHUNK, d), "float32", _NUMBER_CODEC, ("observation", "field")),
            "action": ((0, a), (ROW_CHUNK, a), "float32", _NUMBER_CODEC, ("transition", "field")),
            "reward": ((0,), (ROW_CHUNK,), "float32", _NUMBER_CODEC, ("transition",)),
            "terminated": ((0,), (ROW_CHUNK,), "bool", _BYTE_CODEC, ("transition",)),
            "truncated": ((0,), (ROW_CHUNK,), "bool", _BYTE_CODEC, ("transition",)),
        }
        for name, (shape, chunks, dtype, codec, dims) in specs.items():
            group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, compressors=codec,
                fill_value=False if dtype == "bool" else 0, dimension_names=dims,
            )
        table = group.create_group("episodes")
        for name, dtype in _EPISODE_COLUMNS.items():
            table.create_array(
                name, shape=(0,), chunks=(EPISODE_CHUNK,), dtype=dtype, compressors=_NUMBER_CODEC,
                fill_value=0, dimension_names=("episode",),
            )
        # The format attrs go last: a store whose creation was interrupted is "not a pipeline
        # dataset" (replace it with --overwrite) rather than a half-made one.
        group.update_attributes(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "obs_spec": self.obs_spec.to_dict(),
                "action_spec": self.action_spec.to_dict(),
                "routes": [],
                "meta": meta,
                "software_version": pipeline.__version__,
                "created": _now(),
                "committed_episodes": 0,
                "appends": [],
            }
        )
        self._columns = {name: _Column(group[name], 0) for name in _DATA_ARRAYS}
        self._table = {name: _Column(group["episodes"][name], 0) for name in _EPISODE_COLUMNS}
        self._committed = 0
        return group

    def _open_for_append(self, meta: dict) -> zarr.Group:
        group = _open_group(self.url, self.storage_options, read_only=False)
        attrs = dict(group.attrs)
        stored = ObsSpec.from_dict(attrs["obs_spec"])
        self.obs_spec.check_compatible(stored, f"dataset store {self.url}")
        stored_action = ActionSpec.from_dict(attrs["action_spec"])
        if stored_action != self.action_spec:
            raise SpecMismatchError(
                f"dataset store {self.url} has a different action spec (fields: "
                f"{list(stored_action.fields)!r} != {list(self.action_spec.fields)!r})"
            )
        table, ends = _committed(self.url, group)
        self._committed = len(table["length"])
        self._columns = {name: _Column(group[name], ends[name]) for name in _DATA_ARRAYS}
        self._table = {
            name: _Column(group["episodes"][name], self._committed) for name in _EPISODE_COLUMNS
        }
        # Cut off what a crashed writer left past the committed rows before anything is added.
        self._trim()
        appends = list(attrs.get("appends", []))
        appends.append(
            {"opened": _now(), "first_episode": self._committed, "meta": meta,
             "software_version": pipeline.__version__}
        )
        group.update_attributes({"appends": appends})
        return group

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
        }
        arrays = {}
        for name, (shape, dtype) in expected.items():
            value = np.asarray(getattr(ep, name))
            if value.shape != shape:
                raise SpecMismatchError(
                    f"episode {name} has shape {value.shape}, the store expects {shape} "
                    f"({t} steps, frame_stack {k})"
                )
            arrays[name] = np.ascontiguousarray(value, dtype=dtype)
        if ep.termination not in TERMINATION_NAMES:
            raise ValueError(f"unknown termination {ep.termination!r}; known: {TERMINATION_NAMES}")
        return arrays

    def append(self, episode: Episode) -> int:
        """Write one whole episode and commit it; returns the new committed episode count.

        Raises :class:`StoreError` if the store cannot be written; the episodes committed before
        stay intact and the next ``append`` (or an append-open) overwrites the partial one.
        """
        if self._closed:
            raise StoreError(f"writer for {self.url} is closed")
        arrays = self._check_episode(episode)
        routes = self._routes if episode.route in self._routes else [*self._routes, episode.route]
        row = {
            "frame_offset": self._columns["frames"].end,
            "obs_offset": self._columns["vector"].end,
            "step_offset": self._columns["action"].end,
            "length": episode.length,
            "return": episode.episode_return,
            "seed": episode.seed,
            "route": routes.index(episode.route),
            "termination": TERMINATION_NAMES.index(episode.termination),
        }
        try:
            self._write_data(arrays)
            self._write_row(row)
            self._commit(self._committed + 1, routes)
        except OSError as e:
            raise StoreError(
                f"writing episode {self._committed} to {self.url} failed ({_reason(e)}); "
                f"the {self._committed} committed episodes are intact"
            ) from None
        for column in (*self._columns.values(), *self._table.values()):
            column.commit()
        self._committed += 1
        self._routes = routes
        return self._committed

    # The three steps of an append, in the order that makes a crash harmless (see module doc).

    def _write_data(self, arrays: dict[str, np.ndarray]) -> None:
        _gather(*(self._columns[name].write(rows) for name, rows in arrays.items()))

    def _write_row(self, row: dict) -> None:
        _gather(
            *(
                self._table[name].write(np.array([value], dtype=_EPISODE_COLUMNS[name]))
                for name, value in row.items()
            )
        )

    def _commit(self, committed: int, routes: list[str]) -> None:
        # One metadata document: routes and the count change together, atomically.
        self.group.update_attributes({"routes": routes, "committed_episodes": committed})

    def _trim(self) -> None:
        _gather(*(column.trim() for column in (*self._columns.values(), *self._table.values())))

    def close(self) -> None:
        """Cut the arrays to their committed lengths and refuse further appends.

        Nothing is buffered: every episode is committed when :meth:`append` returns, so a writer
        that is never closed loses nothing; its arrays just keep up to a chunk of padding.
        """
        if not self._closed:
            self._closed = True
            try:
                self._trim()
            except OSError as e:
                raise StoreError(f"cannot finish {self.url}: {_reason(e)}") from None

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
