"""`CachedStore`: a zarr v3 `Store` that reads through a `HybridCache`."""

from __future__ import annotations

import asyncio
import os
import posixpath
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
    _store_supports_sync_io,
)
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from xarray_zcache.cache.disk import DiskTier
from xarray_zcache.cache.hybrid import Fill, HybridCache
from xarray_zcache.cache.stats import CacheStats
from xarray_zcache.config import CacheConfig
from xarray_zcache.prefetch import ScanPrefetcher
from xarray_zcache.registry import current_worker_address, get_cache, resolve_config

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "METADATA_NAMES",
    "CachedStore",
    "SyncCachedStore",
    "array_of",
    "key_kind",
    "store_namespace",
]

METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})
# separates a key from the byte range of a ranged entry; never part of a zarr key
_RANGE_SEP = "\x00"
# prefix of listing entries, separated from the namespace by a character keys never hold
_LIST_SEP = "\x01"


def key_kind(key: str) -> str:
    """``"metadata"`` for zarr metadata documents, ``"chunk"`` for everything else."""
    return "metadata" if key.rpartition("/")[2] in METADATA_NAMES else "chunk"


def array_of(cache_key: str) -> str:
    """The zarr array a cache key belongs to: its path without the chunk-grid part."""
    head = cache_key.split(_RANGE_SEP, 1)[0]
    if "/c/" in head:  # zarr v3 default chunk key encoding
        return head.rsplit("/c/", 1)[0]
    return posixpath.dirname(head)


def _check_byte_range(byte_range: object) -> None:
    if byte_range is not None and not isinstance(
        byte_range, RangeByteRequest | OffsetByteRequest | SuffixByteRequest
    ):
        raise TypeError(f"Unexpected byte_range, got {byte_range}.")


def _range_suffix(byte_range: ByteRequest) -> str:
    if isinstance(byte_range, RangeByteRequest):
        return f"r{byte_range.start}-{byte_range.end}"
    if isinstance(byte_range, OffsetByteRequest):
        return f"o{byte_range.offset}"
    return f"s{byte_range.suffix}"


def _slice(data: bytes, byte_range: ByteRequest | None) -> bytes:
    """Apply ``byte_range`` to a whole object, with zarr's semantics."""
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    return data[max(0, len(data) - byte_range.suffix) :]


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return parts._replace(netloc=host).geturl()
    return url


def store_namespace(store: Store) -> str:
    """A canonical, credential-free name of the data a store points at.

    Two stores over the same data get the same namespace (so they share cache
    entries, also across processes through the disk tier); stores over different
    data never do. Built from the protocol, endpoint and path; never from ``id()``
    (ids are reused, which would serve one dataset's bytes for another).
    """
    from zarr.storage import FsspecStore, LocalStore, MemoryStore

    if isinstance(store, CachedStore):
        return store.namespace
    inner = getattr(store, "_store", None)
    if isinstance(inner, Store):  # a WrapperStore: the data is the wrapped store's
        return store_namespace(inner)
    if isinstance(store, LocalStore):
        return "file://" + os.path.realpath(os.fspath(store.root))
    if isinstance(store, FsspecStore):
        fs = store.fs
        protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
        endpoint = (
            getattr(fs, "endpoint_url", None)
            or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
            or ""
        )
        endpoint = _strip_userinfo(str(endpoint)).rstrip("/")
        path = store.path.strip("/")
        # endpoint before path: a store opened at a sub-path of another store gets the
        # same cache keys for the same objects (so writes through either invalidate both)
        return f"{protocol}+{endpoint}/{path}" if endpoint else f"{protocol}://{path}"
    if isinstance(store, MemoryStore):
        # a MemoryStore has no location: name it once, for its lifetime
        ns: str | None = getattr(store, "_zcache_namespace", None)
        if ns is None:
            ns = f"memory://{uuid.uuid4().hex}"
            store._zcache_namespace = ns  # type: ignore[attr-defined]
        return ns
    return f"{type(store).__module__}.{type(store).__qualname__}:{_strip_userinfo(str(store))}"


# single flight: (event loop, cache key) -> the future of the fetch in flight, per cache
_INFLIGHT: weakref.WeakKeyDictionary[
    HybridCache, dict[tuple[int, str], asyncio.Future[bytes | None]]
] = weakref.WeakKeyDictionary()


