"""Chunk objects: their keys, their sha256 checksums, and the zarr store wrappers that record,
check and cache chunks by checksum.

A chunk's checksum is the hex sha256 of its bytes as stored (encoded), so
``sha256sum a.zarr/frames/c/3/0/0`` matches ``attrs["checksums"]["chunks"]["frames/c/3/0/0"]``.
The wrappers sit between zarr and the real store:

- :class:`ChecksumStore` (writers) records the checksum of every chunk written through it;
- :class:`VerifyingStore` (readers) refuses a chunk that is missing or differs from its checksum,
  before zarr decodes it;
- :class:`ChunkCacheStore` (readers of remote stores) keeps a local copy of each chunk, keyed by
  its checksum.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from pathlib import Path

from zarr.storage import WrapperStore

from pipeline.datasets.urls import reason
from pipeline.errors import StoreError

CHECKSUM_ALGORITHM = "sha256"
_INLINE_HASH_BYTES = 256 << 10  # sha256 runs at ~700 MB/s here (SHA-NI)
_CHUNK_KEY = re.compile(r"(^|/)c/[0-9/]+$")


def is_chunk_key(key: str) -> bool:
    """True for a chunk object's key (``frames/c/0/0/0``), false for metadata (``zarr.json``)."""
    return _CHUNK_KEY.search(key) is not None


def chunk_key(array, i: int) -> str:
    """Store key of chunk ``i`` (along the first axis) of a (sync or async) zarr ``array``."""
    coords = (i,) + (0,) * (len(array.shape) - 1)
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def checksum(data) -> str:
    """Hex sha256 of ``data`` (bytes or a contiguous uint8 buffer): a chunk's recorded checksum."""
    return hashlib.sha256(data).hexdigest()


class ChecksumStore(WrapperStore):
    """Records the checksum of every chunk object written through it, and forgets deleted ones.

    ``checksums`` (key -> hex sha256) is shared with copies zarr makes of the store.
    """

    def __init__(self, store, checksums: dict[str, str] | None = None):
        super().__init__(store)
        self.checksums = {} if checksums is None else checksums

    def _with_store(self, store) -> "ChecksumStore":
        return type(self)(store, self.checksums)

    async def set(self, key: str, value) -> None:
        await self._store.set(key, value)
        if is_chunk_key(key):
            # hashlib releases the GIL: hashing in a thread overlaps the other arrays' encoding.
            self.checksums[key] = await asyncio.to_thread(checksum, value.as_numpy_array())

    async def delete(self, key: str) -> None:
        await self._store.delete(key)
        self.checksums.pop(key, None)

    async def rehash(self, key: str) -> None:
        """Record the checksum of ``key`` as it is stored now (forget it if it is missing)."""
        from zarr.core.buffer import default_buffer_prototype

        value = await self._store.get(key, prototype=default_buffer_prototype())
        if value is None:
            self.checksums.pop(key, None)
        else:
            self.checksums[key] = checksum(value.as_numpy_array())


class VerifyingStore(WrapperStore):
    """Checks every chunk object read through it against its recorded checksum, before zarr
    decodes it, so a reader never computes on damaged or missing data.

    Left unarmed (``checksums`` None) while the group's metadata is opened; :meth:`arm` gives it
    the recorded checksums. A chunk that is gone, has no checksum, or whose bytes differ raises a
    one-line :class:`StoreError` naming the array, the chunk and the store. ``tolerated`` are the
    chunks holding a committed end *and* rows past it: a writer that is open or died mid-append
    rewrites them after their checksum (see the module doc), so a mismatch there is not damage.
    """

    def __init__(self, store, url: str, state: dict | None = None):
        super().__init__(store)
        self.url = url
        # shared with the copies zarr makes of the store (read-only views, ...)
        self.state = {"checksums": None, "tolerated": frozenset()} if state is None else state

    def _with_store(self, store) -> "VerifyingStore":
        return type(self)(store, self.url, self.state)

    def arm(self, checksums: dict[str, str], tolerated=frozenset()) -> None:
        self.state.update(checksums=checksums, tolerated=frozenset(tolerated))

    def tolerate(self, keys) -> None:
        self.state["tolerated"] = self.state["tolerated"] | frozenset(keys)

    def _fail(self, key: str, what: str) -> StoreError:
        array, _, index = key.partition("/c/")
        return StoreError(f"{self.url}: chunk {index.split('/')[0]} of array {array} ({key}) {what}; "
                          f"see `pipeline datasets verify {self.url}`, or pass --no-verify to read it anyway")

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        checksums = self.state["checksums"]
        if checksums is None or byte_range is not None or not is_chunk_key(key):
            return value
        digest = checksums.get(key)
        if value is None:
            raise self._fail(key, "is missing")
        if digest is None:
            raise self._fail(key, "has no recorded checksum")
        if key not in self.state["tolerated"]:
            data = value.as_numpy_array()
            # hashlib releases the GIL: a big chunk is hashed in a thread, overlapping the other
            # chunks' decoding; below ~0.3 ms of hashing the thread hand-off costs more than it saves.
            found = await asyncio.to_thread(checksum, data) if data.nbytes > _INLINE_HASH_BYTES else checksum(data)
            if found != digest:
                raise self._fail(key, "does not match its recorded sha256 (corrupt)")
        return value


class ChunkCacheStore(WrapperStore):
    """Reads chunks from a local folder, keyed by their recorded checksum, before the remote store.

    A chunk fetched remotely is kept when its bytes match its checksum; a cached file is used
    only if it still matches. Metadata is always read from the store, so a store that grew (its
    tail chunk rewritten, with a new checksum) is seen as it is now, and one cache folder can
    serve any number of stores and versions. ``checksums`` (key -> sha256) is filled in by
    :class:`~pipeline.datasets.store.TransitionStore` once the group's attrs are read.
    """

    def __init__(self, store, cache_dir: str | os.PathLike, checksums: dict[str, str] | None = None):
        super().__init__(store)
        self.cache_dir = Path(cache_dir).expanduser()
        self.checksums = {} if checksums is None else checksums
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create cache folder {self.cache_dir}: {reason(e)}") from None

    def _with_store(self, store) -> "ChunkCacheStore":
        return type(self)(store, self.cache_dir, self.checksums)

    def _path(self, digest: str) -> Path:
        return self.cache_dir / digest[:2] / digest

    def _load(self, digest: str) -> bytes | None:
        try:
            data = self._path(digest).read_bytes()
        except OSError:
            return None
        return data if checksum(data) == digest else None

    def _keep(self, digest: str, data: bytes) -> None:
        path = self._path(digest)
        try:
            path.parent.mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
                f.write(data)
            os.replace(f.name, path)  # readers never see a partial file
        except OSError:
            pass  # a full or read-only cache only costs speed

    async def get(self, key, prototype, byte_range=None):
        digest = self.checksums.get(key)
        if digest is None or byte_range is not None:
            return await self._store.get(key, prototype, byte_range)
        data = await asyncio.to_thread(self._load, digest)
        if data is not None:
            return prototype.buffer.from_bytes(data)
        value = await self._store.get(key, prototype, byte_range)
        if value is not None:
            data = value.to_bytes()
            if checksum(data) == digest:
                await asyncio.to_thread(self._keep, digest, data)
        return value
