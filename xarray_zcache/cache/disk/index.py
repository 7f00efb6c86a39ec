"""The life of the SQLite index of one tier: open, reopen, go offline, recover from damage.

All recovery goes through :meth:`Index.run`: every operation on the index is a function of
the connection, run holding :attr:`Index.lock`. If SQLite reports the index damaged (or it
yields an altered schema or rows of impossible types), the index is replaced by one rebuilt
from the payload files and the operation is run once more (or, with ``retry=False``,
:class:`Recovered` is raised). Disk-full and I/O errors are the caller's to judge
(:func:`~xarray_zcache.cache.disk.schema.is_resource_error`): :meth:`read` and
:meth:`maintain` turn them into a default value.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from typing import Final, TypeVar

from xarray_zcache.cache.disk import rows
from xarray_zcache.cache.disk.folder import (
    file_id,
    folder_lock,
    require_folder,
    unlink_missing_ok,
)
from xarray_zcache.cache.disk.log import Warner
from xarray_zcache.cache.disk.scan import has_payload_files
from xarray_zcache.cache.disk.schema import (
    BUSY_TIMEOUT_MS,
    INDEX_CACHE_BYTES,
    INDEX_NAME,
    INDEX_SIDE_FILES,
    LOCK_NAME,
    IndexUnavailable,
    NewerIndex,
    SchemaDamaged,
    as_damage,
    connect,
    is_resource_error,
    newer_compatible,
    schema_ok,
    txn,
)

logger = logging.getLogger("xarray_zcache.disk")

_T = TypeVar("_T")

#: While the index cannot be opened (disk full...), try again at most this often.
REOPEN_INTERVAL_S: Final = 5.0


class Recovered(Exception):
    """The index was found damaged and replaced; the operation was not run again."""


class Index:
    """The connection to ``<root>/index.db``, guarded by :attr:`lock`.

    Parameters
    ----------
    root : str
        The cache folder.
    warner : Warner
        Where problems are reported.
    fill : callable
        ``fill(conn)`` fills a new, empty index from the payload files (folder lock held).
    on_damage : callable
        Called each time a damaged index is replaced.
    cache_bytes : int
        Bound of the connection's SQLite page cache (:data:`.schema.INDEX_CACHE_BYTES`).
    """

    def __init__(
        self,
        root: str,
        warner: Warner,
        *,
        fill: Callable[[sqlite3.Connection], None],
        on_damage: Callable[[], None],
        cache_bytes: int = INDEX_CACHE_BYTES,
    ) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = None
        self.closed = False
        self.db_path = os.path.join(root, INDEX_NAME)
        self._lock_path = os.path.join(root, LOCK_NAME)
        self._warner = warner
        self._fill = fill
        self._on_damage = on_damage
        self.cache_bytes = cache_bytes
        self._db_id: tuple[int, int] | None = None
        self._retry_at = 0.0
        #: A second connection for :meth:`query` (opened on first use), guarded by
        #: :attr:`read_lock`; ``_reader_of`` is the :attr:`conn` it was opened beside.
        self.read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._reader_of: sqlite3.Connection | None = None
        self._pid = os.getpid()

    def start(self) -> None:
        """Open the index; on disk-full or I/O errors, run without it for now."""
        try:
            with self.lock, self.folder_lock():
                self.conn = self._open_locked()
        except (OSError, sqlite3.OperationalError) as exc:
            if isinstance(exc, PermissionError) or not is_resource_error(exc):
                raise
            self._go_offline(exc)

    def folder_lock(self) -> contextlib.AbstractContextManager[None]:
        return folder_lock(self._lock_path)

    # ------------------------------------------------------------------ the one wrapper

    def run(self, action: str, op: Callable[[sqlite3.Connection], _T], *, retry: bool = True) -> _T:
        """``op(conn)`` holding :attr:`lock`, recovering from index damage (module doc)."""
        with self.lock:
            return self.run_locked(action, op, retry=retry)

    def run_locked(
        self, action: str, op: Callable[[sqlite3.Connection], _T], *, retry: bool = True
    ) -> _T:
        """:meth:`run` with :attr:`lock` already held."""
        conn = self.require()
        try:
            return op(conn)
        except (sqlite3.DatabaseError, TypeError, ValueError) as exc:
            damage = as_damage(exc)
            if damage is None:
                raise
            conn = self.recover(damage, action, conn)
        if not retry:
            raise Recovered(action)
        return op(conn)

    def read(self, action: str, op: Callable[[sqlite3.Connection], _T], default: _T) -> _T:
        """:meth:`run` for queries: ``default`` while the index is unavailable."""
        try:
            return self.run(action, op)
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_resource_error(exc):
                raise
            return default

    def query(self, action: str, op: Callable[[sqlite3.Connection], _T]) -> _T:
        """:meth:`run` for a query of committed rows that need not wait for this process's
        writes (a hit's lookup).

        When :attr:`lock` is free, ``op`` runs on :attr:`conn`, as :meth:`run`. When it is
        held (a statistics flush, a fill, an eviction: at a million entries a flush of a few
        thousand hits rewrites that many random pages, tens of milliseconds to seconds),
        ``op`` runs on a second connection instead (WAL: a reader never waits for the
        writer). Not the other way round: SQLite drops a connection's whole page cache when
        another connection has committed, which the writer does all the time.

        The second connection is used only while it is beside the current :attr:`conn` on
        the current ``index.db`` (checked on every call, as :meth:`require` does), in the
        process that opened the tier; otherwise, and on any error (damage, busy, I/O), ``op``
        goes through :meth:`run` and its recovery. ``op`` sees the last committed state: a
        row of the transaction in progress is not seen until it commits (as with another
        process's).
        """
        if self.lock.acquire(blocking=False):
            try:
                return self.run_locked(action, op)
            finally:
                self.lock.release()
        if self.conn is not None and os.getpid() == self._pid:
            with self.read_lock:
                reader = self._reader_locked()
                if reader is not None:
                    try:
                        return op(reader)
                    except (sqlite3.Error, TypeError, ValueError):
                        self._close_reader_locked()
        return self.run(action, op)

    def _reader_locked(self) -> sqlite3.Connection | None:
        """The read connection (:attr:`read_lock` held), opened if needed; None if it cannot
        be used now."""
        conn = self.conn
        if conn is None or self.closed or file_id(self.db_path) != self._db_id:
            return None  # offline, closed, or index.db replaced: run() reopens it first
        if self._reader is not None and self._reader_of is conn:
            return self._reader
        self._close_reader_locked()
        try:
            reader = sqlite3.connect(
                self.db_path, timeout=30, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error:
            return None
        try:
            reader.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            reader.execute(f"PRAGMA cache_size=-{max(1, self.cache_bytes >> 10)}")
            reader.execute("PRAGMA query_only=1")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                reader.close()
            return None
        self._reader, self._reader_of = reader, conn
        return reader

    def _close_reader_locked(self) -> None:
        reader, self._reader, self._reader_of = self._reader, None, None
        if reader is not None:
            with contextlib.suppress(sqlite3.Error):
                reader.close()

    def close_reader(self) -> None:
        """Close the read connection (before :attr:`conn`: the writer stays the last
        connection, whose closing :meth:`close_conn` guards). Not in a forked child."""
        if os.getpid() != self._pid:
            return
        with self.read_lock:
            self._close_reader_locked()

    def maintain(self, action: str, op: Callable[[sqlite3.Connection], int | None]) -> int:
        """:meth:`run` for maintenance: 0 and a warning if the index cannot be written."""
        try:
            return self.run(action, op) or 0
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_resource_error(exc):
                raise
            if not isinstance(exc, IndexUnavailable):
                self._warner.error(exc, action)
            return 0

    # ------------------------------------------------------------------ the connection

    def require(self) -> sqlite3.Connection:
        """The open connection (:attr:`lock` held); reopens if ``index.db`` was replaced.

        Raises
        ------
        RuntimeError
            If the tier is closed.
        IndexUnavailable
            If the index cannot be opened (disk full, I/O error); retried every few seconds.
        FolderGone
            If the cache folder vanished.
        """
        if self.closed:
            raise RuntimeError(f"DiskTier at {self.root} is closed")
        conn = self.conn
        replaced = conn is not None and file_id(self.db_path) != self._db_id
        if conn is None or replaced:
            # a vanished folder is not re-created here (no index without its payload folders)
            require_folder(self.root)
        if conn is None:
            if time.monotonic() < self._retry_at:
                raise IndexUnavailable(f"disk cache index {self.db_path} is unavailable")
            with self.folder_lock():
                conn = self._open_or_go_offline()
            logger.info("disk cache %s: the index is available again", self.root)
        elif replaced:
            conn = self._reopen_locked("the index file was deleted or replaced")
        return conn

    def _open_locked(self) -> sqlite3.Connection:
        """Open ``index.db``, creating it, or replacing it if damaged (folder lock held).

        A new index (the file was missing, empty, damaged, or of an older schema) is filled
        from the payload files' headers.
        """
        if not os.path.exists(self.db_path):
            # -wal/-shm left by a deleted index: SQLite would replay that WAL into the new one
            self.remove_files()
        for attempt in (0, 1):
            conn: sqlite3.Connection | None = None
            try:
                conn, created = connect(self.db_path, self.cache_bytes)
                if created and has_payload_files(self.root):
                    self._fill(conn)
                else:
                    if not created and not schema_ok(conn):
                        if newer_compatible(conn):  # not ours to repair
                            conn.close()
                            raise NewerIndex(
                                f"disk cache index {self.db_path} is of a newer schema that "
                                "admits this version, but lacks objects of ours"
                            )
                        raise SchemaDamaged("the index schema was altered")
                    if not rows.totals_ok(conn):
                        with txn(conn):
                            rows.reset_totals(conn)
            except (sqlite3.DatabaseError, TypeError, ValueError) as exc:
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                damage = as_damage(exc)
                if attempt or damage is None:
                    raise
                self._note_damage(damage, "opening the index")
                self.remove_files()
                continue
            self._db_id = file_id(self.db_path)
            return conn
        raise AssertionError("unreachable")  # pragma: no cover

    def remove_files(self) -> None:
        for suffix in ("", *INDEX_SIDE_FILES):
            unlink_missing_ok(self.db_path + suffix)

    def _note_damage(self, exc: BaseException, action: str) -> None:
        self._on_damage()
        self._warner.once(
            "index-damaged",
            "disk cache %s: the index is damaged (%s, while %s); rebuilding it from the "
            "payload files (further index damage logged at debug level)",
            self.root,
            exc,
            action,
        )

    def close_conn(self, conn: sqlite3.Connection) -> None:
        """Close ``conn`` (folder lock held), protecting the files of a newer index.

        When the last connection to a database closes, SQLite deletes its ``-wal`` and
        ``-shm`` files *by name*. If ``index.db`` was deleted or replaced meanwhile, those
        names belong to the new index: move them aside while closing.
        """
        self.close_reader()
        moved: list[tuple[str, str]] = []
        if self._db_id is not None and file_id(self.db_path) != self._db_id:
            for suffix in INDEX_SIDE_FILES:
                src = self.db_path + suffix
                dst = f"{src}.{uuid.uuid4().hex}.hold"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(src, dst)
                    moved.append((src, dst))
        try:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        finally:
            for src, dst in moved:
                with contextlib.suppress(OSError):
                    os.rename(dst, src)

    def _reopen_locked(self, reason: str) -> sqlite3.Connection:
        """Drop our connection and open the index found at the path now (:attr:`lock` held)."""
        with self.folder_lock():
            old, self.conn = self.conn, None
            if old is not None:
                self.close_conn(old)
            conn = self._open_or_go_offline()
            # told once it worked: if it did not, the caller's error says what is wrong
            self._warner.once("index-replaced", "disk cache %s: %s; reopened it", self.root, reason)
            return conn

    def _open_or_go_offline(self) -> sqlite3.Connection:
        """``_open_locked``; on disk full or I/O errors, go offline and raise."""
        try:
            self.conn = self._open_locked()
        except (OSError, sqlite3.OperationalError) as exc:
            if isinstance(exc, PermissionError) or not is_resource_error(exc):
                raise
            self._go_offline(exc)
            raise IndexUnavailable(str(exc)) from exc
        return self.conn

    def _go_offline(self, exc: BaseException) -> None:
        """Run without the index until it can be opened again (``conn`` stays None).

        Hits are still served from the self-checking payload files; nothing is stored;
        deletes unlink the files and are recorded in the index once it is back.
        """
        self.conn = None
        self._retry_at = time.monotonic() + REOPEN_INTERVAL_S
        self._warner.once(
            "offline",
            "disk cache %s: the index cannot be opened (%s); storing nothing on disk until "
            "it can (memory and the source still serve every read)",
            self.root,
            exc,
        )

    def recover(
        self, exc: sqlite3.DatabaseError, action: str, failed: sqlite3.Connection | None = None
    ) -> sqlite3.Connection:
        """Replace a damaged index by one rebuilt from the payload files (:attr:`lock` held).

        If another thread or process replaced it already, just switch to the new one.
        """
        current = self.conn
        if current is None:
            return self.require()
        if failed is not None and failed is not current:
            return current  # another thread recovered meanwhile
        with self.folder_lock():
            self.conn = None
            if file_id(self.db_path) == self._db_id:
                self._note_damage(exc, action)
                self.close_reader()
                with contextlib.suppress(sqlite3.Error):
                    current.close()
                self.remove_files()
            else:
                self.close_conn(current)
            return self._open_or_go_offline()

    def replace(self) -> None:
        """Delete ``index.db`` and open a new one, filled from the payload files."""
        with self.lock:
            current = self.require()
            with self.folder_lock():
                self.conn = None
                self.close_reader()
                with contextlib.suppress(sqlite3.Error):
                    current.close()
                self.remove_files()
                self.conn = self._open_locked()

    def close_locked(self) -> None:
        """Close the connection for good (:attr:`lock` held). Idempotent."""
        self.closed = True
        conn, self.conn = self.conn, None
        if conn is not None:
            with self.folder_lock():
                self.close_conn(conn)
