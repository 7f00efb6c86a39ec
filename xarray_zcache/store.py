"""`CachedStore`: a zarr v3 `Store` that reads through a `HybridCache`.

The store only maps zarr keys and byte ranges to cache reads (`xarray_zcache.keys`);
the read protocol — tiers, single flight, admission, invalidation — belongs to
`HybridCache.get_or_load` and its write/delete counterparts.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import dataclasses
import functools
import logging
import secrets
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, Self

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
    _store_supports_sync_io,
)
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from xarray_zcache.cache.hybrid import UNANSWERED, HybridCache, _Unanswered
from xarray_zcache.cache.request import PART_SEP, Read
from xarray_zcache.cache.stats import CacheStats
from xarray_zcache.config import CacheConfig
from xarray_zcache.decoded_pipeline import install as _install_decoded_pipeline
from xarray_zcache.identity import Identity, fresh_private, identify, store_namespace
from xarray_zcache.keys import (
    array_of,
    cut,
    entry_key,
    file_key,
    is_plain_range,
    key_kind,
    listing_key,
    range_key,
)
from xarray_zcache.prefetch import ScanPrefetcher
from xarray_zcache.references import DIRECT, References, Target, references_of
from xarray_zcache.registry import (
    bind_cache,
    on_dask_worker,
    release_cache,
    resolve_config,
)
from xarray_zcache.sessions import close_store_session
from xarray_zcache.sessions import track as track_session
from xarray_zcache.store_sources import SourceReads, fetched_bytes, source_versions
from xarray_zcache.store_validation import SourceValidation, ValidationReport
from xarray_zcache.store_versions import SourceVersions

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "RECHECK_MISSING",
    "CachedStore",
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


def _check_byte_range(byte_range: object) -> None:
    if byte_range is not None and not isinstance(
        byte_range, RangeByteRequest | OffsetByteRequest | SuffixByteRequest
    ):
        raise TypeError(f"Unexpected byte_range, got {byte_range}.")


_bytes = fetched_bytes


class CachedStore(SourceValidation, SourceReads, Store):
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
            from xarray_zcache.store_sync import SyncCachedStore

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

    def __dask_tokenize__(self) -> tuple[object, ...]:
        return (type(self).__qualname__, self._namespace, self._store.read_only, self._config)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "store": self._store,
            "config": self._config,
            "identity": self._identity,
            "named": self._named,
            "object_units": self._object_units,
            "confirmed": self._confirmations(),
            "opened": self._opened,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._store = state["store"]
        self._config = state["config"]
        identity: Identity = state["identity"]
        if identity.private and not state["named"]:
            # private to the store object: this copy holds its own data (a MemoryStore's
            # copy, a session's copy), never what the original cached
            identity = dataclasses.replace(identity, namespace=fresh_private("copy"))
        self._adopt(identity, named=state["named"])
        self._object_units = state["object_units"]
        self._opened = state.get("opened") or secrets.token_hex(8)
        self._init_local()
        self._confirmed_by = state.get("confirmed", {})

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

    def _object_keys(self, key: str) -> list[str]:
        """Cache keys that hold ``key`` or a part of it (ranges, negative entries)."""
        ck = self._ck(key)
        return [ck, ck + PART_SEP]

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

    # -- reference stores: chunks cached under their targets (references.py) ------------------

    def _target(self, target: Target) -> CachedStore:
        """The `CachedStore` of the folder holding a referenced object (one per folder)."""
        found = self._targets.get(target.memo)
        if found is None:
            found = CachedStore(target.store, self._config)
            found._object_units = True
            self._targets[target.memo] = found
        return found

    async def _get_referenced(
        self, refs: References, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        found = refs.resolve(key, byte_range)
        if isinstance(found, Target):
            return await self._target(found).get(found.key, prototype, found.byte_range)
        if found is DIRECT:
            return await self._store.get(key, prototype, byte_range)
        if isinstance(found, bytes):
            return prototype.buffer.from_bytes(found)
        return None

    async def revalidate(
        self, progress: Callable[[int, int], None] | None = None
    ) -> ValidationReport:
        # docstring inherited
        if self._refs is None:
            return await super().revalidate(progress)
        for url in self._refs.target_urls():  # (every target folder: not only those read here)
            target = self._refs.target_of(url)
            if target is not None:
                self._target(target)
        report = ValidationReport(0, 0, 0, 0, 0.0)
        folders = list(self._targets.values())
        for done, store in enumerate(folders, 1):
            report = report + await store.revalidate()
            if progress is not None:
                progress(done, len(folders))
        return report

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
        _check_byte_range(byte_range)
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

    async def get_bytes(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        """What `get` returns, as the ``bytes`` object the cache holds (no copy): the same
        read protocol, freshness gate and counting (the decoded tier's token)."""
        _check_byte_range(byte_range)
        if self._refs is not None or not is_plain_range(byte_range):
            buf = await self.get(key, default_buffer_prototype(), byte_range)
            return None if buf is None else buf.to_bytes()
        return await self._get_bytes(self.cache, key, byte_range)

    def bytes_now(
        self, key: str, cache: HybridCache | None = None
    ) -> tuple[str, bytes | _Unanswered | None]:
        """The cache key of ``key`` and the bytes `get_bytes(key)` would return now, if the
        cache can tell without I/O and without waiting (the freshness gate open, the
        object in memory or known missing; counted as such a read is); otherwise
        `UNANSWERED` (call `get_bytes`). ``cache``: `cache`, if the caller has it."""
        read = self._read(key, None)
        if self._refs is not None:
            return read.key, UNANSWERED
        cache = self.cache if cache is None else cache
        if self._source.supported:  # the gate of `_validated`, without its I/O
            unit, _ = self._unit_of(key)
            freshness = cache.freshness
            since = self._confirmed_by.get(unit.name)
            if since is not None and freshness.confirmed(unit) < since:
                return read.key, UNANSWERED
            if not freshness.is_fresh(unit, time.time()):
                return read.key, UNANSWERED
        return read.key, cache.answer_now(read)

    async def _get_bytes(
        self, cache: HybridCache, key: str, byte_range: ByteRequest | None
    ) -> bytes | None:
        began = time.time()
        await self._validated(key, cache)
        reader = self._part_reader(key, byte_range, began)
        read = self._read(key, byte_range)
        pf = self._prefetcher() if byte_range is None and read.kind == "chunk" else None
        missed = False

        async def load() -> bytes | None:
            nonlocal missed
            missed = True
            if pf is not None:
                await pf.observe(key, miss=True)  # may start reading ahead
            return await self._fetch(cache, key, byte_range, began, reader)

        data = await cache.get_or_load(read, load)
        self._served(cache, key, reader)
        if pf is not None and not missed and pf.active:
            await pf.observe(key, miss=False)
        return data

    def _prefetcher(self) -> ScanPrefetcher | None:
        """The read-ahead of this store on the running event loop (None if disabled)."""
        depth = self._config.prefetch_depth
        if depth <= 0:
            return None
        loop = asyncio.get_running_loop()
        pf = self._prefetchers.get(loop)
        if pf is None:
            if on_dask_worker():
                # on a Dask cluster the workers split the scan between them: one worker's
                # read-ahead would fetch chunks that other workers are about to read
                return None
            pf = self._prefetchers[loop] = ScanPrefetcher(self, depth)
        return pf

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
        lk = listing_key(self._namespace, op, prefix)
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

    def _value_bytes(self, value: Buffer) -> bytes:
        if not isinstance(value, Buffer):
            raise TypeError(
                f"CachedStore.set(): `value` must be a Buffer instance. Got an instance of "
                f"{type(value)} instead."
            )
        return value.to_bytes()

    async def set(self, key: str, value: Buffer) -> None:
        # docstring inherited
        self._check_writable()
        data = self._value_bytes(value)
        await self.cache.write_through(
            self._read(key, None),
            data,
            lambda: self._store.set(key, value),
            keep=self._config.cache_on_write,
        )

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # docstring inherited
        self._check_writable()
        # we cannot tell whether our value or an existing one won: cache neither
        await self.cache.invalidating(
            self._object_keys(key), lambda: self._store.set_if_not_exists(key, value)
        )

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def delete(self, key: str) -> None:
        # docstring inherited
        self._check_writable()
        await self.cache.invalidating(self._object_keys(key), lambda: self._store.delete(key))

    def _dir_keys(self, prefix: str) -> builtins.list[str]:
        """What ``delete_dir(prefix)`` may remove: everything under ``prefix/`` and, on
        object stores (FsspecStore), the object named exactly ``prefix``."""
        prefix = prefix.rstrip("/")
        if not prefix:
            return [self._namespace + "/"]
        return [self._ck(prefix) + "/", *self._object_keys(prefix)]

    async def delete_dir(self, prefix: str) -> None:
        # docstring inherited
        self._check_writable()
        await self.cache.invalidating(
            self._dir_keys(prefix), lambda: self._store.delete_dir(prefix)
        )

    async def clear(self) -> None:
        # docstring inherited
        self._check_writable()
        await self.cache.invalidating(self._dir_keys(""), self._store.clear)


def __getattr__(name: str) -> Any:
    if name == "SyncCachedStore":  # defined beside, in store_sync (it subclasses CachedStore)
        from xarray_zcache.store_sync import SyncCachedStore

        return SyncCachedStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# zarr's array API over a CachedStore: decoded chunks (decoded_pipeline.py; switchable)
_install_decoded_pipeline()
