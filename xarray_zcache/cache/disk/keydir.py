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
thread, reads asking the index meanwhile (:mod:`.keydir_build`).

**Never a pause.** The dict of changes is folded into the arrays by a background thread
(a hundred thousand changes into a million entries: about 0.3 s of NumPy), while answers go
on from the arrays as they were, the changes being folded, and the changes since; the hint
file is written the same way. The lock is held for dict and array look-ups only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from typing import Final

import numpy as np

from xarray_zcache.cache.disk import hint, keydir_build
from xarray_zcache.cache.disk.folder import file_id
from xarray_zcache.cache.disk.format import KINDS
from xarray_zcache.cache.disk.keydir_build import ASK_CODE, FILE, Damaged, Drop
from xarray_zcache.cache.disk.locations import (
    ABSENT,
    ASK,
    PREFIX_CHANGE,
    Change,
    Location,
    change_of,
    hash_of,
    mapped,
)

logger = logging.getLogger("xarray_zcache.disk")

#: Changes held in the dict before they are folded into the arrays (at least).
_MERGE_AT: Final = 65_536
#: ``save`` writes the hint when at least this many changes came since the last one.
_SAVE_EVERY: Final = 10_000
#: After a failed build or fold, the next attempt waits this long (seconds).
_RETRY_S: Final = 5.0
#: An index of at most this many entries without a usable hint is mapped at once, in
#: ``open`` (about 0.1 s); a larger one in the background.
_BUILD_AT_ONCE: Final = 50_000
#: Seconds ``close`` waits for a background build or fold to stop.
_JOIN_S: Final = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Snapshot:
    """What a hint is written from, taken under the lock and written without it."""

    epoch: str
    seq: int
    last: str | None
    arrays: hint.Arrays
    #: the changes being folded (a dict never changed once frozen) and a copy of the newer
    frozen: Mapping[int, Change]
    changes: Mapping[int, Change]
    segments: list[str]


