"""Persistent on-disk (L2) tier of the cache: payload files plus a SQLite index.

Layout under the cache folder (created with mode 0700)::

    <path>/chunks/<hh>/<sha256hex>.cache     payloads of kind "chunk"
    <path>/metadata/<hh>/<sha256hex>.meta    payloads of kind "metadata"
    <path>/index.db                          SQLite index (WAL mode)

``hh`` is the first two hex digits of the SHA-256 of the key (UTF-8, ``surrogatepass``). File
names are only ever the hash, so no key, however hostile, can name a path outside the folder.

Every payload file starts with a fixed 72-byte header (:data:`HEADER`), followed by the key,
the namespace and the payload::

    magic b"ZCCH" | version u8 | flags u8 | namespace length u16 | payload length u64
    | payload crc32 u32 | key length u32 | expires f64 | header crc32 u32 | 4 pad | sha256(key)
    | key (UTF-8) | namespace (UTF-8) | payload

``expires`` is ``inf`` when the entry never expires. The header CRC-32 covers the fixed part
(with the header CRC field zeroed), the key and the namespace, so a damaged length, expiry or key
is detected like a damaged payload. Because the header carries the key, the length, the checksum
and the expiry, a cache hit is served from the file alone, with no SQLite query (see
:class:`DiskTier` for why that is sound), and a lost or damaged ``index.db`` can be rebuilt from
the payload files (:meth:`DiskTier.rebuild_index`). Format version 1 (no key, no header CRC) is
not read: such files are treated as damaged and dropped.
Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import math
import os
import pathlib
import sqlite3
import stat
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["FORMAT_VERSION", "HEADER", "MAGIC", "DiskTier"]

logger = logging.getLogger("xarray_zcache.disk")

_T = TypeVar("_T")

MAGIC: Final = b"ZCCH"
FORMAT_VERSION: Final = 2
#: Fixed part of a payload header: magic, version, flags, namespace length, payload length,
#: payload crc32, key length, expires, header crc32, (4 pad), sha256(key): 72 bytes. The key and
#: the namespace follow it, then the payload.
HEADER: Final = struct.Struct("<4sBBHQIIdI4x32s")
_HEADER_SIZE: Final = HEADER.size
#: Bytes read with the fixed header, so that a typical key and namespace come in the same call.
_HEAD_READ: Final = _HEADER_SIZE + 440
_MAX_NAMESPACE: Final = 0xFFFF
#: SQLite primary result codes meaning "the database file is damaged" (not busy, full, I/O).
_SQLITE_CORRUPT: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB

_LAYOUT: Final[dict[str, tuple[str, str]]] = {
    "chunk": ("chunks", ".cache"),
    "metadata": ("metadata", ".meta"),
}
_KINDS: Final = ("chunk", "metadata")
_SCHEMA_VERSION: Final = 2  # 2: payload format 2
_BUSY_TIMEOUT_MS: Final = 30_000
#: Busy timeout for opportunistic access-stat flushes triggered from the hit path.
_OPPORTUNISTIC_BUSY_MS: Final = 0
#: After an opportunistic flush found the index busy, wait this long before trying again.
_FLUSH_RETRY_S: Final = 0.1
_FLUSH_INTERVAL_S: Final = 1.0
_FLUSH_MAX_PENDING: Final = 1000
#: Pending access records kept when the index cannot be written; beyond that they are dropped.
_PENDING_HARD_LIMIT: Final = 100_000
#: After an eviction triggered by ``put``, usage is brought down to this fraction of capacity.
_EVICT_LOW_WATER: Final = 0.9
#: Tombstones older than this are pruned automatically every ``_AUTO_PRUNE_EVERY`` stores.
_TOMBSTONE_TTL_S: Final = 3600.0
_AUTO_PRUNE_EVERY: Final = 4096
#: ``verify(repair=True)`` removes temp files older than this (younger ones may be in flight).
_STALE_TEMP_AGE_S: Final = 600.0
_TEMP_SUFFIX: Final = ".tmp"
_INDEX_NAME: Final = "index.db"
#: Files SQLite keeps beside the index in WAL mode.
_INDEX_SIDE_FILES: Final = ("-wal", "-shm")
#: Lock file serializing the opening, rebuilding and replacing of ``index.db`` across processes.
_LOCK_NAME: Final = "index.db.lock"
#: A ``horizon`` (see ``prune_tombstones``) further in the future than this is damage: reset it.
_HORIZON_SLACK_NS: Final = 86_400 * 10**9
_WAL_CHECKPOINT_PAGES: Final = 256
_WAL_SIZE_LIMIT: Final = 1 << 20
#: While the index cannot be opened (disk full...), try again at most this often.
_REOPEN_INTERVAL_S: Final = 5.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS entries(
    key TEXT PRIMARY KEY,
    namespace TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_access REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    expires REAL NULL,
    checksum INTEGER NOT NULL,
    token INTEGER NOT NULL DEFAULT 0
);
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

_UPSERT: Final = """
INSERT INTO entries(key, namespace, kind, size, created, last_access, hits, expires, checksum,
                    token)
VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)
ON CONFLICT(key) DO UPDATE SET
    namespace = excluded.namespace, kind = excluded.kind, size = excluded.size,
    created = excluded.created, last_access = excluded.last_access, expires = excluded.expires,
    checksum = excluded.checksum, token = excluded.token
"""

_ENTRY_COLUMNS: Final = (
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


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _sql_safe(text: str) -> bool:
    """Whether ``text`` can be stored in SQLite (lone surrogates cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _prefix_upper(prefix: str) -> str | None:
    """Smallest string greater than every string starting with ``prefix`` (None: unbounded)."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1])
        if code >= 0x10FFFF:
            chars.pop()
            continue
        code += 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot occur in stored keys: skip them
            code = 0xE000
        chars[-1] = chr(code)
        return "".join(chars)
    return None


class _SchemaDamaged(sqlite3.DatabaseError):
    """The index's schema is not the one this module creates (outside damage)."""


def _is_corruption(exc: BaseException) -> bool:
    """Whether an SQLite error says the database file is damaged (not busy, full or I/O).

    Besides SQLite's own verdicts, "no such table/column" counts: the statements here are
    fixed, so that only happens when damage altered the stored schema.
    """
    if isinstance(exc, _SchemaDamaged):
        return True
    text = str(exc).lower()
    if text.startswith(("no such table", "no such column")):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _SQLITE_CORRUPT
    return "malformed" in text or "not a database" in text


_EXPECTED_SCHEMA: list[tuple[str, str, str, str | None]] | None = None


def _schema_of(conn: sqlite3.Connection) -> list[tuple[str, str, str, str | None]]:
    return sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall())


def _expected_schema() -> list[tuple[str, str, str, str | None]]:
    global _EXPECTED_SCHEMA
    if _EXPECTED_SCHEMA is None:
        with contextlib.closing(sqlite3.connect(":memory:")) as mem:
            for statement in _split_sql(_SCHEMA):
                mem.execute(statement)
            _EXPECTED_SCHEMA = _schema_of(mem)
    return _EXPECTED_SCHEMA


class _IndexUnavailable(OSError):
    """The index cannot be used now (disk full, I/O error): the tier runs without it."""


_RESOURCE_ERRNOS: Final = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EIO, errno.EROFS) if e
)
#: SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_FULL
_SQLITE_RESOURCE: Final = frozenset({5, 6, 10, 13, 14})