# the stores bound to each cache, by namespace: lets a Dask worker warm keys on command
_STORES: weakref.WeakKeyDictionary[HybridCache, dict[str, weakref.ref[CachedStore]]] = (
    weakref.WeakKeyDictionary()
)


async def warm_keys(cache: HybridCache, keys: Iterable[str]) -> int:
    """Read cache keys (``namespace/key``) into ``cache`` through the stores bound to it.

    Keys whose store is unknown in this process are skipped. Returns how many
    keys were read. Runs the reads on zarr's event loop, where the stores live.
    """
    from zarr.core.sync import sync

    stores = {ns: ref() for ns, ref in _STORES.get(cache, {}).items()}
    n = 0
    for ck in keys:
        if _RANGE_SEP in ck or cache.contains(ck):
            continue
        for ns, store in stores.items():
            if store is not None and ck.startswith(ns + "/"):
                key = ck[len(ns) + 1 :]
                await asyncio.to_thread(sync, store.get(key, default_buffer_prototype()))
                n += 1
                break
    return n


class CachedStore(Store):
    """A zarr store that serves reads of another store from a persistent hybrid cache.

    Every read path goes through the cache: `get` (whole objects and every
    `ByteRequest` kind), `get_partial_values`, `get_ranges` (used by the
    sharding codec) and, when the wrapped store supports synchronous I/O,
    `get_sync`. A ranged read is served from a cached whole object when there is
    one; otherwise it is cached under its range. Concurrent misses of one key
    send one request to the wrapped store ("single flight"). Errors from the
    wrapped store propagate unchanged and are never cached; a missing key (a
    metadata probe, or a chunk zarr left unwritten because it holds only the fill
    value) is remembered for ``negative_ttl`` seconds.

    Writes (`set`, `set_if_not_exists`, `_set_many`) go to the wrapped store
    first, then update (or, with ``cache_on_write=False``, only invalidate) the
    cache. Deletes (`delete`, `delete_dir`, `clear`) go to the wrapped store, then
    invalidate the key with its ranges, negative entries and listings.

    The store pickles as its wrapped store and config, never the cache contents:
    unpickled in another process or on a Dask worker, it binds at its first call to
    the cache of that process or worker (see `xarray_zcache.registry.get_cache`).

    Thread-safety: safe to use from several threads and event loops at once (the
    cache is thread-safe; single flight is per event loop).

    Parameters
    ----------
    store
        The store to wrap (`FsspecStore`, `LocalStore`, any `zarr.abc.store.Store`).
    config
        A `CacheConfig`, the name of a cache configured under ``zcache.caches``, or
        ``None`` for the defaults from dask config.
    namespace
        Override the name under which this data is cached (default: derived from the
        store's protocol, endpoint and path by `store_namespace`).
    read_only
        If given, wrap ``store.with_read_only(read_only)`` instead of ``store``.

    Examples
    --------
    >>> import zarr
    >>> from zarr.storage import MemoryStore
    >>> from xarray_zcache import CacheConfig, CachedStore
    >>> store = CachedStore(MemoryStore(), CacheConfig().without_disk_cache())
    >>> arr = zarr.create_array(store, shape=(4,), chunks=(2,), dtype="i4")
    >>> arr[:] = [1, 2, 3, 4]
    >>> arr[:].tolist()
    [1, 2, 3, 4]
    >>> store.stats().hit_rate() > 0
    True
    """

    def __new__(cls, store: Store | None = None, *args: Any, **kwargs: Any) -> CachedStore:
        # (store is None when unpickling: the class was chosen when the object was made)
        if cls is CachedStore and store is not None and _store_supports_sync_io(store):
            cls = SyncCachedStore
        return super().__new__(cls)

    def __init__(
        self,
        store: Store,
        config: CacheConfig | str | None = None,
        *,
        namespace: str | None = None,
        read_only: bool | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise TypeError(
                f"store: expected a zarr.abc.store.Store, got {type(store).__name__}; "
                "use xarray_zcache.open_store(url) for URLs"
            )
        if read_only is not None and read_only != store.read_only:
            store = store.with_read_only(read_only)
        self._store = store
        self._config = resolve_config(config)
        self._namespace = namespace if namespace is not None else store_namespace(store)
        self._bindings: dict[str | None, HybridCache] = {}
        self._prefetchers: dict[int, ScanPrefetcher] = {}

    # -- identity, pickling --------------------------------------------------------------------

    @property
    def inner(self) -> Store:
        """The wrapped store."""
        return self._store

    @property
    def config(self) -> CacheConfig:
        """The cache configuration this store binds to."""
        return self._config

    @property
    def namespace(self) -> str:
        """Name under which this store's keys are cached."""
        return self._namespace

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CachedStore)
            and self._namespace == other._namespace
            and self._config == other._config
            and self.read_only == other.read_only
            and type(self._store) is type(other._store)
        )

    def __hash__(self) -> int:
        return hash((type(self), self._namespace))

    def __dask_tokenize__(self) -> tuple[object, ...]:
        return (type(self).__qualname__, self._namespace, self._store.read_only, self._config)

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self._store, "config": self._config, "namespace": self._namespace}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._store = state["store"]
        self._config = state["config"]
        self._namespace = state["namespace"]
        self._bindings = {}
        self._prefetchers = {}

    def __repr__(self) -> str:
        return f"CachedStore({self._store!r}, cache={self._config.name!r})"

    def __str__(self) -> str:
        return f"zcache::{self._store}"

    @property
    def cache(self) -> HybridCache:
        """The cache this store uses here (this process, or this Dask worker)."""
        address = current_worker_address()
        cache = self._bindings.get(address)
        if cache is None or cache.closed:
            cache = get_cache(self._config)
            self._bindings[address] = cache
            _STORES.setdefault(cache, {})[self._namespace] = weakref.ref(self)
        return cache

    def stats(self) -> CacheStats:
        """Statistics of the cache this store uses (shared with other stores using it)."""
        return self.cache.stats()

    def analytics(self) -> dict[str, Any]:
        """Miss-ratio curves, sizing advice and per-array access patterns of recent reads.

        See `HybridCache.analytics`; arrays are told apart by their zarr path.
        """
        return self.cache.analytics(group=array_of)

    def _ck(self, key: str) -> str:
        return f"{self._namespace}/{key}"

    # -- open/close, read-only -----------------------------------------------------------------

    @classmethod
    async def open(cls, *args: Any, **kwargs: Any) -> Self:
        store = cls(*args, **kwargs)
        await store._open()
        return store

    async def _open(self) -> None:
        await self._store._open()

    async def _ensure_open(self) -> None:
        await self._store._ensure_open()

    @property
    def _is_open(self) -> bool:  # type: ignore[override]
        return self._store._is_open

    @_is_open.setter
    def _is_open(self, value: bool) -> None:
        raise NotImplementedError("CachedStore is opened through the store it wraps")

    @property
    def read_only(self) -> bool:
        return self._store.read_only

    def _check_writable(self) -> None:
        self._store._check_writable()

    def with_read_only(self, read_only: bool = False) -> CachedStore:
        return CachedStore(
            self._store.with_read_only(read_only), self._config, namespace=self._namespace
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._store.close()

    # -- capabilities --------------------------------------------------------------------------

    @property
    def supports_writes(self) -> bool:
        return self._store.supports_writes

    @property
    def supports_deletes(self) -> bool:
        return self._store.supports_deletes

    @property
    def supports_listing(self) -> bool:
        return self._store.supports_listing

    @property
    def supports_consolidated_metadata(self) -> bool:
        return self._store.supports_consolidated_metadata

    @property
    def _supports_sync_io(self) -> bool:
        return _store_supports_sync_io(self._store)

    # -- reads ---------------------------------------------------------------------------------

    def _lookup(
        self,
        tier_lookup: Callable[..., bytes | None],
        key: str,
        byte_range: ByteRequest | None,
        kind: str,
    ) -> bytes | None:
        """A read from one tier: the whole object (sliced), else the cached range."""
        ck = self._ck(key)
        whole = tier_lookup(ck, kind=kind)
        if whole is not None:
            return _slice(whole, byte_range)
        if byte_range is not None:
            return tier_lookup(ck + _RANGE_SEP + _range_suffix(byte_range), kind=kind)
        return None

    def _lookup_memory(
        self, cache: HybridCache, key: str, byte_range: ByteRequest | None, kind: str
    ) -> bytes | None:
        return self._lookup(cache.lookup_memory, key, byte_range, kind)

    def _lookup_disk(
        self, cache: HybridCache, key: str, byte_range: ByteRequest | None, kind: str
    ) -> bytes | None:
        return self._lookup(cache.lookup_disk, key, byte_range, kind)

    def _cached(self, key: str) -> bytes | None:
        """Whole value of ``key`` if the cache holds it (no request, no stats)."""
        cache = self.cache
        ck = self._ck(key)
        value = cache.memory.peek(ck)
        if value is None and cache.disk is not None and cache.disk.might_contain(ck):
            value = cache.disk.get(ck)
        return value

    def _maybe_on_disk(self, disk: DiskTier, key: str, byte_range: ByteRequest | None) -> bool:
        # a stat or two in the event loop spares the cold path a thread hop per miss
        ck = self._ck(key)
        if disk.might_contain(ck):
            return True
        return byte_range is not None and disk.might_contain(
            ck + _RANGE_SEP + _range_suffix(byte_range)
        )

    def _entry_key(self, key: str, byte_range: ByteRequest | None) -> str:
        ck = self._ck(key)
        return ck if byte_range is None else ck + _RANGE_SEP + _range_suffix(byte_range)

    def _admit(
        self,
        cache: HybridCache,
        fill: Fill,
        key: str,
        byte_range: ByteRequest | None,
        data: bytes | None,
        kind: str,
        seconds: float,
    ) -> None:
        cache.record_miss(fill.key, kind=kind, nbytes=len(data or b""), seconds=seconds)
        if data is None:
            if byte_range is None:  # zarr leaves all-fill chunks unwritten: remember that too
                cache.set_negative(fill, self._namespace)
            return
        cache.fill(fill, data, kind=kind, namespace=self._namespace)

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        # docstring inherited
        _check_byte_range(byte_range)
        prototype = prototype or default_buffer_prototype()
        cache = self.cache
        kind = key_kind(key)
        data = self._lookup_memory(cache, key, byte_range, kind)
        if data is not None:
            # the hit path: only a scan in progress needs to hear about hits
            if self._prefetchers and kind == "chunk" and byte_range is None:
                pf = self._prefetcher()
                if pf is not None and pf.active:
                    await pf.observe(key, miss=False)
            return prototype.buffer.from_bytes(data)
        if byte_range is None and cache.is_negative(self._ck(key)):
            return None
        pf = self._prefetcher() if kind == "chunk" and byte_range is None else None
        if cache.disk is not None and self._maybe_on_disk(cache.disk, key, byte_range):
            data = await asyncio.to_thread(self._lookup_disk, cache, key, byte_range, kind)
        if data is None:
            if pf is not None:
                await pf.observe(key, miss=True)  # may start reading ahead
            data = await self._fetch(cache, key, byte_range, kind)
            if data is None:
                return None
        elif pf is not None and pf.active:
            await pf.observe(key, miss=False)
        return prototype.buffer.from_bytes(data)

    def _prefetcher(self) -> ScanPrefetcher | None:
        """The read-ahead of this store on the running event loop (None if disabled)."""
        depth = self._config.prefetch_depth
        if depth <= 0 or current_worker_address() is not None:
            # on a Dask cluster the workers split the scan between them: one worker's
            # read-ahead would fetch chunks that other workers are about to read
            return None
        loop = id(asyncio.get_running_loop())
        pf = self._prefetchers.get(loop)
        if pf is None:
            pf = self._prefetchers[loop] = ScanPrefetcher(self, depth)
        return pf

    async def _prefetch(self, key: str) -> None:
        """Read chunk ``key`` into the cache ahead of its reader (see `ScanPrefetcher`)."""
        cache = self.cache
        if cache.contains(self._ck(key)):
            return
        await self._fetch(cache, key, None, "chunk")
        cache.record_prefetch()

    async def _fetch(
        self, cache: HybridCache, key: str, byte_range: ByteRequest | None, kind: str
    ) -> bytes | None:
        """Fetch from the wrapped store, one request per key however many callers wait."""
        ek = self._entry_key(key, byte_range)
        loop = asyncio.get_running_loop()
        inflight = _INFLIGHT.setdefault(cache, {})
        slot = (id(loop), ek)
        while (fut := inflight.get(slot)) is not None:
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                if not fut.cancelled():
                    raise  # we were cancelled ourselves
                # the leader was cancelled: take over
        # another fetch (a read-ahead, say) may have filled the entry while this caller
        # looked on disk: check memory again before sending a request
        again = self._lookup_memory(cache, key, byte_range, kind)
        if again is not None:
            return again
        fut = loop.create_future()
        inflight[slot] = fut
        fill = cache.begin(ek)
        t0 = time.perf_counter()
        try:
            buf = await self._store.get(key, default_buffer_prototype(), byte_range)
            data = None if buf is None else buf.to_bytes()
            self._admit(cache, fill, key, byte_range, data, kind, time.perf_counter() - t0)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            cache.record_error()
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        else:
            fut.set_result(data)
            return data
        finally:
            cache.end(fill)
            if inflight.get(slot) is fut:
                del inflight[slot]

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        # docstring inherited
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in list(key_ranges))))

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        reqs = list(requests)
        results = await asyncio.gather(*(self.get(*r) for r in reqs))
        for req, res in zip(reqs, results, strict=True):
            yield req[0], res

    # get_ranges: Store's default coalesces the ranges and reads them through self.get,
    # so the sharding codec's reads are cached (under the coalesced ranges).

    async def exists(self, key: str) -> bool:
        # docstring inherited
        cache = self.cache
        ck = self._ck(key)
        if ck in cache.memory:
            return True
        if cache.is_negative(ck):
            return False
        return await self._store.exists(key)

    async def getsize(self, key: str) -> int:
        # docstring inherited
        cache = self.cache
        data = cache.memory.peek(self._ck(key))
        if data is not None:
            return len(data)
        return await self._store.getsize(key)

    async def getsize_prefix(self, prefix: str) -> int:
        # docstring inherited
        return await self._store.getsize_prefix(prefix)

    async def is_empty(self, prefix: str) -> bool:
        # docstring inherited
        if prefix != "" and not prefix.endswith("/"):
            prefix += "/"
        async for _ in self.list_prefix(prefix):
            return False
        return True

    # -- listings ------------------------------------------------------------------------------

    async def _listing(
        self, op: str, prefix: str, source: AsyncIterator[str]
    ) -> AsyncIterator[str]:
        cache = self.cache
        lk = f"{self._namespace}/{_LIST_SEP}{op}{_LIST_SEP}{prefix}"
        names = cache.get_listing(lk)
        if names is None:
            generation = cache.listing_generation()
            names = tuple([name async for name in source])
            cache.put_listing(lk, names, generation)
        for name in names:
            yield name

    def list(self) -> AsyncIterator[str]:
        # docstring inherited
        return self._listing("list", "", self._store.list())

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        return self._listing("prefix", prefix, self._store.list_prefix(prefix))

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        return self._listing("dir", prefix, self._store.list_dir(prefix))

    # -- writes --------------------------------------------------------------------------------

    def _invalidate(self, cache: HybridCache, key: str) -> None:
        ck = self._ck(key)
        cache.invalidate(ck)
        cache.invalidate_prefix(ck + _RANGE_SEP)
        # every listing: another store may be opened at a parent or child path of this one
        cache.drop_listings("")

    def _after_write(self, cache: HybridCache, key: str, value: Buffer, fill: Fill) -> None:
        """Invalidate ``key`` after the wrapped store took a new value, then cache it.

        The written value goes to this process's memory tier only: the generation
        counters order the writers of this process, but nothing orders writers in
        other processes sharing the disk tier (their values may reach the wrapped
        store in the other order). The next read from disk fetches what the store holds.
        """
        self._invalidate(cache, key)
        data = value.to_bytes()
        cache.record_write(len(data))
        if self._config.cache_on_write:
            cache.fill(
                fill,
                data,
                kind=key_kind(key),
                namespace=self._namespace,
                own_invalidations=1,
                disk=False,
            )

    async def set(self, key: str, value: Buffer) -> None:
        # docstring inherited
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(
                f"CachedStore.set(): `value` must be a Buffer instance. Got an instance of "
                f"{type(value)} instead."
            )
        cache = self.cache
        # before the write too: a crash between the write and the invalidation after it
        # must not leave the old value (or a negative entry) in the persistent disk tier
        self._invalidate(cache, key)
        fill = cache.begin(self._ck(key))
        try:
            await self._store.set(key, value)
        except BaseException:
            # the wrapped store may or may not hold the new value: cache neither
            self._invalidate(cache, key)
            raise
        else:
            self._after_write(cache, key, value, fill)
        finally:
            cache.end(fill)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # docstring inherited
        self._check_writable()
        cache = self.cache
        self._invalidate(cache, key)
        try:
            await self._store.set_if_not_exists(key, value)
        finally:
            # we cannot tell whether our value or an existing one won: cache neither
            self._invalidate(cache, key)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def delete(self, key: str) -> None:
        # docstring inherited
        self._check_writable()
        self._invalidate(self.cache, key)
        try:
            await self._store.delete(key)
        finally:
            self._invalidate(self.cache, key)

    async def delete_dir(self, prefix: str) -> None:
        # docstring inherited
        self._check_writable()
        self._invalidate_dir(prefix)
        try:
            await self._store.delete_dir(prefix)
        finally:
            self._invalidate_dir(prefix)

    async def clear(self) -> None:
        # docstring inherited
        self._check_writable()
        self._invalidate_dir("")
        try:
            await self._store.clear()
        finally:
            self._invalidate_dir("")

    def _invalidate_dir(self, prefix: str) -> None:
        cache = self.cache
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        cache.invalidate_prefix(self._ck(prefix))
        cache.drop_listings("")