class KeyDir:
    """The location map of one tier (module doc). Thread-safe: one lock, never held
    around I/O other than SQLite's reads of the change log (no device reads: its pages are
    the latest written), nor around a fold of the changes into the arrays."""

    def __init__(self, root: str, db_path: str, on_damage: Callable[[BaseException], None]) -> None:
        self._root = root
        #: told when building finds the index damaged (rows out of key order)
        self._on_damage = on_damage
        self._db_path = db_path
        self._lock = threading.Lock()
        #: one hint written at a time (taken before ``_lock``, never inside it)
        self._saving = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._db_id: tuple[int, int] | None = None
        self._epoch = ""
        self._seq = 0
        self._version: int | None = None
        self._arrays = hint.Arrays.empty()
        #: the segment names the arrays' codes refer to (only ever appended to by a fold)
        self._segments: list[str] = []
        #: changes since the arrays: hash -> a location's tuple, ABSENT or ASK (newest first)
        self._changes: dict[int, Change] = {}
        #: ... and the older ones a background fold is folding into the arrays
        self._frozen: dict[int, Change] = {}
        self._ready = False
        self._closed = False
        self._building: threading.Thread | None = None
        self._folding: threading.Thread | None = None
        #: no fold starts before this time (a fold failed: memory short)
        self._fold_retry_at = 0.0
        #: changes whenever changes are applied, or the map is dropped or installed
        self._generation = 0
        #: changes whenever the map is dropped or installed (a fold of another map is void)
        self._incarnation = 0
        self._pid = os.getpid()
        self._damage: BaseException | None = None
        self._retry_at = 0.0
        self._saved: tuple[str, int] | None = None
        #: answers given (a location or absent), and reads sent to the index (ask)
        self.answered = 0
        self.asked = 0
        self.builds = 0
        self.folds = 0

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
        if not self._ready:
            self._start_build_locked()
            return ASK
        if not self._sync_locked():
            self._start_build_locked()  # dropped: built again from the rows
            return ASK
        change = self._changes.get(h)
        if change is None:
            change = self._frozen.get(h)
        if change is not None:
            return change if isinstance(change, str) else Location(*change)
        a = self._arrays
        i = int(a.hashes.searchsorted(np.uint64(h)))  # (a Python int would cast the array)
        if i == len(a.hashes) or int(a.hashes[i]) != h:
            return ABSENT
        code = int(a.kinds[i])
        if code == ASK_CODE:
            return ASK
        segment = int(a.segments[i])
        return Location(
            KINDS[code],
            None if segment == FILE else self._segments[segment],
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
                self._changes[h] = change_of(found)

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
        try:
            if conn is None or file_id(self._db_path) != self._db_id:
                raise Drop("the index was replaced")
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:
                self._apply_locked(conn)
                self._version = version
        except (Drop, sqlite3.Error, OSError, TypeError, ValueError) as exc:
            self._drop_locked(exc)
            return False
        return True

    def _apply_locked(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN")
        try:
            epoch, pruned = keydir_build.state(conn)
            if epoch != self._epoch or pruned > self._seq or keydir_build.top(conn) < self._seq:
                raise Drop("the change log went on without this process, or went back")
            logged = conn.execute(
                "SELECT seq, key, kind, segment, offset, length FROM changes WHERE seq > ? "
                "ORDER BY seq",
                (self._seq,),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        for seq, key, kind, segment, offset, length in logged:
            if kind == PREFIX_CHANGE:
                raise Drop(f"every key under {key!r} was invalidated")
            if mapped(key):
                self._changes[hash_of(key)] = _location(kind, segment, offset, length)
            self._seq = seq
        if logged:
            self._generation += 1
        self._fold_if_due_locked()

    def _fold_if_due_locked(self) -> None:
        """Start folding the changes into the arrays in the background when they are many
        (at most one fold at a time; answers go on meanwhile)."""
        if len(self._changes) <= max(_MERGE_AT, len(self._arrays.hashes) >> 3):
            return
        if self._folding is not None or self._closed or self._frozen:
            return
        if time.monotonic() < self._fold_retry_at:
            return
        frozen = self._changes
        thread = threading.Thread(
            target=self._fold,
            args=(self._arrays, frozen, list(self._segments), self._incarnation),
            name="zcache-location-map-fold",
            daemon=True,
        )
        try:
            thread.start()  # (it installs under the lock: not before we are done here)
        except RuntimeError as exc:  # no thread to be had: the changes stay in the dict
            logger.debug("disk cache %s: location map not folded (%s)", self._root, exc)
            self._fold_retry_at = time.monotonic() + _RETRY_S
            return
        self._frozen, self._changes, self._folding = frozen, {}, thread

    def _fold(
        self,
        arrays: hint.Arrays,
        frozen: dict[int, Change],
        segments: list[str],
        incarnation: int,
    ) -> None:
        try:
            folded: tuple[hint.Arrays, list[str]] | None = keydir_build.fold(
                arrays, frozen, segments
            )
        except Exception as exc:  # (MemoryError among others) the changes go back
            logger.debug("disk cache %s: location map not folded (%s)", self._root, exc)
            folded = None
        with self._lock:
            self._folding = None
            if self._incarnation != incarnation or self._frozen is not frozen:
                return  # the map was dropped or built again meanwhile
            self._frozen = {}
            if folded is None:  # the changes go back under the newer ones
                self._changes = {**frozen, **self._changes}
                self._fold_retry_at = time.monotonic() + _RETRY_S
                return
            self._arrays, self._segments = folded
            self.folds += 1
            if not self._closed:
                self._fold_if_due_locked()

    def _drop_locked(self, why: object) -> None:
        if self._ready:
            logger.debug("disk cache %s: location map dropped (%s)", self._root, why)
        self._ready = False
        self._generation += 1
        self._incarnation += 1
        self._arrays = hint.Arrays.empty()
        self._segments = []
        self._changes, self._frozen = {}, {}
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
        the map from the rows (at once if the index is small, else in the background)."""
        with self._lock:
            if self._closed or self._ready:
                return
            try:
                loaded = keydir_build.load_hint(self._root, self._db_path)
                if loaded is not None:
                    conn, db_id, found = loaded
                    self._install_locked(conn, db_id, found)
                    self._saved = (found.epoch, found.seq)
            except (sqlite3.Error, OSError, Drop, TypeError, ValueError) as exc:
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
            conn, db_id = keydir_build.connect(self._db_path)
        except (sqlite3.Error, OSError):
            return False
        try:
            count = keydir_build.entry_count(conn)
            if count is None or count > _BUILD_AT_ONCE:
                conn.close()
                return False
            built = keydir_build.scan(conn, lambda: self._closed)
        except Damaged as exc:
            conn.close()
            self._damage = exc  # told once the lock is released (the index's lock comes first)
            return False
        except (sqlite3.Error, OSError, Drop, TypeError, ValueError):
            conn.close()
            return False
        if built is None or file_id(self._db_path) != db_id:
            conn.close()
            return False
        self._install_locked(conn, db_id, built)
        self.builds += 1
        return True

    def _install_locked(
        self, conn: sqlite3.Connection, db_id: tuple[int, int] | None, built: hint.Hint
    ) -> None:
        self._close_conn_locked()
        self._conn, self._db_id = conn, db_id
        self._epoch, self._seq = built.epoch, built.seq
        self._arrays = built.arrays
        self._segments = list(built.segments)
        self._changes, self._frozen = {}, {}
        self._version = None  # the first answer applies what was logged since
        self._ready = True
        self._generation += 1
        self._incarnation += 1

    def _start_build_locked(self) -> None:
        if self._closed or self._building is not None or time.monotonic() < self._retry_at:
            return
        thread = threading.Thread(target=self._build, name="zcache-location-map", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: reads ask the index meanwhile
            logger.debug("disk cache %s: location map not built (%s)", self._root, exc)
            self._retry_at = time.monotonic() + _RETRY_S
            return
        self._building = thread

    def _build(self) -> None:
        try:
            conn, db_id = keydir_build.connect(self._db_path)
        except (sqlite3.Error, OSError) as exc:
            self._build_failed(exc)
            return
        try:
            built = keydir_build.scan(conn, lambda: self._closed)
        except Damaged as exc:
            conn.close()
            self._build_failed(exc)
            self._on_damage(exc)
            return
        except (sqlite3.Error, OSError, Drop, TypeError, ValueError) as exc:
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

    # ------------------------------------------------------------------ hint and closing

    def close(self, *, save: bool = True) -> None:
        """Write the hint file (when the map changed since it was loaded) and let go."""
        if os.getpid() != self._pid:  # a fork()ed child: nothing here is its own (see find)
            self._closed = True
            return
        with self._lock:
            self._closed = True
            threads = [t for t in (self._building, self._folding) if t is not None]
        deadline = time.monotonic() + _JOIN_S
        for thread in threads:
            # until it lets go of the map (then it installs nothing: what it does after,
            # such as reporting damage to the tier, whose lock our caller may hold, is not
            # waited for)
            while (
                thread.is_alive()
                and thread in (self._building, self._folding)
                and time.monotonic() < deadline
            ):
                thread.join(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        with self._saving:
            with self._lock:
                snapshot = self._snapshot_locked() if save else None
            try:
                if snapshot is not None:
                    self._write(snapshot)
            finally:
                with self._lock:
                    self._drop_locked("closed")

    def save(self, *, force: bool = False) -> bool:
        """Write the hint file now if it is due (``force``: if it says less than the map):
        at least :data:`_SAVE_EVERY` changes, or an eighth of the map, since the last one.
        So that a process that never closes (killed, crashed) leaves a recent hint, and
        the next one replays fewer changes, or does not build from the rows. Whether it
        wrote. The arrays are written as they were when it began, answers going on."""
        if os.getpid() != self._pid:
            return False
        with self._saving:
            with self._lock:
                if self._closed:
                    return False
                saved_epoch, saved_seq = self._saved or ("", -1)
                behind = self._seq - saved_seq if saved_epoch == self._epoch else self._seq + 1
                if not force and behind < max(_SAVE_EVERY, len(self._arrays.hashes) >> 3):
                    return False
                snapshot = self._snapshot_locked()
            return snapshot is not None and self._write(snapshot)

    def _snapshot_locked(self) -> _Snapshot | None:
        """The map as of the index's last commit, to be written (None: the hint on disk
        says the same, or the map cannot say)."""
        if not self._ready or not self._sync_locked() or self._conn is None:
            return None
        if self._saved == (self._epoch, self._seq):
            return None
        return _Snapshot(
            self._epoch,
            self._seq,
            keydir_build.change(self._conn, self._seq),
            self._arrays,
            self._frozen,
            dict(self._changes),  # (a C-level copy; the two are merged without the lock)
            list(self._segments),
        )

    def _write(self, snap: _Snapshot) -> bool:
        try:
            changes = {**snap.frozen, **snap.changes}
            arrays, names = keydir_build.fold(snap.arrays, changes, snap.segments)
            arrays, names = keydir_build.used_segments(arrays, names)
        except Exception as exc:  # (MemoryError among others) no hint, as a failed write
            logger.debug("disk cache %s: location hint not written (%s)", self._root, exc)
            return False
        if not hint.write(self._root, hint.Hint(snap.epoch, snap.seq, snap.last, names, arrays)):
            return False
        with self._lock:
            self._saved = (snap.epoch, snap.seq)
        return True

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the dicts of recent changes not counted)."""
        return self._arrays.nbytes

    @property
    def ready(self) -> bool:
        return self._ready

    def __len__(self) -> int:
        return len(self._arrays.hashes) + len(self._changes) + len(self._frozen)


def _location(
    kind: str | None, segment: str | None, offset: int | None, length: int | None
) -> Change:
    if kind is None:
        return ABSENT
    if kind not in KINDS or length is None:
        return ASK
    return (kind, segment, offset or 0, length)
