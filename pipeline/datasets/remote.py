"""Sharing stores between machines: verify, checksummed copies (push/pull), a local chunk cache.

Every function takes a path or any fsspec URL (``s3://bucket/a.zarr``, ``gs://...``,
``file://...``, ``memory://...``). Credentials and endpoints come from the environment or fsspec's
config (``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), never from the store.

The writer records the sha256 of every chunk object as stored (``attrs["checksums"]``, see
``datasets/store.py``). Everything here works on those objects' bytes, never through zarr's
decode/encode, so copies are bit-exact and cheap:

- :func:`verify_store` checks the format, the specs, the episodes table, that every array is as
  long as the committed episodes need, and that each chunk holding committed rows exists and
  matches its recorded checksum. It lists every problem it finds.
- :func:`copy_store` (``datasets push`` / ``pull``) copies chunk objects, skipping those already at
  the destination with the same size and checksum (so re-running an interrupted copy resumes
  it), then the metadata documents, root last, so an interrupted copy never looks like a finished
  store; then it verifies the destination.
- the local chunk cache (``TransitionStore(url, cache=DIR)``) is
  :class:`~pipeline.datasets.chunks.ChunkCacheStore`; URL and path helpers are ``datasets/urls.py``.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import zarr

from pipeline.datasets.chunks import CHECKSUM_ALGORITHM, checksum, chunk_key, is_chunk_key
from pipeline.datasets.store import (DATA_ARRAYS, EPISODE_COLUMNS, FORMAT_NAME, committed_ends, open_group,
                                     table_problems, unfinished_line)
from pipeline.datasets.urls import display_url, fs_path, io_errors, is_io_error, is_local, reason, store_location
from pipeline.envs.spec import ActionSpec, ObsSpec
from pipeline.errors import PipelineError, StoreError
from pipeline.progress import ProgressBar, stderr_terminal

#: Top-level names a store (or a partial copy of one) may hold.
_LAYOUT_NAMES = frozenset({"zarr.json", "episodes", *DATA_ARRAYS})
# Objects per read/write round: remote filesystems fetch and put a round concurrently.
_BATCH_OBJECTS = 64
_BATCH_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------
# Verify


@dataclass
class Problem:
    """One thing wrong with a store. ``kind``: missing_chunk, corrupt_chunk, unrecorded_chunk,
    truncated, missing_array, layout, table, spec, checksums or unfinished (an interrupted merge); ``where``: a chunk key or array."""

    kind: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.where}: {self.message}"


@dataclass
class VerifyReport:
    url: str
    episodes: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class _Chunk:
    key: str  # relative to the store root, e.g. "frames/c/3/0/0"
    digest: str  # recorded checksum
    size: int  # bytes as listed
    # The chunk also holds rows past the committed end of an array that is longer than that end:
    # a writer is open or died mid-append, and may have rewritten it after its checksum.
    uncommitted: bool


@dataclass
class _Inspection:
    group: zarr.Group
    listing: dict[str, int]  # every object under the root: relative key -> size
    digests: dict[str, str]  # recorded checksums
    report: VerifyReport
    chunks: list[_Chunk]  # existing chunks of committed data rows, not hashed yet


def _listing(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    """Every object under ``root``: relative key -> size in bytes."""
    fs.invalidate_cache()
    with io_errors(f"cannot list {fs.unstrip_protocol(root)}"):
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
    prefix = root.rstrip("/") + "/"
    return {path[len(prefix):]: int(info.get("size") or 0)
            for path, info in found.items() if path.startswith(prefix)}


def _inspect(url: str, storage_options: dict | None) -> _Inspection:
    """Everything :func:`verify_store` checks except hashing the data arrays' chunks.

    Raises :class:`StoreError` when ``url`` is not a readable pipeline store at all (missing, not
    zarr, another format or version, not data only); lists every other problem in the report.

    Long because it is verify's checklist in the order the checks depend on each other (specs,
    counts, recorded checksums, array layout, the table, then the data arrays' chunks), each
    finding appended to one report; split up, the pieces would pass the same half-built state on.
    """
    group = open_group(url, storage_options, read_only=True)
    fs, root = fs_path(url, storage_options)
    attrs = dict(group.attrs)
    report = VerifyReport(display_url(url))
    found = _Inspection(group, _listing(fs, root), {}, report, [])
    problem = lambda *args: report.problems.append(Problem(*args))  # noqa: E731

    try:
        obs_spec = ObsSpec.from_dict(attrs["obs_spec"])
        action_spec = ActionSpec.from_dict(attrs["action_spec"])
    except (KeyError, TypeError, ValueError, PipelineError) as e:
        problem("spec", "attrs", f"invalid observation/action spec ({reason(e)})")
        return found
    n = attrs.get("committed_episodes")
    if not isinstance(n, int) or n < 0:
        problem("table", "attrs", f"committed_episodes is {n!r}, not a count")
        return found
    report.episodes = n
    if attrs.get("unfinished"):
        problem("unfinished", "attrs", unfinished_line(attrs["unfinished"]))
    recorded = attrs.get("checksums") or {}
    if recorded.get("algorithm") == CHECKSUM_ALGORITHM and isinstance(recorded.get("chunks"), dict):
        found.digests = recorded["chunks"]
    else:
        problem("checksums", "attrs", f"no {CHECKSUM_ALGORITHM} chunk checksums recorded")

    s = obs_spec.image_size
    trailing = {"frames": (s, s), "vector": (obs_spec.vector_dim,), "action": (action_spec.dim,),
                **{name: () for name in ("reward", "terminated", "truncated")},
                **{f"episodes/{c}": () for c in EPISODE_COLUMNS}}
    members = dict(group.members(max_depth=None))  # one concurrent round of metadata reads
    arrays: dict[str, zarr.Array] = {}
    for name, shape in trailing.items():
        array = members.get(name)
        if not isinstance(array, zarr.Array):
            if name != "episodes/source":  # optional in stores written before provenance
                problem("missing_array", name, "the array is missing")
            continue
        if array.shape[1:] != shape or array.chunks[1:] != shape:
            problem("layout", name, f"shape {array.shape} / chunks {array.chunks} do not fit the "
                                    f"spec (rows x {shape}, chunked by rows)")
            continue
        arrays[name] = array

    def plan(name: str, end: int) -> list[_Chunk]:
        """The chunks holding rows [0, end) of ``name``; problems for missing or unrecorded ones."""
        array, planned = arrays[name], []
        if array.shape[0] < end:
            problem("truncated", name, f"{array.shape[0]} rows, the committed episodes need {end}")
        size = array.chunks[0]
        for i in range(-(-min(end, array.shape[0]) // size)):
            key = chunk_key(array, i)
            if key not in found.listing:
                problem("missing_chunk", key, f"rows {i * size}..{(i + 1) * size - 1} of {name} are gone")
            elif key not in found.digests:
                problem("unrecorded_chunk", key, "no checksum was recorded for this chunk")
            else:
                uncommitted = array.shape[0] > end and (i + 1) * size > end
                planned.append(_Chunk(key, found.digests[key], found.listing[key], uncommitted))
        return planned

    # The table first, hashed before it is read: the data arrays' committed ends come from it.
    columns = [f"episodes/{c}" for c in EPISODE_COLUMNS if f"episodes/{c}" in arrays]
    before = len(report.problems)
    _hash_chunks(fs, root, [c for name in columns for c in plan(name, n)], report)
    ends = None
    required = [f"episodes/{c}" for c in EPISODE_COLUMNS if c != "source"]
    # A missing table chunk would read as zeros; a corrupt one fails to decode or shows up as
    # inconsistent offsets, reported along with its checksum mismatch.
    intact = not any(p.kind in ("missing_chunk", "truncated") for p in report.problems[before:])
    if intact and all(c in arrays for c in required):
        try:
            table = {c.split("/")[1]: np.asarray(arrays[c][:n]) for c in columns}
            table.setdefault("source", np.full(n, -1, np.int16))
            report.problems.extend(Problem("table", where, message)
                                   for where, message in table_problems(table, attrs, obs_spec.frame_stack))
            ends = committed_ends(table, obs_spec.frame_stack)
        except Exception as e:  # noqa: BLE001 - a codec failure may raise any error type
            problem("table", "episodes", f"cannot read the episodes table ({reason(e)})")
    if ends is None:
        problem("table", "episodes", "the episodes table is damaged: checking every chunk within "
                                     "each data array's shape instead of its committed rows")
    for name in DATA_ARRAYS:
        if name in arrays:
            found.chunks += plan(name, ends[name] if ends else arrays[name].shape[0])
    return found


def _batches(items: list, size_of) -> list[list]:
    """Split ``items`` into rounds of at most _BATCH_OBJECTS objects and about _BATCH_BYTES."""
    out, current, nbytes = [], [], 0
    for item in items:
        if current and (len(current) >= _BATCH_OBJECTS or nbytes + size_of(item) > _BATCH_BYTES):
            out.append(current)
            current, nbytes = [], 0
        current.append(item)
        nbytes += size_of(item)
    return out + [current] if current else out


def _read(fs: fsspec.AbstractFileSystem, root: str, keys: list[str]) -> dict[str, bytes | None]:
    """Bytes of each key (None where it cannot be read), fetched concurrently by remote fs."""
    if not keys:
        return {}
    paths = {f"{root}/{key}": key for key in keys}
    with io_errors(f"cannot read from {fs.unstrip_protocol(root)}"):
        got = fs.cat(list(paths), on_error="return")
    found = {paths.get(path, path): value for path, value in got.items()}
    return {key: found[key] if isinstance(found.get(key), bytes) else None for key in keys}


def _bytes_bar(enabled: bool, label: str, total: int) -> ProgressBar:
    """Bytes done and their rate on a terminal's stderr (stdout may carry ``--json``)."""
    console = stderr_terminal() if enabled else None
    return ProgressBar(console is not None, label, total, unit="bytes", console=console)


