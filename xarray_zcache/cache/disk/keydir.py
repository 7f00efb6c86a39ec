"""The location map: where every entry's bytes are, held in memory (a Bitcask key directory).

A hit through the index is a B-tree descent, then the read of the record: after a restart,
with the page cache cold, the descent alone costs a device read or more per level. With the
whole map in memory, a hit is one read: the record's.

**What it holds.** For each entry of the index: the first 8 bytes of its key's SHA-256 (the
digest a record's header proves), its kind, and where its record is (segment, offset,
length; or "a payload file of its own"). Sorted NumPy arrays, 25 bytes an entry, plus a dict
of the changes since they were built (merged into the arrays as it grows). An entry the map
cannot place is *ask*: the read goes to the index as before. A key it does not hold is
*absent*: a miss without touching the index.

**Why it is never stale.** Every change to ``entries``, by any writer (this process, another,
or an older version the schema admits) is appended to the index's change log by triggers
(:mod:`.schema`, ``changes``). Before every answer the map asks SQLite whether any
connection committed since it last looked (``PRAGMA data_version``: no I/O), and if so applies
the changes logged since, in one read transaction; the index file's identity is checked too
(replaced or rebuilt: the map is dropped and built again). The answer is therefore the index
as of that check, as a lookup at that moment would have found it; the record read after it
is checked against the key (digest, length, checksums) exactly as a record found through the
index. A location that fails that check (a hash collision, a record compacted away or killed
since the check) is not damage: the read asks the index, which judges. Two keys on one
64-bit hash (about one chance in 4·10^7 for a million keys) cannot give each other's bytes;
a delete of one may make the other a miss until it is written again (a fetch, counted).

**Where it comes from.** At open, from the hint file the last process wrote at its close
(:mod:`.hint`) when it belongs to this index (the log's ``epoch``) and the log still holds
every change since (``changes_state.pruned``); otherwise from the rows, in a background
thread, reads asking the index meanwhile.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Final

import numpy as np

from xarray_zcache.cache.disk import hint
from xarray_zcache.cache.disk.folder import file_id
from xarray_zcache.cache.disk.format import KINDS
from xarray_zcache.cache.disk.locations import (
    ABSENT,
    ASK,
    PREFIX_CHANGE,
    Location,
    hash_of,
    mapped,
)
from xarray_zcache.cache.disk.schema import BUSY_TIMEOUT_MS

logger = logging.getLogger("xarray_zcache.disk")

#: Kind code of an entry the map cannot place (:data:`ASK`).
_ASK_CODE: Final = 255
#: Segment code of an entry that is a payload file of its own.
_FILE: Final = -1
#: Changes held in the dict before they are merged into the arrays (at least).
_MERGE_AT: Final = 65_536
#: ``save`` writes the hint when at least this many changes came since the last one.
_SAVE_EVERY: Final = 10_000
#: After a failed build, the next attempt waits this long (seconds).
_RETRY_S: Final = 5.0
#: An index of at most this many entries without a usable hint is mapped at once, in
#: ``open`` (about 0.1 s); a larger one in the background.
_BUILD_AT_ONCE: Final = 50_000
#: Rows read at a time while building from the index.
_SCAN_BATCH: Final = 20_000
_PAGE_CACHE_KIB: Final = 256

_SCAN: Final = (
    "SELECT key, kind, segment, offset, 72 + length(CAST(key AS BLOB)) + (CASE WHEN "
    "length(CAST(namespace AS BLOB)) <= 65535 THEN length(CAST(namespace AS BLOB)) ELSE 0 END)"
    " + size FROM entries"
)


class KeyDir:
    """The location map of one tier (module doc). Thread-safe: one lock, never held
    around I/O other than SQLite's reads of the change log (no device reads: its pages are
    the latest written)."""

    def __init__(self, root: str, db_path: str, on_damage: Callable[[BaseException], None]) -> None:
        self._root = root
        #: told when building finds the index damaged (rows out of key order)
        self._on_damage = on_damage
        self._db_path = db_path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._db_id: tuple[int, int] | None = None
        self._epoch = ""
        self._seq = 0
        self._version: int | None = None
        self._arrays = hint.Arrays.empty()
        self._segments: list[str] = []
        self._segment_ids: dict[str, int] = {}
        #: changes since the arrays: hash -> Location, ABSENT or ASK
        self._changes: dict[int, Location | str] = {}
        self._ready = False
        self._closed = False
        self._building: threading.Thread | None = None
        #: changes whenever changes are applied, or the map is dropped or installed
        self._generation = 0
        self._pid = os.getpid()
        self._damage: BaseException | None = None
        self._retry_at = 0.0
        self._saved: tuple[str, int] | None = None
        #: answers given (a location or absent), and reads sent to the index (ask)
        self.answered = 0
        self.asked = 0
        self.builds = 0

    # ------------------------------------------------------------------ answers

    def find(self, h: int) -> Location | str:
        """Where the entry of key hash ``h`` is (:class:`Location`), :data:`ABSENT`, or
        :data:`ASK` (the map cannot say: not built yet, or the index cannot be read)."""
        if os.getpid() != self._pid:
            # a fork()ed child: the connection is the parent's, and the lock may have been
            # copied held (another thread was in here at the fork): neither is touched
            return ASK
        with self._lock:
            found = self._find_locked(h)
            if found is ASK:
                self.asked += 1
            else:
                self.answered += 1
            return found

    def _find_locked(self, h: int) -> Location | str:
        if os.getpid() != self._pid:
            return ASK  # a fork()ed child: the connection is the parent's
        if not self._ready:
            self._start_build_locked()
            return ASK
        if not self._sync_locked():
            self._start_build_locked()  # dropped: built again from the rows
            return ASK
        change = self._changes.get(h)
        if change is not None:
            return change
        a = self._arrays
        i = int(a.hashes.searchsorted(np.uint64(h)))  # (a Python int would cast the array)
        if i == len(a.hashes) or int(a.hashes[i]) != h:
            return ABSENT
        code = int(a.kinds[i])
        if code == _ASK_CODE:
            return ASK
        segment = int(a.segments[i])
        return Location(
            KINDS[code],
            None if segment == _FILE else self._segments[segment],
            int(a.offsets[i]),
            int(a.lengths[i]),
        )

    def mark(self) -> int:
        """A mark to give :meth:`learn`, taken before asking the index."""
        return self._generation

    def learn(self, h: int, mark: int, found: Location | str) -> None:
        """What the index said of ``h`` (a location, or :data:`ABSENT`), asked after
        :meth:`mark` gave ``mark``: kept unless the map changed since (a change applied
        meanwhile may be newer than the index's answer; one applied later overrides it).

        "No row" is never learnt: the map said *ask* for ``h``, so it holds ``h`` for some
        key; if that key is another one (8-byte hashes collide), "absent" would hide it, and
        if it is this key, deleted since, the logged deletion says so anyway."""
        if found is ABSENT or os.getpid() != self._pid:
            return
        with self._lock:
            if self._ready and self._generation == mark:
                self._changes[h] = found

    def forget(self, h: int) -> None:
        """The location given for ``h`` did not hold the key's record: ask the index for it
        from now on (until a change of the key is logged)."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._ready:
                self._changes[h] = ASK

    # ------------------------------------------------------------------ keeping up

    def sync(self) -> None:
        """Apply the changes logged since the last look (before pruning the log)."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._ready:
                self._sync_locked()

    def _sync_locked(self) -> bool:
        """Bring the map up to the index's last commit; False (map dropped) if it cannot."""
        conn = self._conn
        if os.getpid() != self._pid:
            return False
        try:
            if conn is None or file_id(self._db_path) != self._db_id:
                raise _Drop("the index was replaced")
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:
                self._apply_locked(conn)
                self._version = version
        except (_Drop, sqlite3.Error, OSError, TypeError, ValueError) as exc:
            self._drop_locked(exc)
            return False
        return True

    def _apply_locked(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN")
        try:
            epoch, pruned = _state(conn)
            if epoch != self._epoch or pruned > self._seq or _top(conn) < self._seq:
                raise _Drop("the change log went on without this process, or went back")
            logged = conn.execute(
                "SELECT seq, key, kind, segment, offset, length FROM changes WHERE seq > ? "
                "ORDER BY seq",
                (self._seq,),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        for seq, key, kind, segment, offset, length in logged:
            if kind == PREFIX_CHANGE:
                raise _Drop(f"every key under {key!r} was invalidated")
            if mapped(key):
                self._changes[hash_of(key)] = _location(kind, segment, offset, length)
            self._seq = seq
        if logged:
            self._generation += 1
        if len(self._changes) > max(_MERGE_AT, len(self._arrays.hashes) >> 3):
            self._merge_locked()

    def _merge_locked(self) -> None:
        """Fold the changes into the arrays."""
        if not self._changes:
            return
        changed = np.fromiter(self._changes.keys(), dtype=np.uint64, count=len(self._changes))
        added = [(h, loc) for h, loc in self._changes.items() if loc is not ABSENT]
        new = hint.Arrays.build(
            [h for h, _ in added],
            [_kind_code(loc) for _, loc in added],
            [self._segment_code(loc) for _, loc in added],
            [loc.offset if isinstance(loc, Location) else 0 for _, loc in added],
            [loc.length if isinstance(loc, Location) else 0 for _, loc in added],
        )
        self._arrays = self._arrays.without(changed).merged(new)
        self._changes.clear()

    def _segment_code(self, loc: Location | str) -> int:
        if not isinstance(loc, Location) or loc.segment is None:
            return _FILE
        code = self._segment_ids.get(loc.segment)
        if code is None:
            code = self._segment_ids[loc.segment] = len(self._segments)
            self._segments.append(loc.segment)
        return code

    def _drop_locked(self, why: object) -> None:
        if self._ready:
            logger.debug("disk cache %s: location map dropped (%s)", self._root, why)
        self._ready = False
        self._generation += 1
        self._arrays = hint.Arrays.empty()
        self._segments, self._segment_ids = [], {}
        self._changes.clear()
        self._version = None
        self._close_conn_locked()

    def _close_conn_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and os.getpid() == self._pid:  # (not the parent's, in a child)
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # ------------------------------------------------------------------ building

    def open(self) -> None:
        """Load the hint file if it belongs to the index and is not too old; otherwise build
        the map from the rows in the background."""
        with self._lock:
            if self._closed or self._ready:
                return
            try:
                self._load_hint_locked()
            except (sqlite3.Error, OSError, _Drop, TypeError, ValueError) as exc:
                logger.debug("disk cache %s: location hint not used (%s)", self._root, exc)
                self._drop_locked(exc)
            if not self._ready and not self._build_small_locked() and self._damage is None:
                self._start_build_locked()
        damage, self._damage = self._damage, None
        if damage is not None:
            self._on_damage(damage)

    def _build_small_locked(self) -> bool:
        """Build the map of a small index at once (whether it did): then a new or small
        cache answers from its map from the first read on."""
        try:
            conn, db_id = _connect(self._db_path)
        except (sqlite3.Error, OSError):
            return False
        try:
            row = conn.execute("SELECT count FROM totals WHERE id = 0").fetchone()
            if row is None or not isinstance(row[0], int) or row[0] > _BUILD_AT_ONCE:
                conn.close()
                return False
            built = self._scan(conn)
        except _Damaged as exc:
            conn.close()
            self._damage = exc  # told once the lock is released (the index's lock comes first)
            return False
        except (sqlite3.Error, OSError, _Drop, TypeError, ValueError):
            conn.close()
            return False
        if built is None or file_id(self._db_path) != db_id:
            conn.close()
            return False
        self._install_locked(conn, db_id, built)
        self.builds += 1
        return True

    def _load_hint_locked(self) -> None:
        loaded = hint.read(self._root)
        if loaded is None:
            return
        conn, db_id = _connect(self._db_path)
        try:
            conn.execute("BEGIN")
            try:
                epoch, pruned = _state(conn)
                last = _change(conn, loaded.seq)
            finally:
                conn.execute("COMMIT")
            if epoch != loaded.epoch or pruned > loaded.seq:
                raise _Drop("the hint is of another index, or older than the change log")
            if last != loaded.last:
                # the index went back in time (lost WAL frames) and maybe on: another history
                raise _Drop("the hint's last change is not the index's")
        except BaseException:
            conn.close()
            raise
        self._install_locked(conn, db_id, loaded)
        self._saved = (loaded.epoch, loaded.seq)

    def _install_locked(
        self, conn: sqlite3.Connection, db_id: tuple[int, int] | None, built: hint.Hint
    ) -> None:
        self._close_conn_locked()
        self._conn, self._db_id = conn, db_id
        self._epoch, self._seq = built.epoch, built.seq
        self._arrays = built.arrays
        self._segments = list(built.segments)
        self._segment_ids = {name: i for i, name in enumerate(self._segments)}
        self._changes.clear()
        self._version = None  # the first answer applies what was logged since
        self._ready = True
        self._generation += 1

    def _start_build_locked(self) -> None:
        if self._closed or self._building is not None or time.monotonic() < self._retry_at:
            return
        self._building = threading.Thread(
            target=self._build, name="zcache-location-map", daemon=True
        )
        self._building.start()

    def _build(self) -> None:
        try:
            conn, db_id = _connect(self._db_path)
        except (sqlite3.Error, OSError) as exc:
            self._build_failed(exc)
            return
        try:
            built = self._scan(conn)
        except _Damaged as exc:
            conn.close()
            self._build_failed(exc)
            self._on_damage(exc)
            return
        except (sqlite3.Error, OSError, _Drop, TypeError, ValueError) as exc:
            conn.close()
            self._build_failed(exc)
            return
        with self._lock:
            self._building = None
            if built is None or self._closed or file_id(self._db_path) != db_id:
                conn.close()
                return
            self._install_locked(conn, db_id, built)
            self.builds += 1

    def _build_failed(self, exc: BaseException) -> None:
        logger.debug("disk cache %s: location map not built (%s)", self._root, exc)
        with self._lock:
            self._building = None
            self._retry_at = time.monotonic() + _RETRY_S

    def _scan(self, conn: sqlite3.Connection) -> hint.Hint | None:
        """The map of the rows, with the change it reflects (one read transaction)."""
        # typed buffers: ~29 bytes a row while building (lists of ints held ~200)
        hashes = array.array("Q")
        kinds = array.array("B")
        segments = array.array("i")
        offsets = array.array("q")
        lengths = array.array("q")
        names: dict[str, int] = {}
        kind_codes = {kind: n for n, kind in enumerate(KINDS)}
        conn.execute("BEGIN")
        try:
            epoch, _pruned = _state(conn)
            top = _top(conn)
            last = _change(conn, top)
            cur = conn.execute(_SCAN)
            previous: str | None = None
            while batch := cur.fetchmany(_SCAN_BATCH):
                if self._closed:
                    return None
                for key, kind, segment, offset, length in batch:
                    if previous is not None and key <= previous:
                        # a lookup by key would not find every row a scan finds: the map
                        # would hold keys that deletes cannot reach (UTF-8 order is the
                        # code point order SQLite's BINARY collation gives)
                        raise _Damaged(f"rows out of key order at {key!r}")
                    previous = key
                    if not mapped(key):
                        continue
                    hashes.append(hash_of(key))
                    kinds.append(kind_codes.get(kind, _ASK_CODE))
                    if segment is None:
                        segments.append(_FILE)
                    else:
                        segments.append(names.setdefault(segment, len(names)))
                    offsets.append(offset or 0)
                    lengths.append(length)
        finally:
            conn.execute("COMMIT")
        arrays = hint.Arrays.build(hashes, kinds, segments, offsets, lengths)
        return hint.Hint(epoch, top, last, list(names), arrays)

    # ------------------------------------------------------------------ closing

    def close(self, *, save: bool = True) -> None:
        """Write the hint file (when the map changed since it was loaded) and let go."""
        if os.getpid() != self._pid:  # a fork()ed child: nothing here is its own (see find)
            self._closed = True
            return
        with self._lock:
            self._closed = True
            building = self._building
        if building is not None:
            building.join(timeout=30)
        with self._lock:
            try:
                if save and self._ready and self._sync_locked():
                    self._save_locked()
            finally:
                self._drop_locked("closed")

    def save(self, *, force: bool = False) -> bool:
        """Write the hint file now if it is due (``force``: if it says less than the map):
        at least :data:`_SAVE_EVERY` changes, or an eighth of the map, since the last one.
        So that a process that never closes (killed, crashed) leaves a recent hint, and
        the next one replays fewer changes, or does not build from the rows. Whether it
        wrote."""
        with self._lock:
            if not self._ready or self._closed or not self._sync_locked():
                return False
            saved_epoch, saved_seq = self._saved or ("", -1)
            behind = self._seq - saved_seq if saved_epoch == self._epoch else self._seq + 1
            if not force and behind < max(_SAVE_EVERY, len(self._arrays.hashes) >> 3):
                return False
            return self._save_locked()

    def _save_locked(self) -> bool:
        self._merge_locked()
        if self._saved == (self._epoch, self._seq) or self._conn is None:
            return False  # the hint on disk says the same
        a = self._arrays
        used = np.unique(a.segments[a.segments != _FILE])
        remap = np.full(len(self._segments) + 1, _FILE, dtype=np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        arrays = dataclasses.replace(
            a, segments=np.where(a.segments == _FILE, _FILE, remap[a.segments]).astype(np.int32)
        )
        names = [self._segments[int(i)] for i in used]
        last = _change(self._conn, self._seq)
        if hint.write(self._root, hint.Hint(self._epoch, self._seq, last, names, arrays)):
            self._saved = (self._epoch, self._seq)
            return True
        return False

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the dict of recent changes not counted)."""
        return self._arrays.nbytes

    @property
    def ready(self) -> bool:
        return self._ready

    def __len__(self) -> int:
        return len(self._arrays.hashes) + len(self._changes)


class _Drop(Exception):
    """The map cannot follow the index (replaced, or its log pruned past the map)."""


class _Damaged(Exception):
    """The index's rows are not as SQLite keeps them: damage SQLite did not see."""


def _location(
    kind: str | None, segment: str | None, offset: int | None, length: int | None
) -> Location | str:
    if kind is None:
        return ABSENT
    if kind not in KINDS or length is None:
        return ASK
    return Location(kind, segment, offset or 0, length)


def _kind_code(loc: Location | str) -> int:
    return KINDS.index(loc.kind) if isinstance(loc, Location) else _ASK_CODE


def _state(conn: sqlite3.Connection) -> tuple[str, int]:
    row = conn.execute("SELECT epoch, pruned FROM changes_state WHERE id = 0").fetchone()
    if row is None:
        raise _Drop("the index has no change log")
    return str(row[0]), int(row[1])


def _top(conn: sqlite3.Connection) -> int:
    """The last change logged (0: none yet)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    return 0 if row is None else int(row[0])


def _change(conn: sqlite3.Connection, seq: int) -> str | None:
    """A digest of change ``seq`` as logged (None: not in the log, or 0)."""
    row = conn.execute(
        "SELECT key, kind, segment, offset, length FROM changes WHERE seq = ?", (seq,)
    ).fetchone()
    return None if row is None else hashlib.sha256(repr(tuple(row)).encode()).hexdigest()


def _connect(db_path: str) -> tuple[sqlite3.Connection, tuple[int, int] | None]:
    """A read-only connection to ``db_path``, with the identity of the file it is on."""
    before = file_id(db_path)
    if before is None:
        raise FileNotFoundError(db_path)
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA cache_size=-{_PAGE_CACHE_KIB}")
        conn.execute("PRAGMA query_only=1")
        conn.execute("SELECT 1 FROM changes_state").fetchall()
        if file_id(db_path) != before:
            raise OSError("the index was replaced while connecting")
    except BaseException:
        conn.close()
        raise
    return conn, before
