"""``DiskTier``: the persistent (L2) tier of the cache, composed of the modules of this package.

:mod:`.format` (payload files), :mod:`.folder` (the folder), :mod:`.schema` and :mod:`.index`
(the SQLite index and its recovery), :mod:`.rows` (row operations), :mod:`.writes` (the two
transactions of ``put``), :mod:`.access` and :mod:`.flusher` (hit statistics, written off the
hit path), :mod:`.scan` and :mod:`.check` (``verify``, ``rebuild_index``), :mod:`.core`
(state, setup, eviction), :mod:`.reads` (the read path), :mod:`.fills` (the write paths),
:mod:`.inspect` (questions to the index for tools).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time

from xarray_zcache.cache.disk import check, rows
from xarray_zcache.cache.disk.fills import TierFills
from xarray_zcache.cache.disk.inspect import TierInspection
from xarray_zcache.cache.disk.probe import FolderState, NotACacheFolder, probe_folder
from xarray_zcache.cache.disk.reads import TierReads
from xarray_zcache.cache.disk.schema import is_resource_error, txn

__all__ = ["DiskTier", "FolderState", "NotACacheFolder"]


class DiskTier(TierFills, TierReads, TierInspection):
    """Persistent, size-bounded, multi-process-safe mapping of ``str`` keys to ``bytes``.

    Small payloads are records appended to segment files (:mod:`.segments`), larger ones
    files named by the SHA-256 of their key (:mod:`.format`); an SQLite index
    in WAL mode (:mod:`.schema`, :mod:`.index`) records namespace, kind, size, creation
    time, last access, hit count, expiry and checksum of each entry, plus tombstones used to
    reject stale writes.

    Parameters
    ----------
    path : str or os.PathLike
        Cache folder (``~`` expanded). Created with mode 0700 if missing; must be owned by the
        current user and writable.
    capacity : int
        Maximum total payload bytes. 0 stores nothing.
    max_object_size : int, optional
        Payloads larger than this are not stored. ``None``: only ``capacity`` limits them.
    segment_threshold : int, default 65536
        Entries of at most this many bytes are appended as records to segment files
        (:mod:`.segments`; ``SEGMENT_THRESHOLD`` = 64 KiB, the default); larger ones are files
        of their own. -1: every entry is a file. A tier reads records when it writes them or
        when the folder held segment files at its opening; otherwise records written later
        by another process are misses to it (never stale: a record replacing a file unlinks
        the file). A lost index is rebuilt from the payload files only: records are then
        misses (fetched again, never stale).

    Attributes
    ----------
    path, capacity, max_object_size
        As given (``path`` resolved).
    corruptions : int
        Damaged payload files removed and damaged indexes replaced by this instance.
    index_rebuilds : int
        Times this instance rebuilt ``index.db`` from the payload files.
    last_rebuild : dict
        Counts of the last rebuild (see :meth:`rebuild_index`), empty if none.
    evictions, evicted_bytes : int
        Entries, and payload bytes, evicted for space by this instance.
    expirations : int
        Expired entries dropped by this instance.
    stale_rejections : int
        ``put`` calls refused because a newer write or delete of the key was recorded.

    Notes
    -----
    All public methods are thread-safe; payload reads happen outside any lock. Several
    processes may share a folder: every change to payload files happens in a ``BEGIN
    IMMEDIATE`` transaction. The invariants are stated where they are kept: the index row is
    the authority (:mod:`.rows`), crash safety and the two transactions of ``put``
    (:mod:`.writes`), tombstones against stale fills (:func:`.rows.is_stale`), recovery of a
    damaged or lost index (:mod:`.index`). ``put`` never raises for disk-full or I/O errors:
    on ENOSPC it evicts and checkpoints the WAL, then retries once. An invalidation that
    cannot be recorded still unlinks the files; it is recorded before any later write, and
    ``get`` serves nothing it covers meanwhile. If the index cannot be opened, the tier runs
    without it and retries every few seconds. Do not use an instance across ``fork()``.
    """

    # ------------------------------------------------------------------ existing folders

    @staticmethod
    def probe(path: str | os.PathLike[str]) -> FolderState:
        """Look at an existing folder: does it hold a disk cache? Creates and changes nothing.

        Raises
        ------
        FileNotFoundError, NotADirectoryError
            If ``path`` does not exist, or is not a folder.
        """
        return probe_folder(path)

    @classmethod
    def open_existing(
        cls,
        path: str | os.PathLike[str],
        capacity: int = sys.maxsize,
        *,
        rebuild: bool = False,
    ) -> DiskTier:
        """Open the disk cache of an existing folder, never creating one elsewhere.

        Parameters
        ----------
        path : str or os.PathLike
            The cache folder.
        capacity : int, default unlimited
            As for the constructor: the default never evicts (for inspecting a folder).
        rebuild : bool
            Also open a folder whose index is lost or damaged (:attr:`FolderState.recoverable`):
            the index is then rebuilt from the payload files (see :attr:`last_rebuild`).

        Raises
        ------
        FileNotFoundError, NotADirectoryError
            If ``path`` does not exist, or is not a folder.
        NotACacheFolder
            If the folder holds no usable disk cache (nothing is created or changed then).
        """
        found = cls.probe(path)
        if not (found.ok or (rebuild and found.recoverable)):
            raise NotACacheFolder(os.fspath(path), found)
        return cls(path, capacity)

    # ------------------------------------------------------------------ invalidation

    def delete(self, key: str) -> None:
        """Remove ``key`` (file and index row) and record a tombstone for it.

        If the index cannot be written (disk full, I/O error, lock timeout, index
        unavailable), the files are still unlinked, a warning is logged once, and the
        tombstone is recorded before any later write of this tier: nothing stale is served
        or stored by this process meanwhile.

        Raises
        ------
        RuntimeError
            If the tier is closed.
        """
        self._access.forget([key])

        def remove(conn: sqlite3.Connection) -> None:
            self._settle_owed_locked(conn)
            with txn(conn):
                rows.delete_key(conn, self._root, key)

        try:
            self._index.run("deleting an entry", remove)
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_resource_error(exc):
                raise
            rows.unlink_key_files(self._root, key)
            self._owe(self._owed_keys, key, exc)

    def _owe(self, owed: dict[str, int], what: str, exc: BaseException) -> None:
        with self._index.lock:
            owed[what] = time.time_ns()
        self._warn.error(exc, "recording an invalidation (it will be recorded later)")

    def delete_prefix(self, prefix: str) -> int:
        """Remove every entry whose key starts with ``prefix``; record a prefix tombstone.

        If the index cannot be written, the removal is done (and recorded) before any later
        write of this tier, and this process serves no entry under ``prefix`` meanwhile.

        Returns
        -------
        int
            Number of entries removed (0 when the removal had to be postponed).
        """
        if not rows.sql_safe(prefix):
            return 0  # no stored key can contain a lone surrogate

        def remove(conn: sqlite3.Connection) -> list[str]:
            self._settle_owed_locked(conn)
            with txn(conn):
                return rows.delete_prefix(conn, self._root, prefix, self._warn.error)

        try:
            removed = self._index.run("deleting entries", remove)
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_resource_error(exc):
                raise
            self._owe(self._owed_prefixes, prefix, exc)
            return 0
        self._access.forget(removed)
        self._reclaim(len(removed))
        return len(removed)

    def delete_namespace(self, namespace: str) -> int:
        """Remove every entry recorded under ``namespace``, with a tombstone for each key.

        Returns
        -------
        int
            Number of entries removed (0 if the index cannot be written now; a warning is
            logged).
        """
        if not rows.sql_safe(namespace):
            return 0
        removed: list[str] = []

        def remove(conn: sqlite3.Connection) -> int:
            self._settle_owed_locked(conn)
            with txn(conn):
                removed[:] = rows.delete_namespace(conn, self._root, namespace, self._warn.error)
            return len(removed)

        count = self._index.maintain("deleting a namespace", remove)
        self._access.forget(removed)
        self._reclaim(count)
        return count

    # ------------------------------------------------------------------ maintenance

    def evict(self, target: int | None = None) -> int:
        """Drop expired entries, then least-recently-used ones until usage <= ``target``
        (default :attr:`capacity`). Returns the payload bytes freed."""
        goal = self.capacity if target is None else max(0, int(target))

        def evict(conn: sqlite3.Connection) -> int:
            with txn(conn):
                return self._evict_locked(conn, goal, time.time())

        freed = self._index.maintain("evicting", evict)
        self._reclaim(freed)
        return freed

    def drop_expired(self, now: float | None = None) -> int:
        """Remove entries whose ``expires`` is before ``now`` (default ``time.time()``).
        Returns the number of entries removed. Also closes the read descriptors of segments
        unlinked since (by any process), so that their space comes back (periodic maintenance).
        """
        t = time.time() if now is None else now
        self._fds.sweep()

        def drop(conn: sqlite3.Connection) -> int:
            with txn(conn):
                freed = rows.drop_expired(conn, self._root, t, self._warn.error)
            self.expirations += freed.expired
            return freed.expired

        dropped = self._index.maintain("dropping expired entries", drop)
        self._reclaim(dropped)
        return dropped

    def _reclaim(self, removed: int) -> None:
        """After a bulk removal, compact the segments it left dead (``zcache clear`` gives
        the space back at once)."""
        if removed and self._lookup_first:
            self.compact()

    def save_location_map(self, *, force: bool = False) -> bool:
        """Write the location map's hint file (``index.keydir``) if it is due: many changes
        since the last one (``force``: any). Written at close anyway; periodic maintenance
        calls this so that a process killed before closing leaves a recent one. Whether it
        wrote."""
        return self._keydir is not None and self._keydir.save(force=force)

    def prune_tombstones(self, older_than_s: float = 3600) -> None:
        """Forget tombstones older than ``older_than_s`` seconds.

        ``put`` calls whose ``fetch_started_ns`` is older than the pruning horizon are refused
        from then on, so pruning never lets a stale value in.
        """

        def prune(conn: sqlite3.Connection) -> None:
            with txn(conn):
                rows.prune(conn, older_than_s)

        if self._keydir is not None:
            self._keydir.sync()  # this process's map takes in the changes before they go
        self._index.maintain("pruning tombstones", prune)

    def verify(self, repair: bool = False) -> dict[str, int]:
        """Check the index, and every payload file against its header, checksum and the index.

        Runs inside one write transaction (other writers wait), reading every payload.

        Parameters
        ----------
        repair : bool
            Rebuild a damaged index from the payload headers (:meth:`rebuild_index`); delete
            damaged files and their rows, rows without file, files without row, mismatched
            pairs and abandoned temp files (older than 10 minutes, or left by a process that
            no longer exists); recompute the totals.

        Returns
        -------
        dict
            Counts: ``ok``, ``corrupt`` (damaged files), ``missing_files`` (rows without
            file), ``orphan_files`` (valid files without row), ``mismatched`` (file and row
            disagree on size or checksum), ``temp_files``, ``unknown_files``, and
            ``index_damaged`` (1 if SQLite's ``integrity_check`` failed: without ``repair`` the
            rows are then not compared with the files).
        """
        counts = check.verify(self._index, repair=repair)
        if repair:
            self._count_damage(counts["corrupt"])
        return counts

    def rebuild_index(self) -> dict[str, int]:
        """Replace ``index.db`` by a new index built from the payload files' headers.

        Each payload file records its key, namespace, length, checksums and expiry, so the
        entries survive the loss of the index; their hit counts and tombstones do not. Files
        whose header is damaged, and expired ones, are removed (payload checksums are
        verified later, when the entries are read). Pending fills whose fetch started before
        the rebuild are refused, since the tombstones that would judge them are gone.

        Used at open when ``index.db`` is missing, empty or unreadable, when SQLite reports
        the index damaged during an operation, and by ``verify(repair=True)``.

        Returns
        -------
        dict
            Counts: ``indexed``, ``corrupt``, ``expired``, ``duplicates``, ``old_format``,
            ``temp_files``, ``unknown_files``.
        """
        self.last_rebuild = {}
        self._index.replace()
        return dict(self.last_rebuild)

    # ------------------------------------------------------------------ introspection

    def close(self) -> None:
        """Flush pending access statistics and close the index. Idempotent."""
        if self._closed:
            return
        self._flusher.stop()
        self._flush(blocking=True)
        self._segments.close()
        self._fds.close()
        with self._index.lock:
            if self._owed_keys or self._owed_prefixes:
                with contextlib.suppress(OSError, sqlite3.Error, RuntimeError):
                    self._settle_owed_locked(self._index.require())
            if self._keydir is not None:
                self._keydir.close()  # the hint file for the next open (after the settling)
            conn = self._index.conn
            if conn is not None:
                # the change log is pruned every AUTO_PRUNE_EVERY stores of one tier: one
                # that stores fewer (a worker, a script) must not let it grow without bound
                with contextlib.suppress(OSError, sqlite3.Error):
                    keep = rows.changes_kept(conn)
                    if rows.changes_cutoff(conn, keep) is not None:
                        with txn(conn):  # (no write lock taken when there is nothing to do)
                            rows.prune_changes(conn, keep)
            self._index.close_locked()

    def abandon(self) -> None:
        """Close without writing anything (the folder vanished or cannot be used). Idempotent.

        Pending access statistics and unrecorded invalidations are dropped: their owner
        stops using the folder.
        """
        self._flusher.stop()
        self._segments.close()
        self._fds.close()
        if self._keydir is not None:
            self._keydir.close(save=False)
        with self._index.lock:
            if self._closed:
                return
            with contextlib.suppress(OSError, sqlite3.Error, RuntimeError):
                self._index.close_locked()
            self._index.closed = True

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"capacity={self.capacity}"
        return f"DiskTier({self._root!r}, {state})"
