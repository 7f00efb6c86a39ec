"""`CachedStore`: a zarr v3 `Store` that reads through a `HybridCache`.

The store only maps zarr keys and byte ranges to cache reads (`xarray_zcache.keys`);
the read protocol — tiers, single flight, admission, invalidation — belongs to
`HybridCache.get_or_load` and its write/delete counterparts.

This module holds the class, its construction and zarr's `Store` surface; its parts
(mixins sharing the store's state) are in ``store_bytes`` (reads through the cache),
``store_sources`` (reads of the wrapped store, peers), ``store_validation`` (the
freshness gate), ``store_references`` (reference stores), ``store_writes`` (writes and
deletes), ``store_listings`` (listings through the cache), ``store_copies`` (pickling)
and ``store_sync`` (`SyncCachedStore`'s synchronous surface).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import secrets
import weakref
from collections.abc import AsyncGenerator, Iterable
from typing import TYPE_CHECKING, Any, Self

from zarr.abc.store import (
    ByteRequest,
    Store,
    _store_supports_sync_io,
)
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from xarray_zcache import decoded_install  # noqa: F401  (zarr's array API: decoded chunks)
from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.cache.request import Read
from xarray_zcache.cache.stats import CacheStats
from xarray_zcache.config import CacheConfig
from xarray_zcache.identity import Identity, identify, store_namespace
from xarray_zcache.keys import (
    array_of,
    check_byte_range,
    cut,
    entry_key,
    file_key,
    is_plain_range,
    key_kind,
    range_key,
)
from xarray_zcache.prefetch import ScanPrefetcher
from xarray_zcache.references import DIRECT, References, Target, references_of
from xarray_zcache.registry import (
    bind_cache,
    release_cache,
    resolve_config,
)
from xarray_zcache.sessions import close_store_session
from xarray_zcache.sessions import track as track_session
from xarray_zcache.store_bytes import CachedBytes
from xarray_zcache.store_copies import StoreCopies
from xarray_zcache.store_listings import CachedListings
from xarray_zcache.store_references import ReferencedReads
from xarray_zcache.store_sources import SourceReads, source_versions
from xarray_zcache.store_sync import SyncReads
from xarray_zcache.store_validation import SourceValidation
from xarray_zcache.store_versions import SourceVersions
from xarray_zcache.store_writes import CachedWrites

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "RECHECK_MISSING",
    "CachedStore",
    "SyncCachedStore",
    "array_of",
    "key_kind",
    "store_namespace",
]


logger = logging.getLogger("xarray_zcache.store")

# set while an open that failed on a remembered miss is tried again: reads then ask the
# wrapped store instead of trusting "missing" entries (zarr's sync copies the context)
RECHECK_MISSING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "zcache_recheck_missing", default=False
)


class CachedStore(
    ReferencedReads,
    CachedBytes,
    CachedWrites,
    CachedListings,
    StoreCopies,
    SourceValidation,
    SourceReads,
    Store,
):
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
        Name the data this store reads, and so its cache entries (default: derived
        from the store by `xarray_zcache.identity.identify`: protocol, endpoint and
        path; a repository and snapshot; the targets of references). Stores the cache
        cannot name (an in-memory store, an Icechunk writable session) are cached in
        memory only, for the store object; naming them makes them persistent.
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
        found = identify(store)
        if namespace is not None:
            found = dataclasses.replace(found, namespace=namespace)
        self._adopt(found, named=namespace is not None)
        #: this open: its copies (pickled to Dask workers, one per task) share it
        self._opened = secrets.token_hex(8)
        self._init_local()

    def _adopt(self, identity: Identity, *, named: bool) -> None:
        self._identity = identity
        self._named = named
        self._namespace = identity.namespace
        # reading a referenced chunk goes to its target (references.py)
        self._refs: References | None = references_of(self._store) if identity.referenced else None

    @property
    def identity(self) -> Identity:
        """What this store reads, as the cache names it (`xarray_zcache.identity`)."""
        return self._identity

    @property
    def _files(self) -> bool:
        """Whether the wrapped store is a tree of files (keys name paths, see `file_key`)."""
        return self._identity.files

    def _init_local(self) -> None:
        # per process: the cache bound per Dask worker (None: not on a worker), the
        # read-ahead per event loop (held weakly: short-lived loops leave nothing)
        self._bindings: dict[str | None, HybridCache] = {}
        self._prefetchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ScanPrefetcher] = (
            weakref.WeakKeyDictionary()
        )
        # reads with versions, and the validation unit of each folder (store_validation.py);
        # private data (memory only) records no versions: nothing of it may reach the disk
        self._source = (
            SourceVersions(self._store) if self._identity.private else source_versions(self._store)
        )
        self._targets: dict[object, CachedStore] = {}
        track_session(self._store)
        self._units = {}
        self._unit_memo = {}

    # -- identity (pickling: store_copies.py) --------------------------------------------------

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
            and (
                self._namespace == other._namespace
                # private data (a copy has its own name): as equal as the stores themselves
                or (
                    self._identity.private
                    and other._identity.private
                    and self._store == other._store
                )
            )
            and self._config == other._config
            and self.read_only == other.read_only
            and type(self._store) is type(other._store)
        )

    def __hash__(self) -> int:
        return hash((type(self), self._namespace))

    def __repr__(self) -> str:
        return f"CachedStore({self._store!r}, cache={self._config.name!r})"

    def __str__(self) -> str:
        return f"zcache::{self._store}"

    @property
    def cache(self) -> HybridCache:
        """The cache this store uses here (this process, or this Dask worker)."""
        return bind_cache(self, self._config, self._bindings)

    def stats(self) -> CacheStats:
        """Statistics of the cache this store uses (shared with other stores using it)."""
        return self.cache.stats()

    def analytics(self) -> dict[str, Any]:
        """Miss-ratio curves, sizing advice and per-array access patterns of recent reads.

        See `HybridCache.analytics`; arrays are told apart by their zarr path.
        """
        return self.cache.analytics(group=array_of)

    # -- keys ----------------------------------------------------------------------------------

    def _ck(self, key: str) -> str:
        return entry_key(self._namespace, file_key(key) if self._files else key)

    def _read(self, key: str, byte_range: ByteRequest | None, *, prefetch: bool = False) -> Read:
        ck = self._ck(key)
        recheck = RECHECK_MISSING.get()
        if byte_range is None:
            return Read(ck, key_kind(key), self._namespace, prefetch=prefetch, recheck=recheck)
        return Read(
            range_key(ck, byte_range),
            key_kind(key),
            self._namespace,
            whole=ck,
            cut=functools.partial(cut, byte_range),
            recheck=recheck,
        )

    # -- open/close, read-only -----------------------------------------------------------------

    @classmethod
    async def open(cls, *args: Any, **kwargs: Any) -> Self:
        store = cls(*args, **kwargs)
        if not store._is_open:  # (an Icechunk session's store is born open)
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
        # the same data: the same identity (a private namespace too: a MemoryStore's
        # read-only view shares its dict)
        other = CachedStore(
            self._store.with_read_only(read_only), self._config, namespace=self._namespace
        )
        other._adopt(self._identity, named=self._named)
        return other

    # -- reference stores: chunks cached under their targets (store_references.py) ------------

    def _target(self, target: Target) -> CachedStore:
        """The `CachedStore` of the folder holding a referenced object (one per folder)."""
        found = self._targets.get(target.memo)
        if found is None:
            found = CachedStore(target.store, self._config)
            found._object_units = True
            self._targets[target.memo] = found
        return found

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
        """Close the wrapped store and let the cache go if no other store uses it."""
        self._store.close()
        close_store_session(self._store)
        for cache in self._bindings.values():
            release_cache(self, cache)
        self._bindings.clear()

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

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        # docstring inherited
        check_byte_range(byte_range)
        prototype = prototype or default_buffer_prototype()
        if self._refs is not None:
            return await self._get_referenced(self._refs, key, prototype, byte_range)
        cache = self.cache
        if not is_plain_range(byte_range):
            # odd ranges are answered by the wrapped store itself, uncached (see keys.py)
            return await cache.load_uncached(
                self._read(key, byte_range),
                lambda: self._store.get(key, prototype, byte_range),
            )
        data = await self._get_bytes(cache, key, byte_range)
        return None if data is None else prototype.buffer.from_bytes(data)

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
        if self._refs is not None:
            found = self._refs.resolve(key, None)
            if found is DIRECT:
                return await self.get(key) is not None
            return found is not None
        await self._validated(key)
        cache = self.cache
        ck = self._ck(key)
        if cache.known_missing(ck):
            return False
        if cache.contains(ck):
            return True
        return await self._store.exists(key)

    async def getsize(self, key: str) -> int:
        # docstring inherited
        if self._refs is not None:
            buf = await self.get(key)
            if buf is None:
                raise FileNotFoundError(key)
            return len(buf)
        await self._validated(key)
        data = self.cache.peek(self._ck(key))
        if data is not None:
            return len(data)
        return await self._store.getsize(key)

    async def getsize_prefix(self, prefix: str) -> int:
        # docstring inherited
        return await self._store.getsize_prefix(prefix)


class SyncCachedStore(SyncReads, CachedStore):
    """A `CachedStore` over a store with synchronous I/O (`LocalStore`, `MemoryStore`).

    `CachedStore(store)` returns one of these when ``store`` supports zarr's sync
    surface, so that ``isinstance(store, SupportsGetSync)`` (how zarr decides to
    take its sync path) tells the truth: hits are then served without an event loop.
    Its synchronous reads and writes are `xarray_zcache.store_sync.SyncReads`.
    """
