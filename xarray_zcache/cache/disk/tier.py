"""``DiskTier``: the persistent (L2) tier of the cache, composed of the modules of this package.

:mod:`.format` (payload files), :mod:`.folder` (the folder), :mod:`.schema` and :mod:`.index`
(the SQLite index and its recovery), :mod:`.rows` (row operations), :mod:`.writes` (the two
transactions of ``put``), :mod:`.access` (hit statistics), :mod:`.scan` and :mod:`.check`
(``verify``, ``rebuild_index``), :mod:`.reads` (state and the read path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import sqlite3
import sys
import time
from typing import Any, Literal

from xarray_zcache.cache.disk import check, rows, writes
from xarray_zcache.cache.disk.entry import PutRequest
from xarray_zcache.cache.disk.folder import unlink_quietly
from xarray_zcache.cache.disk.format import LAYOUT, write_temp
from xarray_zcache.cache.disk.index import Recovered
from xarray_zcache.cache.disk.reads import (
    AUTO_PRUNE_EVERY,
    EVICT_LOW_WATER,
    TOMBSTONE_TTL_S,
    TierCore,
)
from xarray_zcache.cache.disk.schema import (
    ENTRY_COLUMNS,
    INDEX_NAME,
    is_disk_full,
    is_resource_error,
    txn,
)

__all__ = ["DiskTier", "FolderState", "NotACacheFolder"]


@dataclasses.dataclass(frozen=True)
class FolderState:
    """What a folder holds, as :meth:`DiskTier.probe` finds it (nothing created or changed).

    Attributes
    ----------
    state : {"ok", "missing", "damaged", "inaccessible", "foreign"}
        ``ok``: an index a tier opens as it is; ``missing``: no ``index.db``; ``damaged``:
        ``index.db`` is not readable as SQLite; ``inaccessible``: SQLite cannot open or read
        it (permissions, locks); ``foreign``: something else (another application's data).
    detail : str
        Why, for people (``"no index.db in it"``...); empty when ``ok``.
    layout : bool
        Whether ``chunks/`` and ``metadata/`` are laid out as a disk tier makes them (only
        two-hex-digit bucket folders in them): a lost or damaged index of such a folder can
        be rebuilt from its payload files.
    """

    state: str
    detail: str
    layout: bool

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    @property
    def recoverable(self) -> bool:
        """Whether the index is lost or damaged in a folder laid out as a disk cache."""
        return self.state in ("missing", "damaged") and self.layout


class NotACacheFolder(ValueError):
    """:meth:`DiskTier.open_existing` found no usable disk cache (see :attr:`folder`)."""

    def __init__(self, path: str, folder: FolderState) -> None:
        super().__init__(f"{path}: {folder.detail}")
        self.folder = folder


def _payload_layout(root: str) -> bool:
    for sub, _ext in LAYOUT.values():
        folder = os.path.join(root, sub)
        if os.path.islink(folder) or not os.path.isdir(folder):
            return False
        try:
            with os.scandir(folder) as it:
                names = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except OSError:
            return False
        for name, is_dir in names:
            if not (is_dir and len(name) == 2 and all(c in "0123456789abcdef" for c in name)):
                return False
    return True


def _probe_index(db: str, layout: bool) -> tuple[str, str]:
    if not os.path.exists(db):
        return "missing", f"no {INDEX_NAME} in it"
    if not os.path.isfile(db):
        return "foreign", f"{INDEX_NAME} is not a regular file"
    if os.path.getsize(db) == 0:  # created by a tier an instant before its schema
        if layout:
            return "ok", ""
        return "foreign", f"{INDEX_NAME} is empty and there are no chunks/ or metadata/ folders"
    try:
        uri = pathlib.Path(db).absolute().as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
            tables = {
                name
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
    except sqlite3.OperationalError as exc:  # cannot open or read (permissions, locks...)
        return "inaccessible", f"cannot read {INDEX_NAME}: {exc}"
    except sqlite3.DatabaseError as exc:  # not a database, malformed
        return "damaged", f"{INDEX_NAME} is unreadable ({exc})"
    if not {"entries", "totals"} <= tables:
        return "foreign", f"{INDEX_NAME} is an SQLite database without the tables of a zcache index"
    return "ok", ""


class DiskTier(TierCore):
    """Persistent, size-bounded, multi-process-safe mapping of ``str`` keys to ``bytes``.

    Payloads are files named by the SHA-256 of their key (:mod:`.format`); an SQLite index
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
        root = os.path.expanduser(os.fspath(path))
        os.stat(root)  # FileNotFoundError, PermissionError
        if not os.path.isdir(root):
            raise NotADirectoryError(f"{root} is not a folder")
        layout = _payload_layout(root)
        state, detail = _probe_index(os.path.join(root, INDEX_NAME), layout)
        return FolderState(state, detail, layout)

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
        """
        if kind not in LAYOUT:
            raise ValueError(f"kind must be 'chunk' or 'metadata', got {kind!r}")
        if expires is not None and math.isnan(expires):
            raise ValueError("expires must be a time in seconds, not NaN")
        size = memoryview(value).nbytes
        if self._closed or self.capacity <= 0 or size > self.capacity:
            return False
        if self.max_object_size is not None and size > self.max_object_size:
            return False
        if not (rows.sql_safe(key) and rows.sql_safe(namespace)):
            return False  # lone surrogates cannot be indexed
        req = PutRequest.build(
            self._root,
            key,
            value,
            namespace=namespace,
            kind=kind,
            expires=expires,
            fetch_started_ns=fetch_started_ns,
            write_ns=time.time_ns(),
        )
        stored = False
        try:
            for attempt in (0, 1):
                try:
                    write_temp(req.temp, req.header, value)
                    stored = self._install(req)
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
                    if not self._make_room(2 * len(req.header) + size):
                        raise
                    unlink_quietly(req.temp)
        except (OSError, sqlite3.Error) as exc:
            self._warn.error(exc, f"storing {req.final}")
        finally:
            if not stored:
                unlink_quietly(req.temp)  # crash safety: no temp file outlives a failed put
        return stored

    def _install(self, req: PutRequest) -> bool:
        """The two transactions of ``put`` (:mod:`.writes`) once the temp file is complete."""

        def make_space(conn: sqlite3.Connection) -> None:
            # no committed state exceeds the capacity, even between the two transactions
            self._evict_locked(conn, int(self.capacity * EVICT_LOW_WATER), time.time(), req.key)

        def install(conn: sqlite3.Connection) -> bool:
            self._settle_owed_locked(conn)  # never store after an unrecorded invalidation
            if not writes.commit_row(conn, req, capacity=self.capacity, make_space=make_space):
                self.stale_rejections += 1
                return False
            self._stores += 1
            if self._stores % AUTO_PRUNE_EVERY == 0:
                with txn(conn):
                    rows.prune(conn, TOMBSTONE_TTL_S)
            return writes.place_file(conn, req)

        try:
            return self._index.run("storing an entry", install, retry=False)
        except Recovered:
            return False  # the file of this put may or may not be in place: the new index says

    def _make_room(self, nbytes: int) -> bool:
        """Evict LRU entries worth about ``2 * nbytes`` and shrink the WAL (the disk is full).

        Returns whether anything was freed.
        """

        def room(conn: sqlite3.Connection) -> bool:
            done = writes.make_room(conn, self._root, self._index.db_path, nbytes, self._warn.error)
            self.evictions += done.evicted
            self.evicted_bytes += done.evicted_bytes
            return bool(done.evicted) or done.wal_shrunk

        try:
            with self._index.lock:
                return room(self._index.require())
        except (OSError, sqlite3.Error, TypeError, ValueError):
            return False

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
        return count

    # ------------------------------------------------------------------ maintenance

    def evict(self, target: int | None = None) -> int:
        """Drop expired entries, then least-recently-used ones until usage <= ``target``
        (default :attr:`capacity`). Returns the payload bytes freed."""
        goal = self.capacity if target is None else max(0, int(target))

        def evict(conn: sqlite3.Connection) -> int:
            with txn(conn):
                return self._evict_locked(conn, goal, time.time())

        return self._index.maintain("evicting", evict)

    def drop_expired(self, now: float | None = None) -> int:
        """Remove entries whose ``expires`` is before ``now`` (default ``time.time()``).
        Returns the number of entries removed."""
        t = time.time() if now is None else now

        def drop(conn: sqlite3.Connection) -> int:
            with txn(conn):
                freed = rows.drop_expired(conn, self._root, t, self._warn.error)
            self.expirations += freed.expired
            return freed.expired

        return self._index.maintain("dropping expired entries", drop)

    def prune_tombstones(self, older_than_s: float = 3600) -> None:
        """Forget tombstones older than ``older_than_s`` seconds.

        ``put`` calls whose ``fetch_started_ns`` is older than the pruning horizon are refused
        from then on, so pruning never lets a stale value in.
        """

        def prune(conn: sqlite3.Connection) -> None:
            with txn(conn):
                rows.prune(conn, older_than_s)

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

    def used_bytes(self) -> int:
        """Total payload bytes in the index (all processes), i.e. ``SUM(size)``."""
        return self._index.read("reading the totals", rows.used, 0)

    def __len__(self) -> int:
        """Number of entries in the index (expired ones included until dropped)."""
        row = self._index.read(
            "reading the totals",
            lambda conn: conn.execute("SELECT count FROM totals WHERE id = 0").fetchone(),
            (0,),
        )
        return int(row[0])

    def keys(self) -> list[str]:
        """All keys in the index, sorted."""
        return self._index.read(
            "listing keys",
            lambda conn: [
                k for (k,) in conn.execute("SELECT key FROM entries ORDER BY key").fetchall()
            ],
            [],
        )

    def entries(self) -> list[dict[str, Any]]:
        """Index rows as dicts (pending access statistics are flushed first).

        Keys: ``key``, ``namespace``, ``kind``, ``size``, ``created``, ``last_access``,
        ``hits``, ``expires`` (None: never), ``checksum``.
        """
        self.flush()
        query = f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries ORDER BY key"
        return self._index.read(
            "listing entries",
            lambda conn: [
                dict(zip(ENTRY_COLUMNS, row, strict=True)) for row in conn.execute(query).fetchall()
            ],
            [],
        )

    def summary(self) -> list[dict[str, Any]]:
        """Entries and payload bytes per ``(namespace, kind)``, computed by one SQL
        ``GROUP BY``.

        Returns
        -------
        list of dict
            Keys ``namespace``, ``kind``, ``entries``, ``bytes``; sorted by namespace and kind.
            Empty while the index is unavailable.
        """
        return self._index.read("summarizing entries", rows.summary, [])

    def usage(self, now: float | None = None) -> list[dict[str, Any]]:
        """:meth:`summary` with hit counts, expired entries and times, by one SQL ``GROUP BY``.

        Pending access statistics are flushed first.

        Parameters
        ----------
        now : float, optional
            Entries whose ``expires`` is before ``now`` (default ``time.time()``) are expired.

        Returns
        -------
        list of dict
            Per ``(namespace, kind)``, sorted: ``namespace``, ``kind``, ``entries``, ``bytes``,
            ``hits``, ``expired``, ``expired_bytes``, ``oldest_created``, ``newest_created``,
            ``last_access``. Empty while the index is unavailable.
        """
        t = time.time() if now is None else now
        self.flush()
        late = "expires IS NOT NULL AND expires < :now"
        query = (
            "SELECT namespace, kind, COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(hits), 0), "
            f"COALESCE(SUM({late}), 0), COALESCE(SUM(CASE WHEN {late} THEN size END), 0), "
            "MIN(created), MAX(created), MAX(last_access) "
            "FROM entries GROUP BY namespace, kind ORDER BY namespace, kind"
        )
        names = ("namespace", "kind", "entries", "bytes", "hits", "expired", "expired_bytes")
        times = ("oldest_created", "newest_created", "last_access")
        return self._index.read(
            "summarizing entries",
            lambda conn: [
                dict(zip(names + times, row, strict=True))
                for row in conn.execute(query, {"now": t}).fetchall()
            ],
            [],
        )

    def top_entries(
        self, n: int, by: Literal["hits", "oldest", "newest"] = "hits"
    ) -> list[dict[str, Any]]:
        """The first ``n`` index rows (as in :meth:`entries`) in one order, by SQL.

        ``by="hits"``: entries hit at least once, most hit first (then most recently used);
        ``"oldest"``/``"newest"``: by creation time. Ties are broken by key.
        """
        orders = {
            "hits": "WHERE hits > 0 ORDER BY hits DESC, last_access DESC, key",
            "oldest": "ORDER BY created, key",
            "newest": "ORDER BY created DESC, key",
        }
        if by not in orders:
            raise ValueError(f"by must be one of {', '.join(map(repr, orders))}, got {by!r}")
        self.flush()
        query = f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries {orders[by]} LIMIT ?"
        return self._index.read(
            "listing entries",
            lambda conn: [
                dict(zip(ENTRY_COLUMNS, row, strict=True))
                for row in conn.execute(query, (max(0, int(n)),)).fetchall()
            ],
            [],
        )

    def close(self) -> None:
        """Flush pending access statistics and close the index. Idempotent."""
        if self._closed:
            return
        self._flush(blocking=True)
        with self._index.lock:
            if self._owed_keys or self._owed_prefixes:
                with contextlib.suppress(OSError, sqlite3.Error, RuntimeError):
                    self._settle_owed_locked(self._index.require())
            self._index.close_locked()

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"capacity={self.capacity}"
        return f"DiskTier({self._root!r}, {state})"