class SyncCachedStore(CachedStore):
    """A `CachedStore` over a store with synchronous I/O (`LocalStore`, `MemoryStore`).

    `CachedStore(store)` returns one of these when ``store`` supports zarr's sync
    surface, so that ``isinstance(store, SupportsGetSync)`` (how zarr decides to
    take its sync path) tells the truth: hits are then served without an event loop.
    """

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        """Synchronous `get` (only when the wrapped store supports synchronous I/O).

        Hits are served without an event loop; misses call the wrapped store's
        ``get_sync`` (no single flight across threads on this path).
        """
        _check_byte_range(byte_range)
        prototype = prototype or default_buffer_prototype()
        getter = self._store.get_sync  # type: ignore[attr-defined]
        cache = self.cache
        kind = key_kind(key)
        data = self._lookup_memory(cache, key, byte_range, kind)
        if data is None:
            if byte_range is None and cache.is_negative(self._ck(key)):
                return None
            data = self._lookup_disk(cache, key, byte_range, kind)
        if data is None:
            fill = cache.begin(self._entry_key(key, byte_range))
            t0 = time.perf_counter()
            try:
                buf = getter(key, prototype=default_buffer_prototype(), byte_range=byte_range)
                data = None if buf is None else buf.to_bytes()
                self._admit(cache, fill, key, byte_range, data, kind, time.perf_counter() - t0)
            except BaseException:
                cache.record_error()
                raise
            finally:
                cache.end(fill)
            if data is None:
                return None
        return prototype.buffer.from_bytes(data)

    def set_sync(self, key: str, value: Buffer) -> None:
        """Synchronous `set` (only when the wrapped store supports synchronous I/O)."""
        self._check_writable()
        setter = self._store.set_sync  # type: ignore[attr-defined]
        cache = self.cache
        self._invalidate(cache, key)  # before the write too (see `set`)
        fill = cache.begin(self._ck(key))
        try:
            setter(key, value)
        except BaseException:
            self._invalidate(cache, key)
            raise
        else:
            self._after_write(cache, key, value, fill)
        finally:
            cache.end(fill)

    def delete_sync(self, key: str) -> None:
        """Synchronous `delete` (only when the wrapped store supports synchronous I/O)."""
        self._check_writable()
        deleter = self._store.delete_sync  # type: ignore[attr-defined]
        self._invalidate(self.cache, key)  # before the delete too (see `set`)
        try:
            deleter(key)
        finally:
            self._invalidate(self.cache, key)
