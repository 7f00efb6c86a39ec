"""How a `CachedStore` reads its source: fetches that watch metadata versions, reads on
behalf of a cluster peer, and the read-ahead's protocol (`prefetch.ReadAheadTarget`)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import TYPE_CHECKING, NamedTuple

from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer

from xarray_zcache.cache.freshness import ObjectChanged, part_reader
from xarray_zcache.keys import (
    byte_request,
    digest_key,
    is_plain_range,
    key_kind,
    parse_entry_key,
    tree_metadata,
)
from xarray_zcache.registry import SERVING_CACHE
from xarray_zcache.store_obstore import obstore_versions
from xarray_zcache.store_versions import LocalVersions, S3Versions, SourceVersions

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest, Store

    from xarray_zcache.cache.hybrid import HybridCache
    from xarray_zcache.cache.request import Read

__all__ = ["PeerServed", "SourceReads", "fetched_bytes", "source_versions"]

logger = logging.getLogger("xarray_zcache.store")


def fetched_bytes(buf: Buffer | None) -> bytes | None:
    return None if buf is None else buf.to_bytes()


_bytes = fetched_bytes


async def _nothing() -> None:
    return None


class PeerServed(NamedTuple):
    """What an owner read for a peer (`SourceReads.serve_peer`)."""

    #: the bytes, or None: the object is missing at the source
    data: bytes | None
    #: False when the source was read for this ask
    saved: bool
    #: the object's version the bytes are of (None: not known consistently, or none)
    version: str | None = None
    #: when that version was last confirmed at the source (the unit's last validation
    #: start, or the fill's own read); None: no validation (TTLs rule)
    confirmed: float | None = None


class SourceReads:
    """Part of `CachedStore` (its state is the store's)."""

    _store: Store
    _namespace: str
    _source: SourceVersions

    @property
    def cache(self) -> HybridCache:
        raise NotImplementedError

    def _ck(self, key: str) -> str:
        raise NotImplementedError

    def _read(self, key: str, byte_range: ByteRequest | None, *, prefetch: bool = False) -> Read:
        raise NotImplementedError

    def _filled(
        self, key: str, version: str | None, *, part: bool, reader: float | None = None
    ) -> None:
        raise NotImplementedError

    def _part_reader(self, key: str, byte_range: ByteRequest | None, began: float) -> float | None:
        """For a byte range of ``key`` (after its gate): since when this reader has been
        reading parts of the object (`freshness.part_reader`; a suffix - a shard's
        index - starts a read). None for a whole object."""
        if byte_range is None:
            return None
        first = isinstance(byte_range, SuffixByteRequest)
        head = isinstance(byte_range, RangeByteRequest) and byte_range.start == 0
        return part_reader(self._ck(key), began, first=first, head=head)

    def _versionless(
        self, key: str, byte_range: ByteRequest | None, data: bytes | None, version: str | None
    ) -> None:
        """A part of an object of a source with versions, read without one (a file that
        changed during the read), is neither cached nor served: the bytes may belong to
        another version than the reader's other parts (`ObjectChanged`: read again)."""
        # (an empty part, a range past the end of the object, combines with nothing)
        unversioned = version is None and bool(data) and byte_range is not None
        if unversioned and self._source.supported:
            raise ObjectChanged(
                f"xarray-zcache: {key!r} changed at the source while a part of it was "
                "read. Read again to get the new data."
            )

    def _served(self, cache: HybridCache, key: str, reader: float | None) -> None:
        """A byte range of ``key`` is about to be returned (`Freshness.served`)."""
        if reader is not None:
            cache.freshness.served(self._ck(key), reader)

    def _seen_since(self, key: str, version: str | None, began: float) -> float:
        raise NotImplementedError

    async def _validated(self, key: str, cache: HybridCache | None = None) -> None:
        raise NotImplementedError

    def _confirmed(self, key: str, cache: HybridCache) -> float | None:
        raise NotImplementedError

    def _gate_open(self, key: str, cache: HybridCache) -> bool:
        raise NotImplementedError

    async def _revalidate_under(self, prefix: str, since: float) -> None:
        raise NotImplementedError

    async def _fetch(
        self,
        cache: HybridCache,
        key: str,
        byte_range: ByteRequest | None,
        began: float | None = None,
        reader: float | None = None,
    ) -> bytes | None:
        """Read ``key`` from the wrapped store; a changed array metadata document drops
        the array's cached chunks before the caller sees it (`_stale_after`).

        ``began``: when the read began, before its gate (`_validated`) ran; a unit the
        gate validated for this very read (or a validation that already saw the new
        document) is not listed a second time. ``reader``: see `_part_reader`.
        """
        started = time.time() if began is None else began
        data, version = await self._source.get(key, byte_range)
        self._versionless(key, byte_range, data, version)
        metadata = byte_range is None and key_kind(key) == "metadata"
        if metadata:  # a validation that saw this version already counts (`seen_since`)
            started = self._seen_since(key, version, started)
        self._filled(key, version, part=byte_range is not None, reader=reader)
        if metadata:
            stale = self._stale_after(cache, key, data)
            if stale is not None:
                if self._source.supported:
                    try:  # drop only the chunks that changed: they have versions
                        await self._revalidate_under(stale, started)
                        return data
                    except Exception as exc:
                        logger.warning("xarray-zcache: validating %s failed (%s)", stale, exc)
                await cache.invalidating([stale], _nothing)
        return data

    def _stale_after(self, cache: HybridCache, key: str, data: bytes | None) -> str | None:
        """The prefix to invalidate because metadata document ``key`` changed, or None.

        Called with what the wrapped store just returned for ``key``. When an array's
        metadata (or a group's consolidated metadata) differs from what this cache
        last read - another writer rewrote or grew the array - the array's cached
        chunks may belong to the old version: they are dropped before any chunk is
        read under the new metadata. The last digest is kept per document, on disk,
        for every process sharing the folder.
        """
        prefix = tree_metadata(key, data)
        if prefix is None:
            return None
        dk = digest_key(self._namespace, key)
        digest = hashlib.blake2b(b"\x00gone" if data is None else data, digest_size=16).digest()
        old = cache.peek(dk)
        if old == digest:
            return None
        cache.put(dk, digest, kind="metadata", namespace=self._namespace, forever=True)
        if old is None:
            return None  # first sight: nothing cached can be older
        logger.info("xarray-zcache: %s changed in %s; its cached chunks are dropped", key, self)
        return self._ck(prefix.rstrip("/")) + "/" if prefix else self._namespace + "/"

    # -- serving the cluster: this worker owns a key another worker missed ----------------------

    async def serve_peer(self, cache: HybridCache, ck: str) -> PeerServed:
        """Read cache key ``ck`` of this store for a peer through ``cache``.

        Returns the bytes (None if missing), ``saved`` (False when the source was read
        for it), and the object's version with the time it was last confirmed: the
        gate runs first (a unit last validated longer than the interval ago is
        validated now), and the version is the one recorded before and after the
        bytes were taken (none if the two differ: the object changed meanwhile).
        Never asks other peers (``for_peer``), so two workers with different views of
        the membership cannot ping-pong.
        """
        parsed = parse_entry_key(self._namespace, ck)
        if parsed is None:
            raise ValueError(f"not a key of {self._namespace}: {ck!r}")
        key, spec = parsed
        byte_range = byte_request(spec)
        if not is_plain_range(byte_range):
            raise ValueError(f"not a cacheable range: {ck!r}")
        # every step (the gate, the version a fill records) uses ``cache``, the worker's:
        # this runs outside any task, where the store alone could not tell the worker
        token = SERVING_CACHE.set(cache)
        try:
            began = time.time()
            await self._validated(key, cache)
            confirmed = self._confirmed(key, cache)
            book = cache.freshness.book
            object_key = self._ck(key)
            before = book.version(object_key)
            reader = self._part_reader(key, byte_range, began)
            read = dataclasses.replace(self._read(key, byte_range), for_peer=True)
            loaded = False

            async def load() -> bytes | None:
                nonlocal loaded, before
                loaded = True
                data = await self._fetch(cache, key, byte_range, began, reader)
                before = book.version(object_key)  # what this fill recorded
                return data

            data = await cache.get_or_load(read, load)
            self._served(cache, key, reader)
            after = book.version(object_key)
            version = after if after == before else None
            if loaded and confirmed is not None:
                confirmed = max(confirmed, began)  # (the source was read just now)
            return PeerServed(data, not loaded, version, confirmed)
        finally:
            SERVING_CACHE.reset(token)

    def serve_peer_cached(self, cache: HybridCache, ck: str) -> PeerServed | None:
        """`serve_peer` when it needs no I/O, in the caller's thread (the owner's comm
        loop: no hop to zarr's loop): the answer if whole object ``ck`` is in ``cache``'s
        memory and its unit needs no validation now (the gate is open), else ``None``
        (nothing counted; `serve_peer` answers then). The same answer: the bytes, their
        version recorded before and after they were taken, the unit's confirmation time."""
        parsed = parse_entry_key(self._namespace, ck)
        if parsed is None or byte_request(parsed[1]) is not None:
            return None  # byte ranges take the full path (`part_reader` bookkeeping)
        key = parsed[0]
        if not self._gate_open(key, cache):
            return None  # the owner confirms first (`serve_peer`)
        token = SERVING_CACHE.set(cache)
        try:
            confirmed = self._confirmed(key, cache)
            book = cache.freshness.book
            object_key = self._ck(key)
            before = book.version(object_key)
            data = cache.memory_hit(dataclasses.replace(self._read(key, None), for_peer=True))
            if data is None:
                return None
            after = book.version(object_key)
            return PeerServed(data, True, after if after == before else None, confirmed)
        finally:
            SERVING_CACHE.reset(token)

    # -- what the read-ahead needs (`prefetch.ReadAheadTarget`) ----------------------------------

    def peek(self, key: str) -> bytes | None:
        """The cached bytes of ``key`` (no request, no stats), or ``None``."""
        return self.cache.peek(self._ck(key))

    def is_cached(self, key: str) -> bool:
        """Whether the whole object ``key`` is cached (no request, no stats)."""
        return self.cache.contains(self._ck(key))

    def read_ahead_budget(self) -> tuple[int, float]:
        """(memory tier capacity in bytes, disk-writer backlog as a fraction)."""
        cache = self.cache
        return cache.memory_tier.capacity, cache.disk_backlog

    async def read_ahead(self, key: str) -> None:
        """Read chunk ``key`` into the cache ahead of its reader (a request sent, no hit)."""

        cache = self.cache

        async def load() -> bytes | None:
            return await self._fetch(cache, key, None)

        await cache.get_or_load(self._read(key, None, prefetch=True), load)


def source_versions(store: Store) -> SourceVersions:
    """How to read ``store`` with versions (a `SourceVersions` without any if it has none)."""
    from zarr.storage import FsspecStore, LocalStore, ObjectStore

    if isinstance(store, ObjectStore):
        return obstore_versions(store)
    if isinstance(store, LocalStore):
        return LocalVersions(store)
    if isinstance(store, FsspecStore):
        protocol = store.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        if "s3" in protocols and hasattr(store.fs, "_call_s3"):
            return S3Versions(store)
    return SourceVersions(store)