def _is_resource_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a disk-full, I/O or lock-timeout error (the tier can wait it out)."""
    if isinstance(exc, _IndexUnavailable):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return (code & 0xFF) in _SQLITE_RESOURCE
        text = str(exc).lower()
        return "full" in text or "disk i/o" in text or "locked" in text
    return isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return (code & 0xFF) == 13 if code is not None else "full" in str(exc).lower()
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def _file_id(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path``, None if missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _unlink_missing_ok(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Read ``size`` bytes at ``offset`` (fewer only at end of file)."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pack_header(
    key: bytes, namespace: bytes, length: int, crc: int, expires: float, digest: bytes
) -> bytes:
    """The header of a payload file: fixed part, key and namespace (see the module docstring)."""
    if len(namespace) > _MAX_NAMESPACE:
        namespace = b""  # only a label: not worth refusing the entry for
    fields = [MAGIC, FORMAT_VERSION, 0, len(namespace), length, crc, len(key), expires, 0, digest]
    fields[8] = zlib.crc32(namespace, zlib.crc32(key, zlib.crc32(HEADER.pack(*fields))))
    return HEADER.pack(*fields) + key + namespace


@dataclasses.dataclass(frozen=True, slots=True)
class _Header:
    key: bytes
    namespace: bytes
    offset: int  # of the payload
    length: int
    crc: int
    expires: float


def _read_header(
    fd: int, file_size: int, digest: bytes | None, key: bytes | None = None
) -> tuple[str | None, _Header | None]:
    """Read and check a payload header.

    ``digest`` (and ``key``, if given) must match what the header records; with
    ``digest=None`` the key hash is checked against the key stored in the header instead.
    Returns ``(problem, header)``; ``problem`` is None when the header is intact, belongs to
    the expected key and is consistent with the file size.
    """
    head = os.pread(fd, min(file_size, _HEAD_READ), 0) if file_size > 0 else b""
    if len(head) < _HEADER_SIZE:
        return "truncated header", None
    magic, version, flags, ns_len, length, crc, key_len, expires, hcrc, key_hash = (
        HEADER.unpack_from(head)
    )
    if magic != MAGIC:
        return "bad magic", None
    if version != FORMAT_VERSION:
        return f"unsupported format version {version}", None
    if digest is not None and key_hash != digest:
        return "key hash mismatch", None
    offset = _HEADER_SIZE + key_len + ns_len
    if file_size != offset + length:
        return "length mismatch", None
    if len(head) < offset:
        head += _pread_exact(fd, offset - len(head), len(head))
        if len(head) < offset:
            return "truncated header", None
    stored_key = head[_HEADER_SIZE : _HEADER_SIZE + key_len]
    namespace = head[_HEADER_SIZE + key_len : offset]
    fixed = HEADER.pack(magic, version, flags, ns_len, length, crc, key_len, expires, 0, key_hash)
    if zlib.crc32(namespace, zlib.crc32(stored_key, zlib.crc32(fixed))) != hcrc:
        return "header checksum mismatch", None
    if key is not None:
        if stored_key != key:
            return "key mismatch", None
    elif hashlib.sha256(stored_key).digest() != key_hash:
        return "key hash mismatch", None
    if math.isnan(expires):
        return "invalid expiry", None
    return None, _Header(stored_key, namespace, offset, int(length), int(crc), float(expires))


def _stale_temp(entry: os.DirEntry[str], now: float) -> bool:
    """Whether a temp file is abandoned: its writer (pid in the name) is dead, or it is old.

    Temp files are named ``.<hash>.<pid>.<uuid>.tmp``; the folder is shared by the processes
    of one host, so a pid that does not exist here means a writer that died (a crash).
    """
    try:
        if now - entry.stat().st_mtime > _STALE_TEMP_AGE_S:
            return True
    except OSError:
        return False
    parts = entry.name.split(".")
    if len(parts) != 5 or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists (another user's) or cannot tell
    return False


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (
        b.st_dev,
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
    )


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _prepare_folder(path: pathlib.Path) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except PermissionError as exc:
        raise PermissionError(
            f"cannot create the disk cache folder {path}: {exc.strerror}"
        ) from exc
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"disk cache path {path} exists and is not a directory")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise PermissionError(
            f"disk cache folder {path} is owned by uid {st.st_uid}, not by the current user "
            f"(uid {uid}); refusing to use it"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise PermissionError(f"disk cache folder {path} is not writable")
    for sub, _ext in _LAYOUT.values():
        try:
            os.makedirs(path / sub, mode=0o700, exist_ok=True)
        except PermissionError as exc:
            raise PermissionError(
                f"disk cache folder {path} is not writable: {exc.strerror}"
            ) from exc


class DiskTier:
    """Persistent, size-bounded, multi-process-safe mapping of ``str`` keys to ``bytes``.

    Payloads are files named by the SHA-256 of their key; an SQLite index (WAL mode) records
    namespace, kind, size, creation time, last access, hit count, expiry and checksum of each
    entry, plus tombstones used to reject stale writes.

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
    path : pathlib.Path
        The resolved cache folder.
    capacity : int
        Payload byte budget.
    max_object_size : int or None
        Largest payload stored.
    corruptions : int
        Damage found by this instance: damaged payload files removed (by ``get``,
        ``verify(repair=True)`` or a rebuild of the index), and damaged indexes replaced.
    index_rebuilds : int
        Times this instance rebuilt ``index.db`` from the payload files.
    last_rebuild : dict
        Counts of the last rebuild (see :meth:`rebuild_index`), empty if none.
    evictions : int
        Entries evicted for space by this instance.
    evicted_bytes : int
        Payload bytes evicted for space by this instance.
    expirations : int
        Expired entries dropped by this instance.
    stale_rejections : int
        ``put`` calls refused because a newer write or delete of the key was recorded.

    Raises
    ------
    PermissionError
        If the folder is owned by another user or is not writable.

    Notes
    -----
    **Thread safety.** All public methods are thread-safe: the SQLite connection is guarded by
    a lock, pending access statistics by another. Reads of payload files happen outside any
    lock, so concurrent hits do not serialize.

    **Several processes** may open the same folder. Every change to payload files (install or
    unlink) happens inside an SQLite ``BEGIN IMMEDIATE`` transaction, i.e. while holding the
    database write lock, so changes by different processes are serialized.

    **Hit path without SQL.** ``put`` works in two transactions: the first checks tombstones,
    unlinks any previous file of the key, commits the new index row with a random token and
    evicts if the total exceeds the capacity (down to 90% of it; the new key is spared), so no
    committed state ever exceeds the capacity; the second checks that the row still carries
    that token and only then ``os.replace``-s the temp file into place. Deletion and eviction
    unlink files *before* deleting their rows, in the same transaction. Hence, between
    transactions, *a visible payload file always has a committed index row* (the converse
    need not hold: a crash can leave a row whose file is gone, which reads as a miss and is
    cleaned by eviction or :meth:`verify`). ``get`` therefore reads only the file: its header
    carries the key, length, CRC-32s (of the payload, and of the header with key and
    namespace) and expiry, so the bytes returned are always exactly what was stored for this
    key. A payload file without an index row can only appear through
    outside tampering; ``get`` serves it if the header and checksum verify (the bytes are
    correct for this key) and ``verify(repair=True)`` removes it.

    **Crash safety.** Payloads are written to a temp file (``.<hash>.<pid>.<uuid>.tmp``) in the
    final folder and renamed atomically, so a reader never sees a half-written entry. A crash
    may leave temp files (never read; removed by ``verify(repair=True)`` once their process is
    gone) and rows without file.

    **A lost or damaged index** is rebuilt from the payload headers (:meth:`rebuild_index`):
    at open when ``index.db`` is missing, empty, unreadable or of an older schema; whenever
    SQLite reports it damaged (or it yields an altered schema or impossible rows) during an
    operation, which is then retried; and by ``verify(repair=True)``. An instance notices
    when ``index.db`` is deleted or replaced under it and reopens it.

    **Disk full, I/O errors.** ``put`` never raises for them: on ENOSPC it evicts least
    recently used entries and checkpoints the (bounded) WAL, then retries once. An
    invalidation (``delete``, ``delete_prefix``) that cannot be recorded still unlinks the
    key's files; it is recorded before any later write, and ``get`` serves nothing it covers
    meanwhile. If the index cannot even be opened, the tier runs without it (hits from the
    self-checking files, nothing stored) and retries every few seconds.

    An instance must not be used across ``fork()``: open a new one in the child process.

    **Access statistics** (``last_access``, ``hits``) are kept in memory and written in batches:
    on :meth:`flush`, :meth:`close`, before eviction, about once a second while hits arrive, or
    when 1000 keys are pending.

    **Stale writes.** A ``put`` with ``fetch_started_ns`` is refused if the key was deleted or
    written (``put`` without ``fetch_started_ns``), or a prefix of it deleted, after that time.
    Tombstones older than an hour are pruned; fetches older than the pruning horizon are
    refused too.
    """

    path: pathlib.Path
    capacity: int
    max_object_size: int | None
    corruptions: int
    evictions: int
    evicted_bytes: int
    expirations: int
    stale_rejections: int

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int,
        *,
        max_object_size: int | None = None,
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
        self._root = str(self.path)
        self._db_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: dict[str, tuple[float, int]] = {}
        self._last_flush = time.monotonic()
        self._flush_retry_at = 0.0
        self._warned: set[object] = set()
        self._stores = 0
        _prepare_folder(self.path)
        self._db_path = os.path.join(self._root, _INDEX_NAME)
        self._lock_path = os.path.join(self._root, _LOCK_NAME)
        self._db_id: tuple[int, int] | None = None
        self.index_rebuilds = 0
        self.last_rebuild: dict[str, int] = {}
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._retry_at = 0.0
        # invalidations that could not be recorded in the index (disk full, I/O error, index
        # unavailable): key or prefix -> time.time_ns(); recorded before any later write
        self._owed_keys: dict[str, int] = {}
        self._owed_prefixes: dict[str, int] = {}
        try:
            with self._db_lock, self._folder_lock():
                self._conn = self._open_index_locked()
        except (OSError, sqlite3.OperationalError) as exc:
            if isinstance(exc, PermissionError) or not _is_resource_error(exc):
                raise
            self._go_offline(exc)

    # ------------------------------------------------------------------ the index file

    @contextlib.contextmanager
    def _folder_lock(self) -> Iterator[None]:
        """Exclusive lock (``flock`` on ``index.db.lock``) for opening or replacing the index.

        Serializes, across processes, the steps SQLite cannot protect: creating
        ``index.db``, removing a damaged one with its ``-wal``/``-shm`` files, and closing a
        connection to an index that was replaced. Never held while waiting for SQLite locks
        held by others, and never nested.
        """
        if fcntl is None:  # pragma: no cover - not POSIX
            yield
            return
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            logger.debug("disk cache %s: no folder lock (%s)", self._root, exc)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _open_index_locked(self) -> sqlite3.Connection:
        """Open ``index.db``, creating it, or replacing it if damaged (folder lock held).

        A new index (the file was missing, empty, damaged, or of an older schema) is filled
        from the payload files' headers (:meth:`rebuild_index`).
        """
        if not os.path.exists(self._db_path):
            # -wal/-shm left by a deleted index: SQLite would replay that WAL into the new one
            self._remove_index_files()
        for attempt in (0, 1):
            conn: sqlite3.Connection | None = None
            try:
                conn, created = self._connect()
                if created and self._has_payload_files():
                    self._rebuild_rows(conn)
                else:
                    if not created and _schema_of(conn) != _expected_schema():
                        raise _SchemaDamaged("the index schema was altered")
                    self._check_totals(conn)
            except (sqlite3.DatabaseError, TypeError, ValueError) as exc:
                # (undecodable text or values of impossible types in the file: damage too)
                if not isinstance(exc, sqlite3.DatabaseError):
                    exc = _SchemaDamaged(repr(exc))
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                if attempt or not _is_corruption(exc):
                    raise
                self._note_index_damage(exc, "opening the index")
                self._remove_index_files()
                continue
            self._db_id = _file_id(self._db_path)
            return conn
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> tuple[sqlite3.Connection, bool]:
        """Connect to ``index.db`` and create the schema if needed; returns ``(conn, created)``."""
        db_path = self._db_path
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
            conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("disk cache index %s: WAL mode unavailable (%s)", db_path, mode)
            conn.execute("PRAGMA synchronous=NORMAL")
            # bound the WAL (SQLite lets it grow to ~4 MiB between checkpoints and never
            # shrinks it): it shares the filesystem with the payloads
            conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            with self._txn(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > _SCHEMA_VERSION:
                    raise RuntimeError(
                        f"disk cache index {db_path} has schema version {version}, newer than "
                        f"this xarray-zcache supports ({_SCHEMA_VERSION})"
                    )
                if version < _SCHEMA_VERSION:
                    created = True
                    if version > 0:  # an older layout: its payload files are unreadable now
                        for table in ("entries", "tombstones", "prefix_tombstones", "totals"):
                            conn.execute(f"DROP TABLE IF EXISTS {table}")
                    for statement in _split_sql(_SCHEMA):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            raise
        return conn, created

    def _remove_index_files(self) -> None:
        for suffix in ("", *_INDEX_SIDE_FILES):
            _unlink_missing_ok(self._db_path + suffix)

    def _has_payload_files(self) -> bool:
        for kind in _KINDS:
            sub, ext = _LAYOUT[kind]
            for bucket in _scandir(os.path.join(self._root, sub)):
                if any(e.name.endswith(ext) for e in _scandir(bucket.path)):
                    return True
        return False

    def _check_totals(self, conn: sqlite3.Connection) -> None:
        """Repair the ``totals`` row if it is missing or its horizon lies in the future."""
        row = conn.execute("SELECT horizon, used, count FROM totals WHERE id = 0").fetchone()
        now_ns = time.time_ns()
        if (
            row is not None
            and all(isinstance(v, int) and v >= 0 for v in row)
            and row[0] <= now_ns + _HORIZON_SLACK_NS
        ):
            return
        with self._txn(conn):
            conn.execute(
                "INSERT INTO totals(id, used, count, horizon) VALUES (0, 0, 0, ?) "
                "ON CONFLICT(id) DO UPDATE SET horizon = excluded.horizon",
                (now_ns,),
            )
            self._recount_locked(conn)

    @staticmethod
    def _recount_locked(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE totals SET used = (SELECT COALESCE(SUM(size), 0) FROM entries), "
            "count = (SELECT COUNT(*) FROM entries) WHERE id = 0"
        )

    def _note_index_damage(self, exc: BaseException, action: str) -> None:
        with self._pending_lock:
            self.corruptions += 1
        self._warn_once(
            "index-damaged",
            "disk cache %s: the index is damaged (%s, while %s); rebuilding it from the "
            "payload files (further index damage logged at debug level)",
            self._root,
            exc,
            action,
        )

    def _close_conn(self, conn: sqlite3.Connection) -> None:
        """Close ``conn`` (folder lock held), protecting the files of a newer index.

        When the last connection to a database closes, SQLite deletes its ``-wal`` and
        ``-shm`` files *by name*. If ``index.db`` was deleted or replaced meanwhile, those
        names belong to the new index: move them aside while closing.
        """
        moved: list[tuple[str, str]] = []
        if self._db_id is not None and _file_id(self._db_path) != self._db_id:
            for suffix in _INDEX_SIDE_FILES:
                src = self._db_path + suffix
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
        """Drop our connection and open the index found at the path now (``_db_lock`` held)."""
        with self._folder_lock():
            old, self._conn = self._conn, None
            if old is not None:
                self._close_conn(old)
            self._warn_once("index-replaced", "disk cache %s: %s; reopening it", self._root, reason)
            return self._open_or_go_offline()

    def _open_or_go_offline(self) -> sqlite3.Connection:
        """``_open_index_locked``; on disk full or I/O errors, go offline and raise."""
        try:
            self._conn = self._open_index_locked()
        except (OSError, sqlite3.OperationalError) as exc:
            if isinstance(exc, PermissionError) or not _is_resource_error(exc):
                raise
            self._go_offline(exc)
            raise _IndexUnavailable(str(exc)) from exc
        return self._conn

    def _go_offline(self, exc: BaseException) -> None:
        """Run without the index until it can be opened again (``_conn`` stays None).

        Hits are still served from the self-checking payload files; nothing is stored;
        deletes unlink the files and are recorded in the index once it is back.
        """
        self._conn = None
        self._retry_at = time.monotonic() + _REOPEN_INTERVAL_S
        self._warn_once(
            "offline",
            "disk cache %s: the index cannot be opened (%s); storing nothing on disk until "
            "it can (memory and the source still serve every read)",
            self._root,
            exc,
        )

    def _recover_locked(
        self, exc: sqlite3.DatabaseError, action: str, failed: sqlite3.Connection | None = None
    ) -> sqlite3.Connection:
        """Replace a damaged index by one rebuilt from the payload files (``_db_lock`` held).

        If another thread or process replaced it already, just switch to the new one.
        """
        current = self._conn
        if current is None:
            return self._require_conn()
        if failed is not None and failed is not current:
            return current  # another thread recovered meanwhile
        with self._folder_lock():
            self._conn = None
            if _file_id(self._db_path) == self._db_id:
                self._note_index_damage(exc, action)
                with contextlib.suppress(sqlite3.Error):
                    current.close()
                self._remove_index_files()
            else:
                self._close_conn(current)
            return self._open_or_go_offline()

    def _read_index(self, action: str, op: Callable[[sqlite3.Connection], _T], default: _T) -> _T:
        """`_with_index` for queries: ``default`` while the index is unavailable."""
        try:
            return self._with_index(action, op)
        except (OSError, sqlite3.OperationalError) as exc:
            if not _is_resource_error(exc):
                raise
            return default

    def _maintain(self, action: str, op: Callable[[sqlite3.Connection], int | None]) -> int:
        """`_with_index` for maintenance: 0 and a warning if the index cannot be written."""
        try:
            return self._with_index(action, op) or 0
        except (OSError, sqlite3.OperationalError) as exc:
            if not _is_resource_error(exc):
                raise
            if not isinstance(exc, _IndexUnavailable):
                self._warn_error(exc, action)
            return 0

    def _with_index(self, action: str, op: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``op(conn)`` holding ``_db_lock``; if the index turns out damaged, rebuild it
        from the payload files and run ``op`` once more."""
        with self._db_lock:
            conn = self._require_conn()
            try:
                return op(conn)
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise
                conn = self._recover_locked(exc, action, conn)
            except (TypeError, ValueError) as exc:  # rows of impossible types: damage
                conn = self._recover_locked(_SchemaDamaged(repr(exc)), action, conn)
            return op(conn)

    @staticmethod
    @contextlib.contextmanager
    def _txn(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error). Hold ``_db_lock``."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _require_conn(self) -> sqlite3.Connection:
        """The open connection (``_db_lock`` held); reopens if ``index.db`` was replaced.

        Raises
        ------
        RuntimeError
            If the tier is closed.
        _IndexUnavailable
            If the index cannot be opened (disk full, I/O error); retried every few seconds.
        """
        if self._closed:
            raise RuntimeError(f"DiskTier at {self._root} is closed")
        conn = self._conn
        if conn is None:
            if time.monotonic() < self._retry_at:
                raise _IndexUnavailable(f"disk cache index {self._db_path} is unavailable")
            with self._folder_lock():
                conn = self._open_or_go_offline()
            logger.info("disk cache %s: the index is available again", self._root)
        elif _file_id(self._db_path) != self._db_id:
            conn = self._reopen_locked("the index file was deleted or replaced")
        return conn

    def _settle_owed_locked(self, conn: sqlite3.Connection) -> None:
        """Record the invalidations owed to the index (``_db_lock`` held; own transaction)."""
        if not (self._owed_keys or self._owed_prefixes):
            return
        keys, prefixes = dict(self._owed_keys), dict(self._owed_prefixes)
        with self._txn(conn):
            for key in keys:
                self._delete_locked(conn, key)
            for prefix in prefixes:
                self._delete_prefix_locked(conn, prefix)
        for key in keys:
            self._owed_keys.pop(key, None)
        for prefix in prefixes:
            self._owed_prefixes.pop(prefix, None)

    def _file_path(self, hexdigest: str, kind: str) -> str:
        sub, ext = _LAYOUT[kind]
        return os.path.join(self._root, sub, hexdigest[:2], hexdigest + ext)

    def might_contain(self, key: str) -> bool:
        """Cheap pre-check for `get`: whether a payload file exists for ``key``.

        One hash and a ``stat`` per kind, no open, no SQL: lets async callers skip a
        thread hop for keys that are certainly not on disk. ``True`` does not promise a
        hit (the file may be expired or damaged; `get` decides).
        """
        if self._closed:
            return False
        hexdigest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return any(os.path.exists(self._file_path(hexdigest, kind)) for kind in _KINDS)

    def _warn_once(self, tag: object, message: str, *args: object) -> None:
        if tag in self._warned:
            logger.debug(message, *args)
            return
        self._warned.add(tag)
        logger.warning(message, *args)

    def _warn_error(self, exc: BaseException, action: str) -> None:
        if isinstance(exc, OSError):
            tag: object = ("oserror", exc.errno)
        elif isinstance(exc, sqlite3.Error):
            tag = ("sqlite", getattr(exc, "sqlite_errorcode", None))
        else:
            tag = ("other", type(exc).__name__)
        self._warn_once(
            tag,
            "disk cache %s: %s failed: %s (further such errors logged at debug level)",
            self._root,
            action,
            exc,
        )

    # ------------------------------------------------------------------ reads

    def get(self, key: str, *, now: float | None = None) -> bytes | None:
        """Return the payload stored for ``key``, or None.

        Parameters
        ----------
        key : str
            Cache key.
        now : float, optional
            Current time (seconds since the epoch) for the expiry check and the recorded
            access; default ``time.time()``.

        Returns
        -------
        bytes or None
            The payload, or None on a miss, an expired entry (which is then deleted) or a
            missing/damaged file (which is deleted and counted in :attr:`corruptions`).
            Never raises for damaged files.
        """
        if self._closed:
            return None
        if (self._owed_keys or self._owed_prefixes) and self._owes(key):
            return None  # invalidated while the index was unwritable: not trusted until recorded
        key_bytes = key.encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(key_bytes).digest()
        hexdigest = digest.hex()
        t = time.time() if now is None else now
        for kind in _KINDS:
            path = self._file_path(hexdigest, kind)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._warn_error(exc, f"opening {path}")
                return None
            payload = b""
            try:
                st = os.fstat(fd)
                problem, header = _read_header(fd, st.st_size, digest, key_bytes)
                if header is not None:
                    if header.expires < t:
                        os.close(fd)
                        fd = -1
                        self._discard(key, path, st, expired=True)
                        return None
                    payload = _pread_exact(fd, header.length, header.offset)
                    if len(payload) != header.length:
                        problem = "truncated payload"
                    elif zlib.crc32(payload) != header.crc:
                        problem = "checksum mismatch"
            except OSError as exc:
                self._warn_error(exc, f"reading {path}")
                return None
            finally:
                if fd >= 0:
                    os.close(fd)
            if problem is not None:
                self._corrupt(key, path, st, problem)
                return None
            self._record_access(key, t)
            return payload
        return None

    def _owes(self, key: str) -> bool:
        with self._db_lock:
            return key in self._owed_keys or any(key.startswith(p) for p in self._owed_prefixes)

    def read_range(self, key: str, start: int, stop: int) -> bytes | None:
        """Return ``payload[start:stop]`` for ``key`` (Python slice semantics), or None on a miss.

        The whole payload is read so that its checksum can be verified.
        """
        data = self.get(key)
        return None if data is None else data[start:stop]

    def __contains__(self, key: object) -> bool:
        """Whether the index holds a non-expired entry for ``key`` (no file access)."""
        if not isinstance(key, str) or not _sql_safe(key):
            return False
        row = self._read_index(
            "looking up a key",
            lambda conn: conn.execute(
                "SELECT expires FROM entries WHERE key = ?", (key,)
            ).fetchone(),
            None,
        )
        return row is not None and (row[0] is None or row[0] >= time.time())

    def _corrupt(self, key: str, path: str, st: os.stat_result, problem: str) -> None:
        with self._pending_lock:
            self.corruptions += 1
        self._warn_once(
            "corrupt",
            "disk cache %s: damaged payload file %s (%s); removed and treated as a miss "
            "(further damaged files logged at debug level)",
            self._root,
            path,
            problem,
        )
        self._discard(key, path, st, expired=False)

    def _discard(self, key: str, path: str, st: os.stat_result, *, expired: bool) -> None:
        """Remove the entry of ``key`` if ``path`` is still the file that was read."""

        def remove(conn: sqlite3.Connection) -> None:
            with self._txn(conn):
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    return  # already removed or being replaced by another writer
                if not _same_file(current, st):
                    return  # replaced by a newer value meanwhile
                os.unlink(path)
                if _sql_safe(key):
                    cur = conn.execute("DELETE FROM entries WHERE key = ?", (key,))
                    if expired and cur.rowcount:
                        self.expirations += 1

        if self._closed:
            return
        try:
            self._with_index("removing a damaged or expired entry", remove)
        except _IndexUnavailable:
            with contextlib.suppress(OSError):  # the row, if any, is dropped later
                if _same_file(os.stat(path), st):
                    os.unlink(path)
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            self._warn_error(exc, f"removing {path}")

    def _record_access(self, key: str, t: float) -> None:
        with self._pending_lock:
            rec = self._pending.get(key)
            if rec is None:
                self._pending[key] = (t, 1)
            else:
                self._pending[key] = (t if t > rec[0] else rec[0], rec[1] + 1)
            mono = time.monotonic()
            due = mono - self._last_flush >= _FLUSH_INTERVAL_S or (
                len(self._pending) >= _FLUSH_MAX_PENDING and mono >= self._flush_retry_at
            )
        if due:
            self._flush(blocking=False)

    # ------------------------------------------------------------------ access statistics

    def flush(self) -> None:
        """Write pending access statistics (last access, hit counts) to the index."""
        self._flush(blocking=True)

    def _take_pending(self) -> dict[str, tuple[float, int]]:
        with self._pending_lock:
            batch = self._pending
            self._pending = {}
            self._last_flush = time.monotonic()
        return batch

    def _requeue(self, batch: dict[str, tuple[float, int]]) -> None:
        with self._pending_lock:
            if len(self._pending) + len(batch) > _PENDING_HARD_LIMIT:
                return  # the index is unwritable for long: drop these statistics
            for key, (t, n) in batch.items():
                rec = self._pending.get(key)
                self._pending[key] = (t, n) if rec is None else (max(t, rec[0]), n + rec[1])

    @staticmethod
    def _write_accesses(conn: sqlite3.Connection, batch: dict[str, tuple[float, int]]) -> None:
        conn.executemany(
            "UPDATE entries SET last_access = MAX(last_access, ?), hits = hits + ? WHERE key = ?",
            [(t, n, key) for key, (t, n) in batch.items() if _sql_safe(key)],
        )

    def _flush_locked(self, conn: sqlite3.Connection) -> None:
        """Write pending accesses inside the caller's transaction (``_db_lock`` held)."""
        batch = self._take_pending()
        if batch:
            self._write_accesses(conn, batch)

    def _flush(self, *, blocking: bool) -> None:
        if blocking:
            self._db_lock.acquire()
        elif not self._db_lock.acquire(blocking=False):
            return  # another thread is writing; try again on a later hit
        try:
            if self._closed:
                return
            batch = self._take_pending()
            if not batch:
                return
            conn: sqlite3.Connection | None = None
            try:
                conn = self._require_conn()
                if not blocking:
                    conn.execute(f"PRAGMA busy_timeout={_OPPORTUNISTIC_BUSY_MS}")
                with self._txn(conn):
                    self._write_accesses(conn, batch)
            except (sqlite3.Error, TypeError, ValueError) as exc:
                if not isinstance(exc, sqlite3.Error):
                    exc = _SchemaDamaged(repr(exc))
                if (
                    conn is not None
                    and isinstance(exc, sqlite3.DatabaseError)
                    and _is_corruption(exc)
                ):
                    # access statistics of a damaged index are not worth keeping
                    with contextlib.suppress(sqlite3.Error, OSError, RuntimeError):
                        self._recover_locked(exc, "writing access statistics", conn)
                    return
                self._requeue(batch)
                self._flush_retry_at = time.monotonic() + _FLUSH_RETRY_S
                if blocking or not isinstance(exc, sqlite3.OperationalError):
                    self._warn_error(exc, "writing access statistics")
            except _IndexUnavailable:
                pass  # statistics are dropped while the index is unavailable
            except (OSError, RuntimeError) as exc:
                self._warn_error(exc, "writing access statistics")
            finally:
                if not blocking and conn is not None and conn is self._conn:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        finally:
            self._db_lock.release()

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
        if kind not in _LAYOUT:
            raise ValueError(f"kind must be 'chunk' or 'metadata', got {kind!r}")
        if expires is not None and math.isnan(expires):
            raise ValueError("expires must be a time in seconds, not NaN")
        size = memoryview(value).nbytes
        if self._closed or self.capacity <= 0 or size > self.capacity:
            return False
        if self.max_object_size is not None and size > self.max_object_size:
            return False
        if not (_sql_safe(key) and _sql_safe(namespace)):
            return False  # lone surrogates cannot be indexed
        write_ns = time.time_ns()
        key_bytes = key.encode("utf-8")
        digest = hashlib.sha256(key_bytes).digest()
        hexdigest = digest.hex()
        final = self._file_path(hexdigest, kind)
        folder = os.path.dirname(final)
        temp = os.path.join(folder, f".{hexdigest}.{os.getpid()}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
        checksum = zlib.crc32(value)
        expiry = math.inf if expires is None else float(expires)
        header = _pack_header(key_bytes, namespace.encode("utf-8"), size, checksum, expiry, digest)
        stored = False
        try:
            for attempt in (0, 1):
                try:
                    self._write_temp(folder, temp, header, value)
                    stored = self._install(
                        key,
                        hexdigest,
                        kind,
                        namespace,
                        size,
                        checksum,
                        expires,
                        temp,
                        final,
                        fetch_started_ns,
                        write_ns,
                    )
                    break
                except (OSError, sqlite3.OperationalError) as exc:
                    # the filesystem is full (perhaps of other data): the cache gives way
                    if attempt or not _is_disk_full(exc):
                        raise
                    self._warn_once(
                        "disk-full",
                        "disk cache %s: the filesystem is full (%s); evicting entries to make "
                        "room (entries that still do not fit are not stored on disk)",
                        self._root,
                        exc,
                    )
                    if not self._make_room(2 * len(header) + size):
                        raise
                    _unlink_quietly(temp)
        except (OSError, sqlite3.Error) as exc:
            self._warn_error(exc, f"storing {final}")
        finally:
            if not stored:
                _unlink_quietly(temp)
        return stored

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used entries worth about ``2 * nbytes`` (the disk is full),
        then checkpoint and truncate the WAL.

        Files are unlinked before the index is updated, so space is freed even if the index
        cannot be written now (rows without file are allowed and cleaned later). Returns
        whether anything was freed.
        """
        try:
            with self._db_lock:
                conn = self._require_conn()
                rows = conn.execute(
                    "SELECT key, kind, size FROM entries ORDER BY last_access LIMIT 1024"
                ).fetchall()
                victims, got = [], 0
                for row in rows:
                    if got >= 2 * nbytes:
                        break
                    victims.append(row)
                    got += row[2]
                if victims:
                    try:
                        with self._txn(conn):
                            self._remove_rows(conn, victims)
                    except sqlite3.OperationalError:
                        pass  # the files are gone; their rows go at the next eviction or verify
                    self.evictions += len(victims)
                    self.evicted_bytes += got
                wal = self._db_path + "-wal"
                before = os.path.getsize(wal) if os.path.exists(wal) else 0
                with contextlib.suppress(sqlite3.OperationalError):
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                after = os.path.getsize(wal) if os.path.exists(wal) else 0
                return bool(victims) or after < before
        except (OSError, sqlite3.Error, TypeError, ValueError):
            return False

    @staticmethod
    def _write_temp(folder: str, temp: str, header: bytes, value: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(temp, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd = os.open(temp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, header)
            _write_all(fd, value)
        finally:
            os.close(fd)

    def _install(
        self,
        key: str,
        hexdigest: str,
        kind: str,
        namespace: str,
        size: int,
        checksum: int,
        expires: float | None,
        temp: str,
        final: str,
        fetch_started_ns: int | None,
        write_ns: int,
    ) -> bool:
        token = int.from_bytes(os.urandom(8), "little") >> 2
        now = write_ns / 1e9
        with self._db_lock:
            conn = self._require_conn()
            try:
                self._settle_owed_locked(conn)  # never store after an unrecorded invalidation
                return self._install_locked(
                    conn,
                    key,
                    hexdigest,
                    kind,
                    namespace,
                    size,
                    checksum,
                    expires,
                    temp,
                    final,
                    fetch_started_ns,
                    write_ns,
                    token,
                    now,
                )
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise
                # the file of this put may or may not be in place: the rebuilt index says
                self._recover_locked(exc, "storing an entry", conn)
                return False
            except (TypeError, ValueError) as exc:  # rows of impossible types: damage
                self._recover_locked(_SchemaDamaged(repr(exc)), "storing an entry", conn)
                return False

    def _install_locked(
        self,
        conn: sqlite3.Connection,
        key: str,
        hexdigest: str,
        kind: str,
        namespace: str,
        size: int,
        checksum: int,
        expires: float | None,
        temp: str,
        final: str,
        fetch_started_ns: int | None,
        write_ns: int,
        token: int,
        now: float,
    ) -> bool:
        # Transaction 1: staleness check, drop the old files, commit the new row and
        # enforce capacity (so that no committed state exceeds it, even between the two).
        with self._txn(conn):
            if fetch_started_ns is not None:
                if self._is_stale(conn, key, fetch_started_ns):
                    self.stale_rejections += 1
                    return False
            else:
                conn.execute(
                    "INSERT INTO tombstones(key, at) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET at = MAX(at, excluded.at)",
                    (key, write_ns),
                )
            for other in _KINDS:
                _unlink_missing_ok(self._file_path(hexdigest, other))
            conn.execute(_UPSERT, (key, namespace, kind, size, now, now, expires, checksum, token))
            if self._used_locked(conn) > self.capacity:
                target = int(self.capacity * _EVICT_LOW_WATER)
                self._evict_locked(conn, target, time.time(), protect=key)
            self._stores += 1
            if self._stores % _AUTO_PRUNE_EVERY == 0:
                self._prune_locked(conn, _TOMBSTONE_TTL_S)
        # Transaction 2: install the file if the row is still ours.
        replace_error: OSError | None = None
        with self._txn(conn):
            row = conn.execute("SELECT token FROM entries WHERE key = ?", (key,)).fetchone()
            if row is None or row[0] != token:
                return False  # deleted, evicted or overwritten meanwhile
            try:
                os.replace(temp, final)
            except OSError as exc:
                replace_error = exc
                conn.execute("DELETE FROM entries WHERE key = ? AND token = ?", (key, token))
        if replace_error is not None:
            raise replace_error
        return True

    @staticmethod
    def _is_stale(conn: sqlite3.Connection, key: str, fetch_started_ns: int) -> bool:
        horizon = conn.execute("SELECT horizon FROM totals WHERE id = 0").fetchone()[0]
        if fetch_started_ns < horizon:
            return True
        row = conn.execute(
            "SELECT 1 FROM tombstones WHERE key = ? AND at > ?", (key, fetch_started_ns)
        ).fetchone()
        if row is not None:
            return True
        cur = conn.execute("SELECT prefix FROM prefix_tombstones WHERE at > ?", (fetch_started_ns,))
        return any(key.startswith(prefix) for (prefix,) in cur)

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
        with self._pending_lock:
            self._pending.pop(key, None)

        def remove(conn: sqlite3.Connection) -> None:
            self._settle_owed_locked(conn)
            with self._txn(conn):
                self._delete_locked(conn, key)

        try:
            self._with_index("deleting an entry", remove)
        except (OSError, sqlite3.OperationalError) as exc:
            if not _is_resource_error(exc):
                raise
            self._unlink_key_files(key)
            with self._db_lock:
                self._owed_keys[key] = time.time_ns()
            self._warn_error(exc, "recording an invalidation (it will be recorded later)")

    def _delete_locked(self, conn: sqlite3.Connection, key: str) -> None:
        """Unlink the files of ``key``, delete its row, record a tombstone (in a txn)."""
        self._unlink_key_files(key)
        if _sql_safe(key):
            conn.execute("DELETE FROM entries WHERE key = ?", (key,))
            conn.execute(
                "INSERT INTO tombstones(key, at) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET at = MAX(at, excluded.at)",
                (key, time.time_ns()),
            )

    def _unlink_key_files(self, key: str) -> None:
        hexdigest = _digest(key).hex()
        for kind in _KINDS:
            _unlink_missing_ok(self._file_path(hexdigest, kind))

    def delete_prefix(self, prefix: str) -> int:
        """Remove every entry whose key starts with ``prefix``; record a prefix tombstone.

        If the index cannot be written, the removal is done (and recorded) before any later
        write of this tier, and this process serves no entry under ``prefix`` meanwhile.

        Returns
        -------
        int
            Number of entries removed (0 when the removal had to be postponed).
        """
        if not _sql_safe(prefix):
            return 0  # no stored key can contain a lone surrogate

        def remove(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            self._settle_owed_locked(conn)
            with self._txn(conn):
                return self._delete_prefix_locked(conn, prefix)

        try:
            rows = self._with_index("deleting entries", remove)
        except (OSError, sqlite3.OperationalError) as exc:
            if not _is_resource_error(exc):
                raise
            with self._db_lock:
                self._owed_prefixes[prefix] = time.time_ns()
            self._warn_error(exc, "recording an invalidation (it will be recorded later)")
            return 0
        with self._pending_lock:
            for k, _kind in rows:
                self._pending.pop(k, None)
        return len(rows)

    def _delete_prefix_locked(self, conn: sqlite3.Connection, prefix: str) -> list[tuple[str, str]]:
        upper = _prefix_upper(prefix)
        if upper is None:
            cur = conn.execute("SELECT key, kind FROM entries WHERE key >= ?", (prefix,))
        else:
            cur = conn.execute(
                "SELECT key, kind FROM entries WHERE key >= ? AND key < ?", (prefix, upper)
            )
        rows = [(k, kind) for k, kind in cur.fetchall() if k.startswith(prefix)]
        self._remove_rows(conn, ((k, kind, 0) for k, kind in rows))
        conn.execute(
            "INSERT INTO prefix_tombstones(prefix, at) VALUES (?, ?) "
            "ON CONFLICT(prefix) DO UPDATE SET at = MAX(at, excluded.at)",
            (prefix, time.time_ns()),
        )
        return rows

    def _remove_rows(self, conn: sqlite3.Connection, rows: Iterable[tuple[str, str, int]]) -> int:
        """Unlink the files of ``(key, kind, size)`` rows, then delete the rows (in a txn).

        Files go first so that a visible file always has a row. A row whose file cannot be
        unlinked (other than already gone) is kept. Returns the sum of sizes removed.
        """
        done: list[tuple[str]] = []
        freed = 0
        for key, kind, size in rows:
            path = self._file_path(_digest(key).hex(), kind)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # another process (or a crash) removed it already
            except OSError as exc:
                self._warn_error(exc, f"removing {path}")
                continue
            done.append((key,))
            freed += size
        conn.executemany("DELETE FROM entries WHERE key = ?", done)
        return freed

    # ------------------------------------------------------------------ maintenance

    def evict(self, target: int | None = None) -> int:
        """Drop expired entries, then least-recently-used ones until usage <= ``target``.

        Parameters
        ----------
        target : int, optional
            Byte budget to reach; default :attr:`capacity`.

        Returns
        -------
        int
            Payload bytes freed (expired and evicted).
        """
        goal = self.capacity if target is None else max(0, int(target))

        def evict(conn: sqlite3.Connection) -> int:
            with self._txn(conn):
                return self._evict_locked(conn, goal, time.time())

        return self._maintain("evicting", evict)

    def _evict_locked(
        self, conn: sqlite3.Connection, target: int, now: float, protect: str | None = None
    ) -> int:
        """Drop expired rows, then LRU rows (never ``protect``) until usage <= ``target``."""
        self._flush_locked(conn)
        expired = conn.execute(
            "SELECT key, kind, size FROM entries WHERE expires < ?", (now,)
        ).fetchall()
        freed = self._remove_rows(conn, expired) if expired else 0
        self.expirations += len(expired)
        need = self._used_locked(conn) - target
        if need <= 0:
            return freed
        victims: list[tuple[str, str, int]] = []
        got = 0
        cur = conn.execute("SELECT key, kind, size FROM entries ORDER BY last_access")
        try:
            while got < need:
                batch = cur.fetchmany(256)
                if not batch:
                    break
                for row in batch:
                    if row[0] == protect:
                        continue
                    victims.append(row)
                    got += row[2]
                    if got >= need:
                        break
        finally:
            cur.close()
        evicted = self._remove_rows(conn, victims)
        self.evictions += len(victims)
        self.evicted_bytes += evicted
        return freed + evicted

    def drop_expired(self, now: float | None = None) -> int:
        """Remove entries whose ``expires`` is before ``now`` (default ``time.time()``).

        Returns
        -------
        int
            Number of entries removed.
        """
        t = time.time() if now is None else now

        def drop(conn: sqlite3.Connection) -> int:
            with self._txn(conn):
                rows = conn.execute(
                    "SELECT key, kind, size FROM entries WHERE expires < ?", (t,)
                ).fetchall()
                self._remove_rows(conn, rows)
            self.expirations += len(rows)
            return len(rows)

        return self._maintain("dropping expired entries", drop)

    def prune_tombstones(self, older_than_s: float = 3600) -> None:
        """Forget tombstones older than ``older_than_s`` seconds.

        ``put`` calls whose ``fetch_started_ns`` is older than the pruning horizon are refused
        from then on, so pruning never lets a stale value in.
        """

        def prune(conn: sqlite3.Connection) -> None:
            with self._txn(conn):
                self._prune_locked(conn, older_than_s)

        self._maintain("pruning tombstones", prune)

    @staticmethod
    def _prune_locked(conn: sqlite3.Connection, older_than_s: float) -> None:
        cutoff = time.time_ns() - int(older_than_s * 1e9)
        conn.execute("DELETE FROM tombstones WHERE at < ?", (cutoff,))
        conn.execute("DELETE FROM prefix_tombstones WHERE at < ?", (cutoff,))
        conn.execute("UPDATE totals SET horizon = MAX(horizon, ?) WHERE id = 0", (cutoff,))

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
        counts = dict.fromkeys(
            (
                "ok",
                "corrupt",
                "missing_files",
                "orphan_files",
                "mismatched",
                "temp_files",
                "unknown_files",
                "index_damaged",
            ),
            0,
        )
        with self._db_lock:
            conn = self._require_conn()
            error: sqlite3.DatabaseError | None = None
            try:
                damaged = conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise
                damaged, error = True, exc
            except (TypeError, ValueError) as exc:
                damaged, error = True, _SchemaDamaged(repr(exc))
            if damaged:
                counts["index_damaged"] = 1
                if repair:
                    conn = self._recover_locked(
                        error or sqlite3.DatabaseError("integrity_check failed"), "verifying", conn
                    )
            if damaged and not repair:
                self._verify_files(None, counts, repair=False)
            else:
                snapshot = dict(counts)
                try:
                    with self._txn(conn):
                        self._verify_files(conn, counts, repair=repair)
                except (sqlite3.DatabaseError, TypeError, ValueError) as exc:
                    # damage SQLite's integrity check does not see (undecodable text...)
                    if isinstance(exc, sqlite3.DatabaseError) and not _is_corruption(exc):
                        raise
                    counts.clear()
                    counts.update(snapshot, index_damaged=1)
                    if not repair:
                        self._verify_files(None, counts, repair=False)
                    else:
                        damage = exc if isinstance(exc, sqlite3.DatabaseError) else None
                        conn = self._recover_locked(
                            damage or _SchemaDamaged(repr(exc)), "verifying", conn
                        )
                        with self._txn(conn):
                            self._verify_files(conn, counts, repair=True)
        if repair:
            with self._pending_lock:
                self.corruptions += counts["corrupt"]
        return counts

    def _verify_files(
        self, conn: sqlite3.Connection | None, counts: dict[str, int], *, repair: bool
    ) -> None:
        """The file pass of `verify` (in a transaction; ``conn=None``: files only)."""
        rows: dict[tuple[str, str], tuple[str, int, int]] = {}
        if conn is not None:
            for key, kind, size, checksum in conn.execute(
                "SELECT key, kind, size, checksum FROM entries"
            ):
                rows[(_digest(key).hex(), kind)] = (key, size, checksum)
        seen: set[tuple[str, str]] = set()
        bad_keys: list[tuple[str]] = []
        now = time.time()
        for kind in _KINDS:
            sub, ext = _LAYOUT[kind]
            for bucket in _scandir(os.path.join(self._root, sub)):
                for entry in _scandir(bucket.path):
                    name = entry.name
                    if name.endswith(_TEMP_SUFFIX):
                        counts["temp_files"] += 1
                        if repair and _stale_temp(entry, now):
                            _unlink_quietly(entry.path)
                        continue
                    hexdigest = name[: -len(ext)] if name.endswith(ext) else ""
                    if len(hexdigest) != 64 or not _is_hex(hexdigest):
                        counts["unknown_files"] += 1
                        continue
                    problem, header = _check_file(entry.path, hexdigest)
                    row = None
                    if entry.path == self._file_path(hexdigest, kind):
                        row = rows.get((hexdigest, kind))
                    # else: misplaced, never read by get(): an orphan
                    if row is not None:
                        seen.add((hexdigest, kind))
                    if problem is not None or header is None:
                        status = "corrupt"
                    elif conn is None:
                        counts["ok"] += 1
                        continue
                    elif row is None:
                        status = "orphan_files"
                    elif (row[1], row[2]) != (header.length, header.crc):
                        status = "mismatched"
                    else:
                        counts["ok"] += 1
                        continue
                    counts[status] += 1
                    if repair:
                        _unlink_quietly(entry.path)
                        if row is not None:
                            bad_keys.append((row[0],))
        if conn is None:
            return
        for pair, row in rows.items():
            if pair not in seen:
                counts["missing_files"] += 1
                if repair:
                    bad_keys.append((row[0],))
        if repair:
            conn.executemany("DELETE FROM entries WHERE key = ?", bad_keys)
            self._recount_locked(conn)
            conn.execute(
                "UPDATE totals SET horizon = ? WHERE id = 0 AND horizon > ?",
                (time.time_ns(), time.time_ns() + _HORIZON_SLACK_NS),
            )

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
        with self._db_lock:
            current = self._require_conn()
            with self._folder_lock():
                self._conn = None
                with contextlib.suppress(sqlite3.Error):
                    current.close()
                self._remove_index_files()
                self.last_rebuild = {}
                self._conn = self._open_index_locked()
            return dict(self.last_rebuild)

    def _rebuild_rows(self, conn: sqlite3.Connection) -> None:
        """Fill the (new, empty) index ``conn`` from the payload files (folder lock held)."""
        counts = dict.fromkeys(
            (
                "indexed",
                "corrupt",
                "expired",
                "duplicates",
                "old_format",
                "temp_files",
                "unknown_files",
            ),
            0,
        )
        now = time.time()
        found: dict[str, tuple[float, str, str, _Header]] = {}
        for kind in _KINDS:
            sub, ext = _LAYOUT[kind]
            for bucket in _scandir(os.path.join(self._root, sub)):
                for entry in _scandir(bucket.path):
                    name = entry.name
                    if name.endswith(_TEMP_SUFFIX):
                        counts["temp_files"] += 1
                        if _stale_temp(entry, now):
                            _unlink_quietly(entry.path)
                        continue
                    hexdigest = name[: -len(ext)] if name.endswith(ext) else ""
                    if len(hexdigest) != 64 or not _is_hex(hexdigest):
                        counts["unknown_files"] += 1
                        continue
                    problem, header = _check_file(entry.path, hexdigest, payload=False)
                    key = None
                    if header is not None and entry.path == self._file_path(hexdigest, kind):
                        with contextlib.suppress(UnicodeDecodeError):
                            key = header.key.decode("utf-8")
                    if problem is not None or header is None or key is None:
                        if problem is not None and problem.startswith("unsupported format"):
                            counts["old_format"] += 1
                        else:
                            counts["corrupt"] += 1
                        _unlink_quietly(entry.path)
                        continue
                    if header.expires < now:
                        counts["expired"] += 1
                        _unlink_quietly(entry.path)
                        continue
                    try:
                        mtime = entry.stat().st_mtime
                    except OSError:
                        continue
                    previous = found.get(key)
                    if previous is not None:  # one key in both folders: keep the newer file
                        counts["duplicates"] += 1
                        if previous[0] > mtime:
                            _unlink_quietly(entry.path)
                            continue
                        _unlink_quietly(previous[2])
                    found[key] = (mtime, kind, entry.path, header)
        rows = [
            (
                key,
                header.namespace.decode("utf-8", "replace"),
                kind,
                header.length,
                mtime,
                mtime,
                None if math.isinf(header.expires) else header.expires,
                header.crc,
                0,
            )
            for key, (mtime, kind, _path, header) in found.items()
        ]
        with self._txn(conn):
            conn.execute("DELETE FROM entries")
            conn.executemany(_UPSERT, rows)
            self._recount_locked(conn)
            # the tombstones are lost: refuse every fill whose fetch started before now
            conn.execute(
                "UPDATE totals SET horizon = MAX(horizon, ?) WHERE id = 0", (time.time_ns(),)
            )
            if self._used_locked(conn) > self.capacity:
                self._evict_locked(conn, int(self.capacity * _EVICT_LOW_WATER), now)
        counts["indexed"] = len(rows)
        self.index_rebuilds += 1
        self.corruptions += counts["corrupt"]
        self.last_rebuild = counts
        logger.info("disk cache %s: index rebuilt from payload files: %s", self._root, counts)

    # ------------------------------------------------------------------ introspection

    def _used_locked(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT used FROM totals WHERE id = 0").fetchone()
        if row is None or not isinstance(row[0], int):
            raise _SchemaDamaged("the totals row is damaged")
        return row[0]

    def used_bytes(self) -> int:
        """Total payload bytes in the index (all processes), i.e. ``SUM(size)``."""
        return self._read_index("reading the totals", self._used_locked, 0)

    def __len__(self) -> int:
        """Number of entries in the index (expired ones included until dropped)."""
        row = self._read_index(
            "reading the totals",
            lambda conn: conn.execute("SELECT count FROM totals WHERE id = 0").fetchone(),
            (0,),
        )
        return int(row[0])

    def keys(self) -> list[str]:
        """All keys in the index, sorted."""
        return self._read_index(
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
        query = f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM entries ORDER BY key"
        return self._read_index(
            "listing entries",
            lambda conn: [
                dict(zip(_ENTRY_COLUMNS, row, strict=True))
                for row in conn.execute(query).fetchall()
            ],
            [],
        )

    def close(self) -> None:
        """Flush pending access statistics and close the index. Idempotent."""
        if self._closed:
            return
        self._flush(blocking=True)
        with self._db_lock:
            if self._owed_keys or self._owed_prefixes:
                with contextlib.suppress(OSError, sqlite3.Error, RuntimeError):
                    self._settle_owed_locked(self._require_conn())
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                with self._folder_lock():
                    self._close_conn(conn)

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"capacity={self.capacity}"
        return f"DiskTier({self._root!r}, {state})"


_HEX_DIGITS: Final = frozenset("0123456789abcdef")


def _set_wal(conn: sqlite3.Connection, timeout: float = 30.0) -> str:
    """Switch to WAL, retrying while another connection holds the database lock.

    Changing the journal mode needs an exclusive lock, and SQLite reports ``database
    is locked`` at once (the busy handler is not consulted) when another process or
    thread is setting up the same fresh index: Dask workers starting together do.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _is_hex(text: str) -> bool:
    return all(c in _HEX_DIGITS for c in text)


def _check_file(
    path: str, hexdigest: str, *, payload: bool = True
) -> tuple[str | None, _Header | None]:
    """Verify a payload file: header always, payload checksum if ``payload``.

    Returns ``(problem, header)``; ``header`` is None when the header itself is unusable.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"unreadable: {exc.strerror}", None
    try:
        problem, header = _read_header(fd, os.fstat(fd).st_size, bytes.fromhex(hexdigest))
        if header is not None and payload:
            data = _pread_exact(fd, header.length, header.offset)
            if len(data) != header.length:
                problem = "truncated payload"
            elif zlib.crc32(data) != header.crc:
                problem = "checksum mismatch"
    except OSError as exc:
        return f"unreadable: {exc.strerror}", None
    finally:
        os.close(fd)
    return problem, header


def _split_sql(script: str) -> list[str]:
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
