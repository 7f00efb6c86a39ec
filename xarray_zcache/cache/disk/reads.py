"""The read path of a disk tier: ``get``, ``get_entry``, ``might_contain`` and ``in``.

A hit is one ``pread``: of the record, from an open descriptor of its segment
(:mod:`.segments`), or of the entry's own payload file. Where it is comes from the location
map held in memory (:mod:`.keydir`); when the map cannot say (not built yet, a location that
did not hold the key's record), from a primary-key lookup of the entry's row (on the index's
read connection, so that it never waits for this process's writes:
:meth:`.index.Index.query`). A damaged or expired entry found by a read is removed here. The
tier's state is :mod:`.core`'s; the access statistics a hit records are written off the hit
path (:mod:`.access`, :mod:`.flusher`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sqlite3
import time
from typing import Final

from xarray_zcache.cache.disk import rows
from xarray_zcache.cache.disk.core import TierCore
from xarray_zcache.cache.disk.entry import DiskEntry
from xarray_zcache.cache.disk.folder import FolderGone, same_file
from xarray_zcache.cache.disk.format import (
    KINDS,
    WHOLE_READ,
    check_payload,
    payload_path,
    pread_exact,
    read_header,
    read_payload,
)
from xarray_zcache.cache.disk.locations import ABSENT, Location, hash_of, key_hash, mapped
from xarray_zcache.cache.disk.schema import (
    BUSY_TIMEOUT_MS,
    IndexUnavailable,
    is_resource_error,
    txn,
)
from xarray_zcache.cache.disk.segments import DELETED, read_record, record_length

__all__ = ["TierReads"]

#: The row of a hit: kind, segment, offset, size, namespace, token.
_LOOKUP: Final = "SELECT kind, segment, offset, size, namespace, token FROM entries WHERE key = ?"
Found = tuple[str, str | None, int | None, int, str, int]
#: ``_lookup`` could not read the index (unavailable): only payload files can be served.
_NO_INDEX: Final = "no index"
#: ``_get_located``: the location map's location did not hold the key's record.
_MISPLACED: Final = "misplaced"


def _located(key: bytes, found: Found | str | None) -> Location | str:
    """What a lookup's row says of where the entry is, for the location map."""
    if not isinstance(found, tuple):
        return ABSENT
    kind, segment, offset, size, namespace, _token = found
    if segment is None:
        return Location(kind, None, 0, 0)
    return Location(kind, segment, offset or 0, record_length(key, namespace.encode(), size))