def _hash_chunks(fs, root: str, chunks: list[_Chunk], report: VerifyReport, bar: ProgressBar | None = None) -> None:
    """Read ``chunks`` and compare them with their recorded checksums; findings go to ``report``."""
    for batch in _batches(chunks, lambda c: c.size):
        data = _read(fs, root, [c.key for c in batch])
        for chunk in batch:
            value = data[chunk.key]
            if value is None:
                report.problems.append(Problem("missing_chunk", chunk.key, "cannot be read"))
            elif checksum(value) != chunk.digest:
                if chunk.uncommitted:
                    report.notes.append(f"{chunk.key} also holds uncommitted rows and changed after "
                                        "its checksum (a writer is open or crashed; resuming it "
                                        "records the checksum again)")
                else:
                    report.problems.append(Problem(
                        "corrupt_chunk", chunk.key,
                        f"its {len(value)} bytes do not match the recorded sha256"))
            report.chunks_checked += 1
            report.bytes_checked += len(value or b"")
            if bar:
                bar.advance(chunk.size)


def verify_store(url: str, storage_options: dict | None = None, progress: bool = False) -> VerifyReport:
    """Check a store completely and list every problem found (see the module docstring).

    Raises :class:`StoreError` only when ``url`` is not a readable pipeline store at all.
    """
    found = _inspect(url, storage_options)
    fs, root = fs_path(url, storage_options)
    with _bytes_bar(progress, f"verify {display_url(url)}", sum(c.size for c in found.chunks)) as bar:
        _hash_chunks(fs, root, found.chunks, found.report, bar)
    return found.report


