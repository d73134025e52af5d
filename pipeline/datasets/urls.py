"""Where a store lives: URLs and paths turned into filesystems and zarr stores, and the one-line
reasons an I/O failure gives.

Every reader and writer of stores (``store``, ``remote``, ``merge``) goes through these, so a path,
``file://``, ``memory://``, ``s3://`` or a chained ``simplecache::s3://`` URL behaves the same
everywhere. Credentials and endpoints come from the environment or fsspec's config, never from a
URL we print: :func:`display_url` drops any ``user:password@`` part.
"""

from __future__ import annotations

import contextlib
import os
from urllib.parse import urlsplit, urlunsplit

import fsspec
import zarr

from pipeline.errors import StoreError


def fs_path(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for ``url``; :class:`StoreError` for an unknown protocol or a
    missing fsspec backend (``s3fs``, ``gcsfs``)."""
    try:
        return fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise StoreError(f"cannot open {url}: {e}") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (plain paths and ``file://``)."""
    return "file" in fs.protocol or "local" in fs.protocol


def zarr_store(url: str, storage_options: dict | None, read_only: bool):
    """A zarr store for ``url``. Local paths get zarr's LocalStore, which writes files atomically
    (temp file + rename); fsspec's local filesystem would write chunks in place."""
    fs, path = fs_path(url, storage_options)
    if is_local(fs):
        return zarr.storage.LocalStore(path, read_only=read_only)
    if "::" in str(url):
        # A chained URL such as simplecache::s3://...: zarr would rebuild it with the inner
        # filesystem asynchronous, which the sync cache layer cannot drive; wrap this one instead.
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        return zarr.storage.FsspecStore(
            AsyncFileSystemWrapper(fs, asynchronous=True), path=path, read_only=read_only
        )
    return zarr.storage.FsspecStore.from_url(
        str(url), storage_options=storage_options, read_only=read_only
    )


def is_io_error(e: BaseException) -> bool:
    """True for errors of storage I/O, including remote backends' own (botocore's "Unable to
    locate credentials", google-auth's), which are not OSErrors."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "google", "aiohttp")


def reason(e: Exception) -> str:
    """The short human part of an error: ``strerror`` for OS errors, else its message or type."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


@contextlib.contextmanager
def io_errors(what: str):
    """Turn a storage I/O error inside the block into ``StoreError(f"{what}: {reason}")``
    (one line, no traceback); every other error passes through unchanged."""
    try:
        yield
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless it is I/O
        if not is_io_error(e):
            raise
        raise StoreError(f"{what}: {reason(e)}") from None


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """True if anything but an empty directory is at ``path``; StoreError if it can't be reached."""
    with io_errors(f"cannot reach {fs.unstrip_protocol(path)}"):
        if not fs.exists(path):
            return False
        return not (fs.isdir(path) and not fs.ls(path, detail=False))


def has_zarr_metadata(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """True where a zarr node (a ``zarr.json`` document) is at ``path``."""
    return fs.exists(path.rstrip("/") + "/zarr.json")


def display_url(url: str) -> str:
    """``url`` without any ``user:password@`` part: safe to print and to record as provenance."""
    parts = urlsplit(str(url))
    if parts.netloc and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return str(url)


def store_location(url: str, storage_options: dict | None = None) -> tuple[str, str]:
    """(filesystem, path) naming where ``url`` points, equal for two spellings of one place."""
    fs, path = fs_path(url, storage_options)
    if is_local(fs):
        return "file", os.path.realpath(path)
    return type(fs).__name__, path.rstrip("/")
