"""Reading a wrapped store *with versions*: what identifies the content of an object
when it is read, and the versions of many objects in one listing.

* S3 (an `FsspecStore` over s3fs): the ETag that comes with the GET response itself
  (one request, as before: the object's bytes and the version they belong to cannot
  disagree), and ``ListObjectsV2`` pages of up to 1,000 keys with their ETags.
* A `LocalStore`: ``mtime_ns:size:inode`` of the file, from ``stat`` before and after
  the read (a file changing during the read gets no version: it is validated again).
* Any other store: no versions; entries live by their TTLs (`supported` is False).

Versions are compared for equality only, never with the cache host's clock, so a
clock skew between the cache host and the store cannot make a change look old.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, Any

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype

if TYPE_CHECKING:
    from zarr.abc.store import Store

__all__ = ["LocalVersions", "S3Versions", "SourceVersions"]

#: bytes read (None: missing) and the version they belong to (None: unknown)
Fetched = tuple[bytes | None, str | None]

#: keys per ListObjectsV2 page (the S3 maximum)
PAGE = 1000


def _etag(value: object) -> str | None:
    return None if not value else "etag:" + str(value).strip('"')


def _stat_version(st: os.stat_result) -> str:
    # ctime too: a file rewritten in place with the same size and its mtime restored
    # (``os.utime``, ``cp -p``, ``rsync -t``) changes its ctime, which no one can set
    return f"file:{st.st_mtime_ns}:{st.st_size}:{st.st_ino}:{st.st_ctime_ns}"


class SourceVersions:
    """Reads of one wrapped store that also return the object's version (a string,
    None if unknown), and listings of versions. This base class knows none."""

    supported = False

    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, key: str, byte_range: ByteRequest | None) -> Fetched:
        buf = await self.store.get(key, default_buffer_prototype(), byte_range)
        return (None if buf is None else buf.to_bytes()), None

    def get_sync(self, key: str, byte_range: ByteRequest | None) -> Fetched:
        getter = self.store.get_sync  # type: ignore[attr-defined]
        buf = getter(key, prototype=default_buffer_prototype(), byte_range=byte_range)
        return (None if buf is None else buf.to_bytes()), None

    async def listing(
        self, folder: str, recursive: bool, starts: str = ""
    ) -> tuple[dict[str, str], int]:
        """{key: version} of the objects under ``folder`` ("" for the root; only those
        directly in it unless ``recursive``; only names starting with ``starts``), and
        the number of requests sent."""
        raise NotImplementedError(f"{type(self.store).__name__} exposes no object versions")

    def listing_sync(
        self, folder: str, recursive: bool, starts: str = ""
    ) -> tuple[dict[str, str], int]:
        raise NotImplementedError(f"{type(self.store).__name__} exposes no object versions")


#: attribute of a listing's exception: the requests it sent before it failed
_SENT = "_zcache_requests_sent"


def pages_sent(exc: BaseException, requests: int) -> None:
    """``exc``, which ended a listing after it sent ``requests`` requests (read back by
    `requests_sent`, so that the pages before a failing one are counted too)."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _SENT, requests)


def requests_sent(exc: BaseException, default: int) -> int:
    """The requests a failed listing sent (`pages_sent`), else ``default``."""
    sent = getattr(exc, _SENT, None)
    return sent if isinstance(sent, int) else default