# --------------------------------------------------------------------------------------------
# Copy (push / pull)


def _root_attrs(fs: fsspec.AbstractFileSystem, root: str) -> dict | None:
    """Attributes of the zarr group at ``root``, or None when there is none."""
    try:
        return dict(json.loads(fs.cat_file(f"{root}/zarr.json")).get("attributes") or {})
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - re-raised unless it is I/O or bad JSON
        if not (is_io_error(e) or isinstance(e, ValueError)):
            raise
        raise StoreError(f"cannot read {fs.unstrip_protocol(root)}/zarr.json: {reason(e)}") from None


def _identity(attrs: dict) -> tuple:
    # Stores written before datasets had ids are told apart by creation time and spec.
    return (attrs.get("id"), attrs.get("created"), attrs.get("obs_spec"))


def _check_destination(dst: str, fs, root: str, listing: dict[str, int], source_attrs: dict,
                       overwrite: bool) -> dict[str, int]:
    """What may be at ``dst`` before a copy: nothing, an earlier or partial copy of the same
    dataset (the copy resumes), or another zarr store with ``overwrite`` (deleted first).
    Returns the listing to resume from."""
    if not listing:
        if fs.isfile(root):
            raise StoreError(f"{display_url(dst)} is a file; give a folder or URL for the copy")
        return listing
    attrs = _root_attrs(fs, root)
    if attrs is None:
        foreign = sorted({key.split("/")[0] for key in listing} - _LAYOUT_NAMES)
        if not foreign:
            return listing  # an interrupted copy: its metadata is written last
        raise StoreError(f"{display_url(dst)} exists and is not a dataset store "
                         f"(it holds {', '.join(foreign[:3])}); choose another destination")
    if attrs.get("format") == FORMAT_NAME and _identity(attrs) == _identity(source_attrs):
        return listing  # an earlier copy: only what changed is copied
    if not overwrite:
        raise StoreError(f"{display_url(dst)} holds another dataset (created {attrs.get('created')}, "
                         f"the source was created {source_attrs.get('created')}); "
                         "pass --overwrite to replace it")
    try:
        fs.rm(root, recursive=True)  # a zarr store (it has a root zarr.json), nothing else
    except OSError as e:
        raise StoreError(f"cannot delete {display_url(dst)}: {reason(e)}") from None
    return {}


