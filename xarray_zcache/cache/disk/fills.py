"""Storing entries: ``put`` and ``put_many`` of a :class:`~.tier.DiskTier` (see there).

A small entry (at most ``segment_threshold`` bytes) is appended as a record to the tier's
current segment (:mod:`.segments`) before its one index transaction; a larger one is written
to a temp file, then goes through the two transactions of :mod:`.writes`.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterable

from xarray_zcache.cache.disk import compact, core, rows, writes
from xarray_zcache.cache.disk.core import (
    AUTO_PRUNE_EVERY,
    EVICT_LOW_WATER,
    TOMBSTONE_TTL_S,
    TierCore,
)
from xarray_zcache.cache.disk.entry import Fill, PutRequest
from xarray_zcache.cache.disk.folder import FolderGone, require_folder, unlink_quietly
from xarray_zcache.cache.disk.format import LAYOUT, write_temp
from xarray_zcache.cache.disk.index import Recovered
from xarray_zcache.cache.disk.schema import is_disk_full, txn

__all__ = ["TierFills"]


class TierFills(TierCore):
    """The write paths of a :class:`~.tier.DiskTier` (see there)."""

    # ------------------------------------------------------------------ writes

    def put(
        self,
        key: str,
        value: bytes,
        *,
        namespace: str = "",
        kind: str = "chunk",
        expires: float | None = None,
        fetch_started_ns: int | None = None,
    ) -> bool:
        """Store ``value`` under ``key``.

        Parameters
        ----------
        key : str
            Cache key (any string).
        value : bytes
            Payload (any bytes-like object).
        namespace : str, optional
            Recorded in the index (for statistics and bulk operations).
        kind : {"chunk", "metadata"}
            Which folder the payload goes to.
        expires : float, optional
            Absolute expiry time (seconds since the epoch); the entry is a miss once
            ``expires < now``. None: never expires.
        fetch_started_ns : int, optional
            ``time.time_ns()`` when the value was fetched from the source. If the key was
            deleted or written, or a prefix of it deleted, after that time, the value is stale
            and is not stored. None marks an authoritative write: it is stored and recorded
            as a tombstone, so that older in-flight fetches of the key are refused.

        Returns
        -------
        bool
            True if stored. False if too large (``max_object_size``, ``capacity``), stale,
            if the tier is closed, or if the disk or index could not be written (a warning is
            logged once per error kind; disk-full never raises).

        Raises
        ------
        ValueError
            If ``kind`` is unknown or ``expires`` is NaN.
        FolderGone
            If the cache folder vanished (it is not re-created).
        """
        self._check_fill(kind, expires)
        req = self._request(key, value, namespace, kind, expires, fetch_started_ns)
        if req is None:
            return False
        stored = False
        require_folder(self._root)  # never re-create a vanished folder behind its owner's back
        try:
            for attempt in (0, 1):
                try:
                    stored = self._store_one(req, value)
                    break
                except (OSError, sqlite3.OperationalError) as exc:
                    # the filesystem is full (perhaps of other data): the cache gives way
                    if attempt or not is_disk_full(exc):
                        raise
                    self._warn.once(
                        "disk-full",
                        "disk cache %s: the filesystem is full (%s); evicting entries to make "
                        "room (entries that still do not fit are not stored on disk)",
                        self._root,
                        exc,
                    )
                    if not self._make_room(2 * len(req.header) + req.size):
                        raise
                    unlink_quietly(req.temp)
        except FolderGone:
            raise
        except (OSError, sqlite3.Error) as exc:
            if isinstance(exc, FileNotFoundError):
                require_folder(self._root)  # removed while writing: FolderGone

            self._warn.error(exc, f"storing {req.final}")
        finally:
            if not stored and not req.small:
                unlink_quietly(req.temp)  # crash safety: no temp file outlives a failed put
        if stored and req.small:
            self._after_append(req.size)
        return stored

    def _store_one(self, req: PutRequest, value: bytes) -> bool:
        """Write the payload (a record appended, or a temp file), then the index transactions."""
        if req.small:
            ((segment, offset),) = self._segments.append([(req.header, value)])
            return self._install(req.at(segment, offset))
        write_temp(req.temp, req.header, value)
        return self._install(req)

    @staticmethod
    def _check_fill(kind: str, expires: float | None) -> None:
        if kind not in LAYOUT:
            raise ValueError(f"kind must be 'chunk' or 'metadata', got {kind!r}")
        if expires is not None and math.isnan(expires):
            raise ValueError("expires must be a time in seconds, not NaN")

    def _request(
        self,
        key: str,
        value: bytes,
        namespace: str,
        kind: str,
        expires: float | None,
        fetch_started_ns: int | None,
    ) -> PutRequest | None:
        """The request of one ``put``, or None if the value is not to be stored."""
        size = memoryview(value).nbytes
        if self._closed or self.capacity <= 0 or size > self.capacity:
            return None
        if self.max_object_size is not None and size > self.max_object_size:
            return None
        if not (rows.sql_safe(key) and rows.sql_safe(namespace)):
            return None  # lone surrogates cannot be indexed
        return PutRequest.build(
            self._root,
            key,
            value,
            namespace=namespace,
            kind=kind,
            expires=expires,
            fetch_started_ns=fetch_started_ns,
            write_ns=time.time_ns(),
            small_limit=self.segment_threshold,
        )

    def put_many(self, fills: Iterable[Fill]) -> list[bool]:
        """Store several entries: :meth:`put` of each, in two transactions for all of them.

        Each fill is judged exactly as by :meth:`put` (staleness, size, capacity; a later
        fill of a key replaces an earlier one); only the index transactions are shared, so
        a batch costs one commit per step instead of one per entry. The payload files are
        written first, outside any lock; an entry whose file cannot be written for lack of
        space, and every entry of a batch whose index update hits a full disk, goes through
        :meth:`put` alone (which makes room).

        Returns
        -------
        list of bool
            For each fill, whether it was stored (see :meth:`put`).

        Raises
        ------
        ValueError
            If a ``kind`` is unknown or an ``expires`` is NaN (then nothing is stored).
        """
        batch = list(fills)
        for fill in batch:
            self._check_fill(fill.kind, fill.expires)
        stored = [False] * len(batch)
        alone: list[int] = []  # put() makes room on a full disk, then retries
        ready: list[tuple[int, PutRequest]] = []
        if batch:
            require_folder(self._root)  # (as put: a vanished folder is not re-created)
        small: list[tuple[int, PutRequest]] = []
        try:
            for i, fill in enumerate(batch):
                req = self._request(
                    fill.key,
                    fill.value,
                    fill.namespace,
                    fill.kind,
                    fill.expires,
                    fill.fetch_started_ns,
                )
                if req is None:
                    continue
                if req.small:
                    small.append((i, req))
                    continue
                try:
                    write_temp(req.temp, req.header, fill.value)
                except OSError as exc:
                    unlink_quietly(req.temp)
                    if isinstance(exc, FileNotFoundError):
                        require_folder(self._root)  # removed while writing: FolderGone
                    if is_disk_full(exc):
                        alone.append(i)
                    else:
                        self._warn.error(exc, f"storing {req.final}")
                    continue
                ready.append((i, req))
            ready += self._append_records(batch, small, alone)
            if ready:
                try:
                    placed = self._install_many([req for _i, req in ready])
                except (OSError, sqlite3.OperationalError) as exc:
                    if not is_disk_full(exc):
                        raise
                    alone.extend(i for i, _req in ready)
                else:
                    for (i, req), ok in zip(ready, placed, strict=True):
                        if isinstance(ok, OSError):
                            self._warn.error(ok, f"storing {req.final}")
                        else:
                            stored[i] = ok
        except (OSError, sqlite3.Error) as exc:
            self._warn.error(exc, "storing entries")
        finally:
            for i, req in ready:
                if not stored[i] and not req.small:
                    unlink_quietly(req.temp)  # crash safety: no temp file outlives a failed put
        appended = sum(req.size for i, req in ready if req.small and stored[i])
        if appended:
            self._after_append(appended)
        for i in sorted(alone):
            fill = batch[i]
            stored[i] = self.put(
                fill.key,
                fill.value,
                namespace=fill.namespace,
                kind=fill.kind,
                expires=fill.expires,
                fetch_started_ns=fill.fetch_started_ns,
            )
        return stored

    def _append_records(
        self, batch: list[Fill], small: list[tuple[int, PutRequest]], alone: list[int]
    ) -> list[tuple[int, PutRequest]]:
        """Append the records of the ``small`` requests (one ``writev`` per segment); the
        requests with their location. On a full disk they go to ``alone`` instead."""
        if not small:
            return []
        try:
            where = self._segments.append([(req.header, batch[i].value) for i, req in small])
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                require_folder(self._root)  # removed while writing: FolderGone
            if not is_disk_full(exc):
                raise
            alone.extend(i for i, _req in small)
            return []
        return [
            (i, req.at(segment, offset))
            for (i, req), (segment, offset) in zip(small, where, strict=True)
        ]

    def _after_append(self, nbytes: int) -> None:
        """Compact sealed segments when a segment was sealed or a quarter of one appended."""
        self._appended += nbytes
        if self._segments.take_sealed() or self._appended >= self._segments.seal_bytes // 4:
            self._appended = 0
            self.compact()

    def compact(self) -> int:
        """Reclaim the dead bytes of sealed segments (:mod:`.compact`); returns bytes freed.

        Runs after fills when due; never raises for I/O or index errors (logged once).
        """
        if self._closed or not self._compacting.acquire(blocking=False):
            return 0
        try:
            done = compact.compact(self._compaction())
        except FolderGone:
            return 0
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            if not isinstance(exc, RuntimeError):
                self._warn.error(exc, "compacting segments")
            return 0
        finally:
            self._compacting.release()
        self._count_damage(done.corrupt)
        self.compactions += done.compacted
        return done.freed

    def _make_space(self, conn: sqlite3.Connection, protect: str) -> None:
        # no committed state exceeds the capacity, even between the two transactions; down to
        # the low-water mark in bounded batches (EVICT_BATCH entries beyond what must go)
        self._evict_locked(
            conn,
            int(self.capacity * EVICT_LOW_WATER),
            time.time(),
            protect,
            limit=core.EVICT_BATCH,
            hard_target=self.capacity,
        )

    def _count_stores(self, conn: sqlite3.Connection, n: int) -> None:
        """Count ``n`` stores; prune old tombstones every ``AUTO_PRUNE_EVERY`` stores."""
        before, self._stores = self._stores, self._stores + n
        if before // AUTO_PRUNE_EVERY != self._stores // AUTO_PRUNE_EVERY:
            if self._keydir is not None:
                self._keydir.sync()  # this process's map takes in the changes before they go
            with txn(conn):
                rows.prune(conn, TOMBSTONE_TTL_S)

    def _install(self, req: PutRequest) -> bool:
        """The two transactions of ``put`` (:mod:`.writes`) once the temp file is complete."""

        def install(conn: sqlite3.Connection) -> bool:
            self._settle_owed_locked(conn)  # never store after an unrecorded invalidation
            if not writes.commit_row(
                conn, req, capacity=self.capacity, make_space=self._make_space
            ):
                self.stale_rejections += 1
                return False
            self._count_stores(conn, 1)
            return writes.place_file(conn, req)

        try:
            return self._index.run("storing an entry", install, retry=False)
        except Recovered:
            return False  # the file of this put may or may not be in place: the new index says

    def _install_many(self, reqs: list[PutRequest]) -> list[bool | OSError]:
        """The two transactions of ``put_many`` (:mod:`.writes`): one of each for all."""

        def install(conn: sqlite3.Connection) -> list[bool | OSError]:
            self._settle_owed_locked(conn)  # never store after an unrecorded invalidation
            fresh = writes.commit_rows(
                conn, reqs, capacity=self.capacity, make_space=self._make_space
            )
            mine = [req for req, ok in zip(reqs, fresh, strict=True) if ok]
            self.stale_rejections += len(reqs) - len(mine)
            self._count_stores(conn, len(mine))
            placed = iter(writes.place_files(conn, mine))
            return [next(placed) if ok else False for ok in fresh]

        try:
            return self._index.run("storing entries", install, retry=False)
        except Recovered:
            return [False] * len(reqs)  # the new index says which files are in place

    def _make_room(self, nbytes: int) -> bool:
        """Evict LRU entries worth about ``2 * nbytes`` and shrink the WAL (the disk is full).

        Returns whether anything was freed.
        """

        def room(conn: sqlite3.Connection) -> bool:
            done = writes.make_room(conn, self._root, self._index.db_path, nbytes, self._warn.error)
            self.evictions += done.evicted
            self.evicted_bytes += done.evicted_bytes
            return bool(done.victims) or done.wal_shrunk

        try:
            with self._index.lock:
                freed = room(self._index.require())
            if self._lookup_first:  # records free no space until their segment goes
                self._segments.close()  # seal ours: it may be compacted too
                if self.compact() > 0:
                    return True
                n, nbytes, space = compact.free_segment(self._compaction())
                self.evictions += n
                self.evicted_bytes += nbytes
                freed = freed or space > 0
            return freed
        except (OSError, sqlite3.Error, TypeError, ValueError):
            return False
