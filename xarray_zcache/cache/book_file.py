"""The SQLite file of the version book (``versions.db`` in the cache folder, shared by
every process using the folder): created private, in WAL mode, with its schema and the
columns added since its first release; one rule for its errors (log, and go on from
memory: `BookFile._sql`); a folder that vanished under it (`BookFile._lost`); letting go
of its connection (`detach`, `close`: never closed from another thread)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

__all__ = ["BOOK_NAME", "BookFile"]

logger = logging.getLogger("xarray_zcache.cache")

BOOK_NAME: Final = "versions.db"
_BUSY_TIMEOUT_S: Final = 30.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS versions(key TEXT PRIMARY KEY, version TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units(
    unit TEXT PRIMARY KEY,
    validated REAL NOT NULL,
    changed REAL NOT NULL DEFAULT 0,
    claimed REAL NOT NULL DEFAULT 0,
    ended REAL NOT NULL DEFAULT 0,
    holder TEXT NOT NULL DEFAULT '',
    lease REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen(key TEXT PRIMARY KEY, version TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS changes(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    prefix INTEGER NOT NULL,
    holder TEXT NOT NULL,
    at REAL NOT NULL
);
"""

#: columns added to ``units`` since its first release (a folder of an older release gets them)
_ADDED: Final = {
    "ended": "REAL NOT NULL DEFAULT 0",
    "holder": "TEXT NOT NULL DEFAULT ''",
    "lease": "REAL NOT NULL DEFAULT 0",
}

_T = TypeVar("_T")


class BookFile:
    """Part of `VersionBook` (its state is the book's): its file."""

    _lock: threading.Lock
    _conn: sqlite3.Connection | None
    _folder: str | None
    on_lost: Callable[[BaseException, str], None] | None
    legacy: bool

    def _open(self, folder: str, had_entries: bool) -> None:
        """Open (or create) the book's file in ``folder``; on failure keep memory only."""
        path = os.path.join(folder, BOOK_NAME)
        try:
            new = not os.path.exists(path)
            # created private before SQLite opens it (its -wal/-shm files take its mode)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            conn = sqlite3.connect(
                path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            have = {str(r[1]) for r in conn.execute("PRAGMA table_info(units)")}
            for column, kind in _ADDED.items():
                if column not in have:
                    with contextlib.suppress(sqlite3.OperationalError):  # (another process)
                        conn.execute(f"ALTER TABLE units ADD COLUMN {column} {kind}")
            if new and had_entries:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('legacy', '1')")
            row = conn.execute("SELECT value FROM meta WHERE name = 'legacy'").fetchone()
            self.legacy = row is not None
            self._conn = conn
        except (sqlite3.Error, OSError) as exc:
            logger.warning(
                "xarray-zcache: cannot use %s (%s): versions are kept in memory only", path, exc
            )

    # -- SQL, with one rule for errors: log, and go on from memory ----------------------------

    def _sql(self, what: str, op: Callable[[sqlite3.Connection], _T], default: _T) -> _T:
        conn = self._conn
        if conn is None:
            return default
        try:
            return op(conn)
        except sqlite3.Error as exc:
            if self._conn is not conn:
                return default  # detached or lost meanwhile (by another thread): memory only
            if self._folder is not None and not os.path.isdir(self._folder):
                self._lost(exc, what)
            else:
                logger.warning("xarray-zcache: versions book: %s failed (%s)", what, exc)
            return default

    def _lost(self, exc: BaseException, what: str) -> None:
        """The folder vanished: keep the book in memory only, and tell `on_lost` once."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        _release(conn)
        if self.on_lost is not None:
            self.on_lost(exc, f"{what} in the versions book")
        else:
            logger.warning(
                "xarray-zcache: the cache folder %s vanished (%s); versions are kept in "
                "memory only",
                self._folder,
                exc,
            )

    def detach(self) -> None:
        """Keep the book in memory only from now on (its folder is no longer used)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            _release(conn)

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _row(self, what: str, query: str, key: str) -> tuple[Any, ...] | None:
        """The one row ``query`` finds for ``key`` (None: none, or the file failed)."""
        row = self._sql(what, lambda c: c.execute(query, (key,)).fetchone(), None)
        return None if row is None else tuple(row)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            _release(conn)


def _release(conn: sqlite3.Connection) -> None:
    """Let go of the book's connection, which another thread may be using right now (an
    operation that began before the book was detached, closed or lost holds it in a
    local): closing it from here would free what that thread is using (a segfault inside
    ``sqlite3_close``, seen once when a vanished folder was detached by the disk writer
    while a write was recording a change). Dropping the reference closes it as soon as the
    last user lets go, in that user's thread."""
    del conn