def _write(fs: fsspec.AbstractFileSystem, root: str, objects: dict[str, bytes]) -> None:
    """Put ``objects`` (key -> bytes) under ``root``; remote filesystems put them concurrently."""
    paths = {f"{root}/{key}": value for key, value in objects.items()}
    if is_local(fs):
        for path in paths:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe(paths)


def _metadata_order(key: str) -> tuple:
    # Arrays first (deepest first), then the episodes group, the root document last: its
    # committed count is what makes a copy visible.
    return (key == "zarr.json", -key.count("/"), key)


def copy_store(src: str, dst: str, *, src_options: dict | None = None, dst_options: dict | None = None,
               overwrite: bool = False, progress: bool = False, verify: bool = True) -> dict:
    """Copy the store at ``src`` to ``dst`` byte for byte, resumably, and verify the copy.

    Copies every checksummed chunk object and the metadata documents. Objects already at ``dst``
    with the source's size and checksum are skipped, so re-running after an interruption (or
    after the source grew) copies only what is missing or changed. Chunks go first, metadata
    last (the root document last of all), so an interrupted copy is never mistaken for a finished
    store. A source that fails inspection, or a chunk that does not match its checksum, stops the
    copy. Returns counts of objects and bytes copied, skipped and deleted (chunks the source no
    longer has), and the destination's :class:`VerifyReport` as a dict.

    ``verify=False`` copies chunks without comparing them with their checksums and skips the
    final verification (its report then says 0 chunks checked).

    Long because the copy's order is its crash safety (refusals, chunks, metadata deepest first
    and the root last, then verification); one function keeps that order readable top to bottom.
    """
    if store_location(src, src_options) == store_location(dst, dst_options):
        raise StoreError(f"source and destination are the same store: {display_url(src)}")
    found = _inspect(src, src_options)
    if found.report.problems:
        first = found.report.problems[0]
        raise StoreError(f"{display_url(src)} has {len(found.report.problems)} problem(s), first: "
                         f"{first}; not copying it (see `pipeline datasets verify`)")
    src_fs, src_root = fs_path(src, src_options)
    dst_fs, dst_root = fs_path(dst, dst_options)
    # Uncommitted chunks a crashed writer left past the committed rows have no checksum and are
    # not copied; neither is anything outside the layout.
    chunks = sorted(k for k in found.listing if k in found.digests)
    tolerated = {c.key for c in found.chunks if c.uncommitted}
    meta_keys = sorted((k for k in found.listing if posixpath.basename(k) == "zarr.json"
                        and k.split("/")[0] in _LAYOUT_NAMES), key=_metadata_order)
    # The metadata as it is now (checked by _inspect): copied last, it describes the chunks.
    metadata = _read(src_fs, src_root, meta_keys)
    if any(value is None for value in metadata.values()):
        raise StoreError(f"cannot read the metadata of {display_url(src)}")
    source_attrs = dict(json.loads(metadata["zarr.json"]).get("attributes") or {})
    if (source_attrs.get("checksums") or {}).get("chunks") != found.digests:
        raise StoreError(f"{display_url(src)} changed while it was being read (a writer has it "
                         "open); copy it when the writer is done")

    dst_listing = _check_destination(dst, dst_fs, dst_root, _listing(dst_fs, dst_root), source_attrs,
                                     overwrite)
    stats = {"copied": 0, "skipped": 0, "bytes_copied": 0, "bytes_skipped": 0, "deleted": 0}
    total = sum(found.listing[k] for k in chunks) + sum(map(len, metadata.values()))
    try:
        with _bytes_bar(progress, f"copy {display_url(src)} -> {display_url(dst)}", total) as bar:
            for batch in _batches(chunks, lambda k: found.listing[k]):
                _copy_chunks(batch, found, src, src_fs, src_root, dst_fs, dst_root, dst_listing,
                             tolerated if verify else set(found.digests), stats, bar)
            there = _read(dst_fs, dst_root, [k for k in meta_keys if dst_listing.get(k) == len(metadata[k])])
            for key in meta_keys:  # one at a time, in order
                if there.get(key) != metadata[key]:
                    _write(dst_fs, dst_root, {key: metadata[key]})
                bar.advance(len(metadata[key]))
            stale = [k for k in dst_listing if is_chunk_key(k) and k not in found.digests]
            if stale:  # chunks the source no longer has (it was trimmed): invisible, but waste
                dst_fs.rm([f"{dst_root}/{k}" for k in stale])
                stats["deleted"] = len(stale)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is I/O
        if not is_io_error(e):
            raise
        raise StoreError(f"copy to {display_url(dst)} stopped ({reason(e)}); "
                         "run the same command again to resume it") from None
    report = verify_store(dst, dst_options, progress=progress) if verify else _inspect(dst, dst_options).report
    if not report.ok:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise StoreError(f"the copy at {display_url(dst)} failed verification: {report.problems[0]}{more}")
    return {**stats, "source": display_url(src), "destination": display_url(dst),
            "episodes": report.episodes, "verify": report.to_dict()}