class TierReads(TierCore):
    """The read path of a :class:`~.tier.DiskTier` (see there)."""

    def might_contain(self, key: str) -> bool:
        """Cheap pre-check for `get`: whether the index has a row for ``key``.

        One primary-key lookup (a ``stat`` per kind of payload file while the index is
        unavailable). ``True`` does not promise a hit (the entry may be expired or damaged;
        `get` decides). Never raises (it runs in the caller's thread, unguarded): on any
        error, True, so that the read goes on to `get`, which handles errors.
        """
        if self._closed:
            return False
        try:
            return self._might_contain(key)
        except Exception:
            return True

    def _might_contain(self, key: str) -> bool:
        if self._keydir is not None and mapped(key):
            located = self._keydir.find(hash_of(key))
            if located is ABSENT or isinstance(located, Location):
                return located is not ABSENT
        found = self._lookup(key) if self._lookup_first else _NO_INDEX
        if found == _NO_INDEX:
            hexdigest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
            return any(os.path.exists(payload_path(self._root, hexdigest, k)) for k in KINDS)
        return found is not None

    def _lookup(self, key: str) -> Found | str | None:
        """The row of ``key`` (:data:`_LOOKUP`), None if none, :data:`_NO_INDEX` if the index
        cannot be read now."""
        if not rows.sql_safe(key):
            return None  # no stored key holds a lone surrogate
        self.index_lookups += 1
        try:
            # on the read connection: a hit does not queue behind a flush, fill or eviction
            found: Found | None = self._index.query(
                "looking up a key", lambda conn: conn.execute(_LOOKUP, (key,)).fetchone()
            )
        except RuntimeError:
            return None  # closed meanwhile
        except FolderGone:
            return None  # the folder vanished: nothing in it is served (its owner decides)
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_resource_error(exc):
                raise
            return _NO_INDEX
        return found

    def get(self, key: str, *, now: float | None = None) -> bytes | None:
        """Return the payload stored for ``key``, or None (see :meth:`get_entry`)."""
        entry = self.get_entry(key, now=now)
        return None if entry is None else entry.value

    def get_entry(self, key: str, *, now: float | None = None) -> DiskEntry | None:
        """Return the entry stored for ``key`` (value, kind, expiry, namespace), or None.

        Its row is looked up (one primary-key ``SELECT``), then one ``pread`` reads its record
        from a cached descriptor of its segment, or its payload file is read. The header
        carries the key, length, CRC-32s and expiry, so the bytes returned are exactly what was
        stored for this key. A tier that writes no segments, on a folder without any, reads
        payload files alone, without SQL (a visible payload file always has a committed row).
        Where the entry is comes from the location map (:mod:`.keydir`) when it can say, else
        from the row. While the index is unavailable, payload files are still served, and
        records only through a map that can still read the index's change log.

        Parameters
        ----------
        key : str
            Cache key.
        now : float, optional
            Current time (seconds since the epoch) for the expiry check and the recorded
            access; default ``time.time()``.

        Returns
        -------
        DiskEntry or None
            None on a miss, an expired entry (which is then deleted) or a damaged file
            (which is deleted and counted in :attr:`corruptions`). Never raises for them.
        """
        if self._closed:
            return None
        if (self._owed_keys or self._owed_prefixes) and self._owes(key):
            return None  # invalidated while the index was unwritable: not trusted until recorded
        t = time.time() if now is None else now
        if not self._lookup_first:
            return self._get_file(key, KINDS, t)  # no segments here: files alone, no SQL
        if self._keydir is not None and mapped(key):
            key_bytes = key.encode("utf-8", "surrogatepass")
            key_digest = hashlib.sha256(key_bytes).digest()
            located = self._keydir.find(key_hash(key_digest))
            if located is ABSENT:
                return None
            if isinstance(located, Location):
                entry = self._get_located(key, key_bytes, key_digest, located, t)
                if not isinstance(entry, str):
                    return entry
                self._keydir.forget(key_hash(key_digest))
            mark = self._keydir.mark()
            found = self._lookup(key)
            if found != _NO_INDEX and rows.sql_safe(key):
                self._keydir.learn(key_hash(key_digest), mark, _located(key_bytes, found))
        else:
            found = self._lookup(key)
        if found == _NO_INDEX:
            return self._get_file(key, KINDS, t)  # self-checking files serve without the index
        for attempt in (0, 1):
            if not isinstance(found, tuple):
                return None
            kind, segment, offset, _size, _ns, token = found
            if segment is None:
                return self._get_file(key, (kind,), t)
            try:
                return self._get_record(key, found, t)
            except FileNotFoundError:
                # compacted away since the lookup: the row has moved (or is gone)
                again = self._lookup(key) if attempt == 0 else None
                if again == found or attempt:
                    self._drop_row(key, segment, offset, token, expired=False)
                    return None
                found = again
        return None

    def _get_located(
        self, key: str, key_bytes: bytes, key_digest: bytes, at: Location, t: float
    ) -> DiskEntry | str | None:
        """Read the entry where the location map says it is; :data:`_MISPLACED` if the
        record there is not the key's (the index then decides: a collision, or the record
        moved or died after the map's answer; never damage on the map's word)."""
        if at.segment is None:
            # the file proves itself; none (another key's location: a hash collision, or a
            # race) is for the index to judge
            entry = self._get_file(key, (at.kind,), t)
            return _MISPLACED if entry is None else entry
        try:
            fd = self._fds.acquire(at.segment)
        except FileNotFoundError:
            return _MISPLACED  # compacted away since the answer
        try:
            problem, header, payload = read_record(fd, at.offset, at.length, key_digest, key_bytes)
        except OSError as exc:
            self._warn.error(exc, f"reading segment {at.segment}")
            return None
        finally:
            self._fds.release(fd)
        if problem is not None or header is None:
            return _MISPLACED
        if header.expires < t:
            self._drop_row(key, at.segment, at.offset, None, expired=True)
            return None
        if self._access.record(key, t):
            self._flusher.poke()  # the index write happens off the hit path
        expires = None if math.isinf(header.expires) else header.expires
        return DiskEntry(payload, at.kind, expires, header.namespace.decode("utf-8", "replace"))

    def _get_record(self, key: str, found: Found, t: float) -> DiskEntry | None:
        """Read the record of row ``found``; FileNotFoundError if its segment is gone."""
        kind, segment, offset, size, namespace, token = found
        assert segment is not None and offset is not None
        key_bytes = key.encode("utf-8")
        length = record_length(key_bytes, namespace.encode("utf-8"), size)
        fd = self._fds.acquire(segment)
        try:
            problem, header, payload = read_record(
                fd, offset, length, hashlib.sha256(key_bytes).digest(), key_bytes
            )
        except OSError as exc:
            self._warn.error(exc, f"reading segment {segment}")
            return None
        finally:
            self._fds.release(fd)
        if header is not None and header.expires < t:
            self._drop_row(key, segment, offset, token, expired=True)
            return None
        if problem == DELETED:  # deleted or replaced meanwhile (or an index gone back in time)
            self._drop_row(key, segment, offset, token, expired=False)
            return None
        if problem is not None or header is None:
            self._count_damage()
            self._warn.once(
                "corrupt",
                "disk cache %s: damaged record of %r in segment %s (%s); dropped and treated "
                "as a miss (further damaged entries logged at debug level)",
                self._root,
                key,
                segment,
                problem,
            )
            self._drop_row(key, segment, offset, token, expired=False)
            return None
        if self._access.record(key, t):
            self._flusher.poke()  # the index write happens off the hit path
        expires = None if math.isinf(header.expires) else header.expires
        return DiskEntry(payload, kind, expires, header.namespace.decode("utf-8", "replace"))

    def _drop_row(
        self, key: str, segment: str, offset: int | None, token: int | None, *, expired: bool
    ) -> None:
        """Delete the row of ``key`` if it still points to the record that was read (a new
        record always has a new offset: ``token`` None is not checked).

        Only if no writer holds the index now: a read never waits for a write (a batch of
        fills of this process or of another holds it for tens of milliseconds at a million
        entries, and the typical dead record is one a writer is replacing at that moment,
        whose row then changes anyway). Left in place, the row is met again by a later read,
        which tries again, or replaced by the fill that follows this miss."""

        def drop(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA busy_timeout=0")
            try:
                with txn(conn):
                    cur = conn.execute(
                        "DELETE FROM entries WHERE key = ? AND (? IS NULL OR token = ?) "
                        "AND segment = ? AND offset = ?",
                        (key, token, token, segment, offset),
                    )
                    if expired and cur.rowcount:
                        self.expirations += 1
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

        if self._closed or not self._index.lock.acquire(blocking=False):
            return  # (this process is writing)
        try:
            self._index.run_locked("removing a damaged or expired entry", drop)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                self._warn.error(exc, "removing a damaged or expired entry")
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            self._warn.error(exc, "removing a damaged or expired entry")
        finally:
            self._index.lock.release()

    def _get_file(self, key: str, kinds: tuple[str, ...], t: float) -> DiskEntry | None:
        """Read the payload file of ``key`` (of one of ``kinds``) alone."""
        key_bytes = key.encode("utf-8", "surrogatepass")
        key_digest = hashlib.sha256(key_bytes).digest()
        hexdigest = key_digest.hex()
        for kind in kinds:
            path = payload_path(self._root, hexdigest, kind)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._warn.error(exc, f"opening {path}")
                return None
            payload = b""
            try:
                st = os.fstat(fd)
                # a small file is read whole: one system call, one device read
                whole = pread_exact(fd, st.st_size, 0) if 0 < st.st_size <= WHOLE_READ else None
                problem, header = read_header(fd, st.st_size, key_digest, key_bytes, head=whole)
                if header is not None and header.expires >= t:
                    if whole is None:
                        problem, payload = read_payload(fd, header)
                    else:
                        problem, payload = check_payload(whole[header.offset :], header)
            except OSError as exc:
                self._warn.error(exc, f"reading {path}")
                return None
            finally:
                os.close(fd)
            if header is not None and header.expires < t:
                self._discard(key, path, st, expired=True)
                return None
            if problem is not None or header is None:
                self._corrupt(key, path, st, problem or "unreadable header")
                return None
            if self._access.record(key, t):
                self._flusher.poke()  # the index write happens off the hit path
            expires = None if math.isinf(header.expires) else header.expires
            return DiskEntry(payload, kind, expires, header.namespace.decode("utf-8", "replace"))
        return None

    def read_range(self, key: str, start: int, stop: int) -> bytes | None:
        """Return ``payload[start:stop]`` for ``key``, or None on a miss (whole payload read
        so that its checksum can be verified)."""
        data = self.get(key)
        return None if data is None else data[start:stop]

    def __contains__(self, key: object) -> bool:
        """Whether the index holds a non-expired entry for ``key`` (no file access)."""
        if not isinstance(key, str) or not rows.sql_safe(key):
            return False
        row = self._index.read(
            "looking up a key",
            lambda conn: conn.execute(
                "SELECT expires FROM entries WHERE key = ?", (key,)
            ).fetchone(),
            None,
        )
        return row is not None and (row[0] is None or row[0] >= time.time())

    def _corrupt(self, key: str, path: str, st: os.stat_result, problem: str) -> None:
        self._count_damage()
        self._warn.once(
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
            with txn(conn):
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    return  # already removed or being replaced by another writer
                if not same_file(current, st):
                    return  # replaced by a newer value meanwhile
                os.unlink(path)
                if rows.sql_safe(key):
                    cur = conn.execute(
                        "DELETE FROM entries WHERE key = ? AND segment IS NULL", (key,)
                    )
                    if expired and cur.rowcount:
                        self.expirations += 1

        if self._closed:
            return
        try:
            self._index.run("removing a damaged or expired entry", remove)
        except IndexUnavailable:
            with contextlib.suppress(OSError):  # the row, if any, is dropped later
                if same_file(os.stat(path), st):
                    os.unlink(path)
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            self._warn.error(exc, f"removing {path}")