class S3Versions(SourceVersions):
    """ETags of an `FsspecStore` over s3fs."""

    supported = True

    def _path(self, key: str) -> str:
        from zarr.storage._utils import _dereference_path

        return _dereference_path(self.store.path, key)  # type: ignore[attr-defined]

    async def get(self, key: str, byte_range: ByteRequest | None) -> Fetched:
        from s3fs.core import _error_wrapper, version_id_kw

        store: Any = self.store
        if not store._is_open:
            await store._open()
        fs = store.fs
        path = self._path(key)
        bucket, name, version_id = fs.split_path(path)
        head: dict[str, str] = {}
        if isinstance(byte_range, RangeByteRequest):
            head["Range"] = await fs._process_limits(path, byte_range.start, byte_range.end)
        elif isinstance(byte_range, OffsetByteRequest):
            head["Range"] = await fs._process_limits(path, byte_range.offset, None)
        elif isinstance(byte_range, SuffixByteRequest):
            head["Range"] = await fs._process_limits(path, -byte_range.suffix, None)

        async def call() -> tuple[bytes, str | None]:
            resp = await fs._call_s3(
                "get_object",
                Bucket=bucket,
                Key=name,
                **version_id_kw(version_id),
                **head,
                **fs.req_kw,
            )
            try:
                return await resp["Body"].read(), _etag(resp.get("ETag"))
            finally:
                resp["Body"].close()

        try:
            data, version = await _error_wrapper(call, retries=fs.retries)
        except store.allowed_exceptions:
            return None, None
        except OSError as exc:
            if "not satisfiable" in str(exc):  # as FsspecStore.get
                return b"", None
            raise
        return data, version

    async def listing(
        self, folder: str, recursive: bool, starts: str = ""
    ) -> tuple[dict[str, str], int]:
        store: Any = self.store
        if not store._is_open:
            await store._open()
        fs = store.fs
        root = self._path(folder).rstrip("/") if folder else store.path.rstrip("/")
        bucket, prefix, _ = fs.split_path(root + "/x")
        prefix = prefix[:-1] + starts  # "path/" (or "" at the bucket's root)
        base = fs.split_path(store.path.rstrip("/") + "/x")[1][:-1]
        found: dict[str, str] = {}
        requests = 0
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE}
            if not recursive:
                kwargs["Delimiter"] = "/"
            if token:
                kwargs["ContinuationToken"] = token
            try:
                resp = await fs._call_s3("list_objects_v2", **kwargs, **fs.req_kw)
            except BaseException as exc:
                pages_sent(exc, requests + 1)  # (the pages before it, and this one)
                raise
            requests += 1
            for item in resp.get("Contents", []):
                version = _etag(item.get("ETag"))
                if version is not None and item["Key"].startswith(base):
                    found[item["Key"][len(base) :]] = version
            token = resp.get("NextContinuationToken") if resp.get("IsTruncated") else None
            if not token:
                return found, requests


class LocalVersions(SourceVersions):
    """File times of a `LocalStore` (no requests: ``stat`` per file)."""

    supported = True

    def _file(self, key: str) -> str:
        return os.path.join(str(self.store.root), key)  # type: ignore[attr-defined]

    def _stat(self, key: str) -> os.stat_result | None:
        try:
            return os.stat(self._file(key))
        except OSError:
            return None

    def _versioned(self, before: os.stat_result | None, key: str) -> str | None:
        after = self._stat(key)
        if before is None or after is None:
            return None
        first, second = _stat_version(before), _stat_version(after)
        return first if first == second else None

    async def get(self, key: str, byte_range: ByteRequest | None) -> Fetched:
        before = self._stat(key)  # (a stat is a few microseconds: no thread)
        data, _ = await super().get(key, byte_range)
        if data is None:
            return None, None
        return data, self._versioned(before, key)

    def get_sync(self, key: str, byte_range: ByteRequest | None) -> Fetched:
        before = self._stat(key)
        data, _ = super().get_sync(key, byte_range)
        if data is None:
            return None, None
        return data, self._versioned(before, key)

    async def listing(
        self, folder: str, recursive: bool, starts: str = ""
    ) -> tuple[dict[str, str], int]:
        return await asyncio.to_thread(self.listing_sync, folder, recursive, starts)

    def listing_sync(
        self, folder: str, recursive: bool, starts: str = ""
    ) -> tuple[dict[str, str], int]:
        found: dict[str, str] = {}
        top = folder.strip("/")
        todo = [top]
        while todo:
            rel = todo.pop()
            try:
                entries = list(os.scandir(self._file(rel) if rel else str(self.store.root)))  # type: ignore[attr-defined]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if rel == top and not entry.name.startswith(starts):
                    continue
                key = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if recursive:
                            todo.append(key)
                    elif entry.is_file():
                        found[key] = _stat_version(entry.stat())
                except OSError:
                    continue
        return found, 0