def _copy_chunks(keys: list[str], found: _Inspection, src: str, src_fs, src_root: str, dst_fs,
                 dst_root: str, dst_listing: dict[str, int], tolerated: set[str], stats: dict,
                 bar: ProgressBar) -> None:
    """One round of chunk objects: skip those already at the destination, copy the others."""
    sizes, digests = found.listing, found.digests
    maybe_there = [k for k in keys if dst_listing.get(k) == sizes[k]]
    there = _read(dst_fs, dst_root, maybe_there)
    done = {k for k in maybe_there if there[k] is not None and checksum(there[k]) == digests[k]}
    todo = [k for k in keys if k not in done]
    data = _read(src_fs, src_root, todo)
    for key in todo:
        if data[key] is None:
            raise StoreError(f"cannot read {key} from {display_url(src)}")
        if checksum(data[key]) != digests[key] and key not in tolerated:
            raise StoreError(f"{display_url(src)} chunk {key} does not match its recorded checksum "
                             "(corrupt); not copying it (see `pipeline datasets verify`)")
    if todo:
        _write(dst_fs, dst_root, {key: data[key] for key in todo})
    for key in keys:
        nbytes = sizes[key]
        stats["skipped" if key in done else "copied"] += 1
        stats["bytes_skipped" if key in done else "bytes_copied"] += nbytes
        bar.advance(nbytes)
