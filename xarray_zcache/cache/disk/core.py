"""The state of a disk tier: its setup, eviction and the invalidations it owes its index.

:class:`TierCore` opens the folder, its index (:mod:`.index`) and, when the tier packs small
entries, its location map (:mod:`.keydir`), and holds the counters, segment writer and
descriptor cache that the read path (:mod:`.reads`) and the write paths (:mod:`.fills`)
share. Here too: filling a new index from the payload files, eviction (:func:`.rows.evict`)
and the invalidations that could not be recorded in the index (settled before any later
write). The access statistics are written off the hit path (:mod:`.access`, :mod:`.flusher`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import sqlite3
import threading
from typing import TYPE_CHECKING, Final

from xarray_zcache.cache.disk import check, compact, rows
from xarray_zcache.cache.disk.access import AccessLog
from xarray_zcache.cache.disk.flusher import Flusher, StatsFlush
from xarray_zcache.cache.disk.folder import prepare_folder
from xarray_zcache.cache.disk.index import Index
from xarray_zcache.cache.disk.log import Warner, logger
from xarray_zcache.cache.disk.schema import (
    INDEX_CACHE_BYTES,
    SchemaDamaged,
    on_commit,
    txn,
)
from xarray_zcache.cache.disk.segments import (
    DEFAULT_SEGMENT_THRESHOLD,
    FdCache,
    SegmentWriter,
    has_segments,
    seal_size,
)
from xarray_zcache.cache.logs import events

if TYPE_CHECKING:
    from xarray_zcache.cache.disk.keydir import KeyDir

__all__ = ["AUTO_PRUNE_EVERY", "EVICT_BATCH", "EVICT_LOW_WATER", "TOMBSTONE_TTL_S", "TierCore"]

_events = events("xarray_zcache.disk")

#: After an eviction triggered by ``put``, usage is brought down to this fraction of capacity.
EVICT_LOW_WATER: Final = 0.9
#: An eviction triggered by ``put`` removes at most this many entries beyond those needed to
#: fit (the rest of the way to ``EVICT_LOW_WATER`` is left to later ones): at a million small
#: entries, 10 % of the capacity would be 100,000 unlinks under the write lock in one ``put``.
EVICT_BATCH: Final = 1024
#: Tombstones older than this are pruned automatically every ``AUTO_PRUNE_EVERY`` stores.
TOMBSTONE_TTL_S: Final = 3600.0
AUTO_PRUNE_EVERY: Final = 4096


class TierCore(StatsFlush):
    """State, setup, eviction and owed invalidations of a :class:`~.tier.DiskTier` (see there)."""

    path: pathlib.Path
    capacity: int
    max_object_size: int | None

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int,
        *,
        max_object_size: int | None = None,
        segment_threshold: int = DEFAULT_SEGMENT_THRESHOLD,
        index_cache_bytes: int = INDEX_CACHE_BYTES,
        location_map: bool = True,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if max_object_size is not None and max_object_size < 0:
            raise ValueError(f"max_object_size must be >= 0 or None, got {max_object_size}")
        self.path = pathlib.Path(os.fspath(path)).expanduser().resolve()
        self.capacity = int(capacity)
        self.max_object_size = None if max_object_size is None else int(max_object_size)
        self.corruptions = 0
        self.evictions = 0
        self.evicted_bytes = 0
        self.expirations = 0
        self.stale_rejections = 0
        self.index_rebuilds = 0
        self.compactions = 0
        self.last_rebuild: dict[str, int] = {}
        #: entries up to this many bytes are appended to segment files (-1: none are)
        self.segment_threshold = int(segment_threshold)
        #: bound of the SQLite page cache of the index connection (memory held, at most)
        self.index_cache_bytes = max(1024, int(index_cache_bytes))
        self._root = str(self.path)
        self._segments = SegmentWriter(self._root, seal_size(self.capacity))
        self._fds = FdCache(self._root)
        self._appended = 0
        self._compacting = threading.Lock()
        self._lookup_first = self.segment_threshold >= 0 or has_segments(self._root)
        self._counter_lock = threading.Lock()
        self._access = AccessLog()
        self._flusher = Flusher(self._flush_in_background)
        self._warn = Warner(self._root)
        self._stores = 0
        # Invalidations that could not be recorded in the index (disk full, I/O error, index
        # unavailable): key or prefix -> time.time_ns(). Guarded by the index lock; recorded
        # before any later write, and ``get`` serves nothing they cover meanwhile.
        self._owed_keys: dict[str, int] = {}
        self._owed_prefixes: dict[str, int] = {}
        #: primary-key lookups of the index made by reads (the location map spares them)
        self.index_lookups = 0
        prepare_folder(self.path)
        self._index = Index(
            self._root,
            self._warn,
            fill=self._fill,
            on_damage=self._count_damage,
            cache_bytes=self.index_cache_bytes,
        )
        self._index.start()
        #: where each entry is, in memory (None: the tier reads payload files alone)
        self._keydir: KeyDir | None = None
        if location_map and self._lookup_first:
            from xarray_zcache.cache.disk.keydir import KeyDir  # NumPy: only when used

            self._keydir = KeyDir(self._root, self._index.db_path, self._index_damaged)
            self._keydir.open()

    def _index_damaged(self, exc: BaseException) -> None:
        """The location map found the index damaged where SQLite did not: replace it, as
        any operation finding damage does (:meth:`.index.Index.run`)."""

        def damaged(_conn: sqlite3.Connection) -> None:
            raise SchemaDamaged(str(exc))

        with contextlib.suppress(Exception):
            self._index.run("building the location map", damaged, retry=False)

    @property
    def _conn(self) -> sqlite3.Connection | None:
        """The SQLite connection (for tests that poke at it)."""
        return self._index.conn

    @property
    def _closed(self) -> bool:
        return self._index.closed

    def _compaction(self) -> compact.Compaction:
        return compact.Compaction(self._root, self._index, self._segments, self._fds, self.capacity)

    def _count_damage(self, n: int = 1) -> None:
        with self._counter_lock:
            self.corruptions += n

    def _fill(self, conn: sqlite3.Connection) -> None:
        """Fill a new index from the payload files (``Index`` calls this; folder lock held)."""

        def shrink(conn: sqlite3.Connection, now: float) -> None:
            self._evict_locked(conn, int(self.capacity * EVICT_LOW_WATER), now)

        counts = check.fill_from_files(conn, self._root, self.capacity, shrink)
        with txn(conn):  # a new index: no map follows its log yet (a new epoch)
            rows.prune_changes(conn, 0)
        self.index_rebuilds += 1
        self._count_damage(counts["corrupt"])
        self.last_rebuild = counts
        logger.info("disk cache %s: index rebuilt from payload files: %s", self._root, counts)

    def _evict_locked(
        self,
        conn: sqlite3.Connection,
        target: int,
        now: float,
        protect: str | None = None,
        *,
        limit: int | None = None,
        hard_target: int | None = None,
    ) -> int:
        """Drop expired rows, then LRU rows (never ``protect``) until usage <= ``target``
        (in a transaction; pending access statistics are written first, for the LRU order).
        ``limit``, ``hard_target``: see :func:`.rows.evict`."""
        batch = self._access.take()
        if batch:
            AccessLog.write(conn, batch)
        freed = rows.evict(
            conn,
            self._root,
            target,
            now,
            self._warn.error,
            protect,
            limit=limit,
            hard_target=hard_target,
        )
        on_commit(conn, functools.partial(self._count_freed, freed))
        if freed.evicted or freed.expired:
            _events.debug(
                "disk eviction",
                "disk cache %s: evicted %d entries (%d bytes), dropped %d expired",
                self._root,
                freed.evicted,
                freed.evicted_bytes,
                freed.expired,
            )
        return freed.bytes

    def _count_freed(self, freed: rows.Freed) -> None:
        """Count an eviction's figures (once its transaction committed: `on_commit`)."""
        self.expirations += freed.expired
        self.evictions += freed.evicted
        self.evicted_bytes += freed.evicted_bytes

    def _settle_owed_locked(self, conn: sqlite3.Connection) -> None:
        """Record the invalidations owed to the index (index lock held; own transaction)."""
        if not (self._owed_keys or self._owed_prefixes):
            return
        keys, prefixes = dict(self._owed_keys), dict(self._owed_prefixes)
        with txn(conn):
            # tombstones of when the invalidations happened: a fill fetched since is fresh
            for key, at in keys.items():
                rows.delete_key(conn, self._root, key, at)
            for prefix, at in prefixes.items():
                rows.delete_prefix(conn, self._root, prefix, self._warn.error, at)
        for key in keys:
            self._owed_keys.pop(key, None)
        for prefix in prefixes:
            self._owed_prefixes.pop(prefix, None)

    def _owes(self, key: str) -> bool:
        with self._index.lock:
            return key in self._owed_keys or any(key.startswith(p) for p in self._owed_prefixes)
