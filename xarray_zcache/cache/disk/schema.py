"""The SQLite index: schema, connecting (WAL), transactions, and what an error means."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from typing import Final

logger = logging.getLogger("xarray_zcache.disk")

INDEX_NAME: Final = "index.db"
#: Files SQLite keeps beside the index in WAL mode.
INDEX_SIDE_FILES: Final = ("-wal", "-shm")
#: Lock file serializing the opening, rebuilding and replacing of ``index.db`` across processes.
LOCK_NAME: Final = "index.db.lock"
#: 2: payload format 2; 3: segment files (columns added in place); 4: ``entries`` is a
#: ``WITHOUT ROWID`` table (table rebuilt in place, :data:`MIGRATE_4`); 5: the change log
#: (:data:`_CHANGE_LOG`, added in place; versions from 4 on may go on writing, see
#: :data:`COMPAT_TABLE`)
SCHEMA_VERSION: Final = 5
#: The oldest schema whose writers may use an index of this one (:data:`COMPAT_TABLE`):
#: schema 5 only adds tables and triggers, which log a schema-4 writer's changes too.
OLDEST_WRITER: Final = 4
#: The table by which a newer version says which older ones may still use its index: one row,
#: ``oldest_writer``, the lowest schema version whose statements stay valid on it (its
#: additions, triggers included, keep their own rules for our writes). A version at least
#: that old uses the index as it is (no migration, ``user_version`` left alone); without the
#: table, or with a higher ``oldest_writer``, the index is the newer version's alone
#: (:class:`NewerIndex`).
COMPAT_TABLE: Final = "zcache_compat"
BUSY_TIMEOUT_MS: Final = 30_000
_WAL_CHECKPOINT_PAGES: Final = 256
_WAL_SIZE_LIMIT: Final = 1 << 20
#: ... but at most this fraction of the filesystem (never under 16 pages)
_WAL_FS_FRACTION: Final = 64
#: Bound of the SQLite page cache of a tier's connection, bytes (allocated as pages are read;
#: ``DiskTier(index_cache_bytes=...)``). Interior B-tree pages of a million-entry index take
#: ~2 MiB; the rest holds the leaf pages of recent lookups and writes.
INDEX_CACHE_BYTES: Final = 16 << 20

#: Bytes of the record of entries row ``{r}`` in its segment (as :func:`.segments.record_length`,
#: but for a namespace longer than 65,535 bytes, which is not recorded: accounting only).
_RECORD_BYTES: Final = (
    "(72 + length(CAST({r}.key AS BLOB)) + length(CAST({r}.namespace AS BLOB)) + {r}.size)"
)

#: The objects beside ``entries`` (its indexes and totals triggers, the tombstones, the
#: totals); all ``IF NOT EXISTS``. Run after ``entries`` exists: a new index creates it first
#: (:data:`_ENTRIES_4`), a migration rebuilds it first (:data:`MIGRATE_4`).
SCHEMA: Final = """
CREATE INDEX IF NOT EXISTS entries_last_access ON entries(last_access);
CREATE INDEX IF NOT EXISTS entries_expires ON entries(expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS tombstones(key TEXT PRIMARY KEY, at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tombstones_at ON tombstones(at);
CREATE TABLE IF NOT EXISTS prefix_tombstones(prefix TEXT PRIMARY KEY, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS totals(
    id INTEGER PRIMARY KEY CHECK (id = 0),
    used INTEGER NOT NULL,
    count INTEGER NOT NULL,
    horizon INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals(id, used, count, horizon) VALUES (0, 0, 0, 0);
CREATE TRIGGER IF NOT EXISTS entries_after_insert AFTER INSERT ON entries BEGIN
    UPDATE totals SET used = used + NEW.size, count = count + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS entries_after_delete AFTER DELETE ON entries BEGIN
    UPDATE totals SET used = used - OLD.size, count = count - 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS entries_after_update_size AFTER UPDATE OF size ON entries BEGIN
    UPDATE totals SET used = used + NEW.size - OLD.size WHERE id = 0;
END;
"""

#: The objects of schema 3 beside ``entries`` (segment files, :mod:`.segments`); all ``IF NOT
#: EXISTS``. ``segment``/``offset``: where the entry's record is (NULL: a payload file of its
#: own). ``segments.live``: bytes of the records rows point to, per segment file (kept by
#: triggers); the rest of the file is dead bytes, reclaimed by compaction.
#: ``segment_overwritten_by_old_code``: a process of schema 2 (it knows no records) that had
#: the folder open before the migration overwrites a row with a new token and its own payload
#: file, leaving ``segment``/``offset`` as they were; this code never does (a new record has a
#: new offset, a new file no segment), so the row is pointed at that file, and the record's
#: bytes leave ``segments.live`` (the nested update's own trigger takes the new size off).
_SEGMENT_OBJECTS: Final = f"""
CREATE INDEX IF NOT EXISTS entries_segment ON entries(segment) WHERE segment IS NOT NULL;
CREATE TABLE IF NOT EXISTS segments(name TEXT PRIMARY KEY, live INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS segment_after_insert AFTER INSERT ON entries
WHEN NEW.segment IS NOT NULL BEGIN
    INSERT INTO segments(name, live) VALUES (NEW.segment, {_RECORD_BYTES.format(r="NEW")})
    ON CONFLICT(name) DO UPDATE SET live = live + excluded.live;
END;
CREATE TRIGGER IF NOT EXISTS segment_after_delete AFTER DELETE ON entries
WHEN OLD.segment IS NOT NULL BEGIN
    UPDATE segments SET live = live - ({_RECORD_BYTES.format(r="OLD")}) WHERE name = OLD.segment;
END;
CREATE TRIGGER IF NOT EXISTS segment_after_update AFTER UPDATE OF segment, offset ON entries
BEGIN
    UPDATE segments SET live = live - ({_RECORD_BYTES.format(r="OLD")})
    WHERE OLD.segment IS NOT NULL AND name = OLD.segment;
    INSERT INTO segments(name, live) SELECT NEW.segment, {_RECORD_BYTES.format(r="NEW")}
    WHERE NEW.segment IS NOT NULL
    ON CONFLICT(name) DO UPDATE SET live = live + excluded.live;
END;
CREATE TRIGGER IF NOT EXISTS segment_overwritten_by_old_code AFTER UPDATE OF token ON entries
WHEN NEW.segment IS NOT NULL AND NEW.segment = OLD.segment AND NEW.offset = OLD.offset
     AND NEW.token != OLD.token
BEGIN
    UPDATE segments SET live = live - ({_RECORD_BYTES.format(r="OLD")})
        + ({_RECORD_BYTES.format(r="NEW")}) WHERE name = OLD.segment;
    UPDATE entries SET segment = NULL, offset = NULL WHERE key = NEW.key;
END;
"""
#: Bytes of the record of entries row ``{r}`` as :func:`.segments.record_length` counts them
#: (a namespace longer than 65,535 bytes is not recorded).
_RECORD_LENGTH: Final = (
    "(72 + length(CAST({r}.key AS BLOB)) + (CASE WHEN length(CAST({r}.namespace AS BLOB)) "
    "<= 65535 THEN length(CAST({r}.namespace AS BLOB)) ELSE 0 END) + {r}.size)"
)
_LOGGED: Final = "INSERT INTO changes(key, kind, segment, offset, length)"

#: Schema 5: the change log, read by the location map of every process (:mod:`.keydir`).
#: Triggers on ``entries`` append, for every row inserted, deleted, or moved or replaced,
#: where the key's record now is (``kind`` NULL: the key has no row any more), whichever
#: writer made the change (this version, or an older one that :data:`COMPAT_TABLE` admits,
#: which knows nothing of the log). ``seq`` grows in commit order (writers are serialized);
#: ``changes_state.pruned``: changes up to it were deleted (a map behind it is rebuilt);
#: ``epoch``: made anew with each index, so that a map never applies another index's log.
#: Access statistics (``last_access``, ``hits``) are not logged.
_CHANGE_LOG: Final = f"""
CREATE TABLE IF NOT EXISTS {COMPAT_TABLE}(oldest_writer INTEGER NOT NULL);
INSERT INTO {COMPAT_TABLE}(oldest_writer) SELECT {OLDEST_WRITER}
WHERE NOT EXISTS (SELECT 1 FROM {COMPAT_TABLE});
CREATE TABLE IF NOT EXISTS changes(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    kind TEXT NULL,
    segment TEXT NULL,
    offset INTEGER NULL,
    length INTEGER NULL
);
CREATE TABLE IF NOT EXISTS changes_state(
    id INTEGER PRIMARY KEY CHECK (id = 0),
    epoch TEXT NOT NULL,
    pruned INTEGER NOT NULL
);
INSERT OR IGNORE INTO changes_state(id, epoch, pruned) VALUES (0, lower(hex(randomblob(16))), 0);
CREATE TRIGGER IF NOT EXISTS changes_after_insert AFTER INSERT ON entries BEGIN
    {_LOGGED} VALUES (NEW.key, NEW.kind, NEW.segment, NEW.offset, {_RECORD_LENGTH.format(r="NEW")});
END;
CREATE TRIGGER IF NOT EXISTS changes_after_delete AFTER DELETE ON entries BEGIN
    {_LOGGED} VALUES (OLD.key, NULL, NULL, NULL, NULL);
END;
CREATE TRIGGER IF NOT EXISTS changes_after_update
AFTER UPDATE OF key, namespace, kind, size, token, segment, offset ON entries BEGIN
    {_LOGGED} SELECT OLD.key, NULL, NULL, NULL, NULL WHERE OLD.key != NEW.key;
    {_LOGGED} VALUES (NEW.key, NEW.kind, NEW.segment, NEW.offset, {_RECORD_LENGTH.format(r="NEW")});
END;
"""

#: Schema 2 -> 3, in place (``ALTER TABLE``: nothing is lost).
MIGRATE_3: Final = f"""
ALTER TABLE entries ADD COLUMN segment TEXT NULL;
ALTER TABLE entries ADD COLUMN offset INTEGER NULL;
{_SEGMENT_OBJECTS}
"""

#: Every column of ``entries`` (schema 3 and 4), in their stored order.
_ALL_COLUMNS: Final = (
    "key, namespace, kind, size, created, last_access, hits, expires, checksum, token, "
    "segment, offset"
)

#: Schema 4: ``entries`` keyed by the key alone (``WITHOUT ROWID``): a lookup by key is one
#: B-tree descent, where a rowid table needs two (its key index, then the table), and a hit's
#: row fills one leaf page, not two. Rows are ~130 bytes, well under the 1/20 of a page that
#: ``WITHOUT ROWID`` tables suit; the secondary indexes carry the key instead of a rowid.
_ENTRIES_4: Final = """
CREATE TABLE entries(
    key TEXT PRIMARY KEY,
    namespace TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_access REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    expires REAL NULL,
    checksum INTEGER NOT NULL,
    token INTEGER NOT NULL DEFAULT 0,
    segment TEXT NULL,
    offset INTEGER NULL
) WITHOUT ROWID;
"""

#: Schema 3 -> 4, in place, in the caller's transaction: the rows are copied (in key order)
#: into the new ``entries``; the old table goes with its indexes and triggers, which
#: :data:`SCHEMA` and :data:`_SEGMENT_OBJECTS` (all ``IF NOT EXISTS``) then create on the
#: new one.
#: ``totals`` and ``segments.live`` are unchanged: the copy runs before the triggers exist.
MIGRATE_4: Final = f"""
ALTER TABLE entries RENAME TO entries_3;
{_ENTRIES_4}
INSERT INTO entries({_ALL_COLUMNS}) SELECT {_ALL_COLUMNS} FROM entries_3 ORDER BY key;
DROP TABLE entries_3;
"""

ENTRY_COLUMNS: Final = (
    "key",
    "namespace",
    "kind",
    "size",
    "created",
    "last_access",
    "hits",
    "expires",
    "checksum",
)

#: SQLite primary result codes meaning "the database file is damaged" (not busy, full, I/O).
_SQLITE_CORRUPT: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
#: SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_FULL
_SQLITE_RESOURCE: Final = frozenset({5, 6, 10, 13, 14})
_RESOURCE_ERRNOS: Final = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EIO, errno.EROFS) if e
)


class SchemaDamaged(sqlite3.DatabaseError):
    """The index's schema or rows are not what this package writes (outside damage)."""


class NewerIndex(RuntimeError):
    """The index was written by a newer xarray-zcache (schema version too high): this version
    must not touch it, and cannot use the folder."""


class IndexUnavailable(OSError):
    """The index cannot be used now (disk full, I/O error): the tier runs without it."""


def wal_pages(db_path: str) -> int:
    """Pages between automatic checkpoints of the WAL: ``_WAL_CHECKPOINT_PAGES``, fewer on a
    small filesystem. A WAL never checkpointed can fill a small filesystem, and then cannot be
    checkpointed at all (that needs room for the database to grow): the tier never stores
    again, even once the space its payloads took is freed."""
    try:
        st = os.statvfs(os.path.dirname(db_path) or ".")
    except (OSError, AttributeError):
        return _WAL_CHECKPOINT_PAGES
    return max(
        16, min(_WAL_CHECKPOINT_PAGES, st.f_blocks * st.f_frsize // _WAL_FS_FRACTION // 4096)
    )


def is_corruption(exc: BaseException) -> bool:
    """Whether an SQLite error says the database file is damaged (not busy, full or I/O).

    Besides SQLite's own verdicts, "no such table/column" counts: the statements here are
    fixed, so that only happens when damage altered the stored schema.
    """
    if isinstance(exc, SchemaDamaged):
        return True
    text = str(exc).lower()
    if text.startswith(("no such table", "no such column")):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _SQLITE_CORRUPT
    return "malformed" in text or "not a database" in text


def as_damage(exc: BaseException) -> sqlite3.DatabaseError | None:
    """``exc`` as index damage, or None if it is not damage.

    Rows of impossible types or undecodable text (``TypeError``, ``ValueError`` while using
    them) are damage too.
    """
    if isinstance(exc, sqlite3.DatabaseError):
        return exc if is_corruption(exc) else None
    if isinstance(exc, (TypeError, ValueError)):
        return SchemaDamaged(repr(exc))
    return None


def is_resource_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a disk-full, I/O or lock-timeout error (the tier can wait it out)."""
    if isinstance(exc, IndexUnavailable):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return (code & 0xFF) in _SQLITE_RESOURCE
        text = str(exc).lower()
        return "full" in text or "disk i/o" in text or "locked" in text
    return isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return (code & 0xFF) == 13 if code is not None else "full" in str(exc).lower()
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def split_sql(script: str) -> list[str]:
    """Split the schema script into statements (triggers contain inner semicolons)."""
    statements: list[str] = []
    current: list[str] = []
    for line in script.strip().splitlines():
        current.append(line)
        joined = "\n".join(current).strip()
        if sqlite3.complete_statement(joined):
            statements.append(joined)
            current = []
    return statements


def refuse_newer(conn: sqlite3.Connection, db_path: str, version: int) -> None:
    """Raise :class:`NewerIndex` unless the index of schema ``version`` (newer than ours) says
    in :data:`COMPAT_TABLE` that this version may go on using it."""
    oldest = None
    with contextlib.suppress(sqlite3.Error, TypeError, IndexError):
        oldest = conn.execute(f"SELECT min(oldest_writer) FROM {COMPAT_TABLE}").fetchone()[0]
    if not isinstance(oldest, int) or oldest > SCHEMA_VERSION:
        raise NewerIndex(
            f"disk cache index {db_path} has schema version {version}, newer than this "
            f"xarray-zcache supports ({SCHEMA_VERSION})"
        )


def newer_compatible(conn: sqlite3.Connection) -> bool:
    """Whether ``conn``'s index is of a newer schema that this version may use
    (:func:`refuse_newer` let it through)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0]) > SCHEMA_VERSION


def schema_ok(conn: sqlite3.Connection) -> bool:
    """Whether the index's schema is what :func:`connect` creates; for a newer schema that
    admits this version, whether every object of ours is there unchanged (it may add its
    own)."""
    found = schema_of(conn)
    if newer_compatible(conn):
        return set(expected_schema()) <= set(found)
    return found == expected_schema()


def schema_of(conn: sqlite3.Connection) -> list[tuple[str, str, str, str | None]]:
    return sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall())


_EXPECTED: list[list[tuple[str, str, str, str | None]]] = []


def create_statements() -> list[str]:
    """The statements creating a new index of schema :data:`SCHEMA_VERSION`."""
    return (
        split_sql(_ENTRIES_4)
        + split_sql(SCHEMA)
        + split_sql(_SEGMENT_OBJECTS)
        + split_sql(_CHANGE_LOG)
    )


def migrate_statements(version: int) -> list[str]:
    """The statements bringing an index of schema ``version`` (2, 3 or 4) to the current one
    (schema 4 -> 5 only adds: :data:`_CHANGE_LOG`)."""
    steps = split_sql(MIGRATE_3) if version == 2 else []
    if version < 4:
        steps += split_sql(MIGRATE_4) + split_sql(SCHEMA) + split_sql(_SEGMENT_OBJECTS)
    return steps + split_sql(_CHANGE_LOG)


def expected_schema() -> list[tuple[str, str, str, str | None]]:
    """What :func:`schema_of` returns for an index created by :func:`connect`."""
    if not _EXPECTED:
        with contextlib.closing(sqlite3.connect(":memory:")) as mem:
            for statement in create_statements():
                mem.execute(statement)
            _EXPECTED.append(schema_of(mem))
    return _EXPECTED[0]


@contextlib.contextmanager
def txn(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error).

    ``IMMEDIATE`` takes the database write lock at once: every change to payload files made
    inside such a transaction is serialized with those of other processes.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        _after_commit.pop(id(conn), None)  # rolled back: what it did is not to be counted
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    for fn in _after_commit.pop(id(conn), ()):
        fn()


#: id(connection) -> what to do once its transaction commits (see `on_commit`)
_after_commit: dict[int, list[Callable[[], None]]] = {}


def on_commit(conn: sqlite3.Connection, fn: Callable[[], None]) -> None:
    """Run ``fn`` once the transaction of ``conn`` (a `txn`) commits, never if it rolls
    back; at once outside a transaction. For figures that must count only what was done
    (an eviction inside a transaction that then fails is undone)."""
    if conn.in_transaction:
        _after_commit.setdefault(id(conn), []).append(fn)
    else:
        fn()


def connect(db_path: str, cache_bytes: int = INDEX_CACHE_BYTES) -> tuple[sqlite3.Connection, bool]:
    """Connect to ``db_path`` (WAL) and create the schema if needed; ``(conn, created)``.

    ``cache_bytes`` bounds the connection's page cache (:data:`INDEX_CACHE_BYTES`).

    ``created`` is True when the index was new, or of schema 1 (its tables are dropped: the
    payload files of that layout are unreadable now). An index of schema 2 or 3 is migrated
    in place, in one transaction, every row, tombstone and total kept (:data:`MIGRATE_3`: two
    columns and a table added; :data:`MIGRATE_4`: ``entries`` rebuilt ``WITHOUT ROWID``).

    Raises
    ------
    NewerIndex
        If the index was written by a newer version (schema version too high).
    """
    try:
        # Pre-create the (empty = valid) database so it gets mode 0600; SQLite gives its
        # -wal and -shm files the same mode.
        os.close(os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600))
    except PermissionError as exc:
        raise PermissionError(
            f"disk cache index {db_path} is not writable: {exc.strerror}"
        ) from exc
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
    created = False
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # a newer version's index is refused before anything is changed or locked (a read:
        # not blocked by that version writing, which would pass for a busy index); checked
        # again in the transaction below (it may be upgraded meanwhile)
        early = conn.execute("PRAGMA user_version").fetchone()[0]
        if early > SCHEMA_VERSION:
            refuse_newer(conn, db_path, early)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("disk cache index %s: WAL mode unavailable (%s)", db_path, mode)
        conn.execute("PRAGMA synchronous=NORMAL")
        # a larger page cache than SQLite's 2 MiB default: at a million entries the B-tree
        # pages touched by a batch of fills or of access statistics then stay in memory
        conn.execute(f"PRAGMA cache_size=-{max(1, cache_bytes >> 10)}")
        # bound the WAL (SQLite lets it grow to ~4 MiB between checkpoints and never
        # shrinks it): it shares the filesystem with the payloads
        pages = wal_pages(db_path)
        conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
        conn.execute(f"PRAGMA journal_size_limit={min(_WAL_SIZE_LIMIT, pages * 4096)}")
        with txn(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                refuse_newer(conn, db_path, version)  # or use it as it is
            elif version in (2, 3, 4):  # the same payload files: migrate in place
                for statement in migrate_statements(version):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version < SCHEMA_VERSION:
                created = True
                if version > 0:  # an older layout: its payload files are unreadable now
                    for table in ("entries", "tombstones", "prefix_tombstones", "totals"):
                        conn.execute(f"DROP TABLE IF EXISTS {table}")
                for statement in create_statements():
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.close()
        raise
    return conn, created
