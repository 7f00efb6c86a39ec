"""`VersionBook`: the version of each cached object and when each unit was last validated.

A *version* is an opaque string naming an object's content at the source (an S3 ETag,
a file's ``mtime_ns:size:inode:ctime_ns``); a *unit* is a group of objects validated together
(one listing of the source, e.g. one array). The book is one SQLite file in the cache
folder (``versions.db``), shared by every process using the folder, with the rows read
so far mirrored in memory; a cache without a disk tier keeps the book in memory only.

The book is advice about freshness, not the authority on what is cached (the disk
index is): a lost or missing row only makes the cache validate or re-read more. Its
file (opening, the rule for SQL errors, losing it) is `xarray_zcache.cache.book_file`.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from typing import Final

from xarray_zcache.cache.book_file import BOOK_NAME, BookFile

__all__ = ["BOOK_NAME", "UnitState", "VersionBook"]

logger = logging.getLogger("xarray_zcache.cache")

#: seconds a claim to validate a unit lasts unless its holder renews it (it does, while
#: it lists); a claim of a cancelled validation is released at once, one of a dead
#: process lapses after this (at once on the same host: its process id is gone)
LEASE: float = 5.0

#: seconds a row of the change log is kept; a process that has not read the log for
#: longer drops its whole memory tier (it cannot tell what it missed)
LOG_KEEP: float = 3600.0
#: rows written between two prunings of the change log
_PRUNE_EVERY: Final = 1000

_HOST: Final = socket.gethostname()


def _alive(holder: str) -> bool:
    """Whether the process named by claim ``holder`` (``host/pid/token``) may be alive:
    False only for a process of this host whose id is gone."""
    host, _, rest = holder.partition("/")
    pid_text = rest.partition("/")[0]
    if host != _HOST or not pid_text.isdigit():
        return True  # another host: its lease tells
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (another user's process)
        return True
    return True


def _upper(prefix: str) -> str:
    return prefix + "\U0010ffff"


class UnitState:
    """What the book says of one unit: when its last validation started (``validated``)
    and ended (``ended``), the last change seen, and a claim (``holder`` until ``lease``)."""

    __slots__ = ("changed", "ended", "holder", "lease", "validated")

    def __init__(
        self,
        validated: float,
        changed: float,
        ended: float = 0.0,
        holder: str = "",
        lease: float = 0.0,
    ) -> None:
        self.validated = validated
        self.changed = changed
        self.ended = max(ended, validated)
        self.holder = holder
        self.lease = lease


class VersionBook(BookFile):
    """Object versions and unit validation times (thread-safe, one lock).

    Parameters
    ----------
    folder
        The cache folder (the book is ``folder/versions.db``), or None: memory only.
    had_entries
        Whether the folder already held cached entries when the book is created there
        for the first time (a folder from a release without versions): its units are
        then validated before they are served, since nothing says how old they are.
    """

    def __init__(self, folder: str | None, *, had_entries: bool = False) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, str] = {}
        self._seen: dict[str, tuple[str, float]] = {}
        self._units: dict[str, UnitState] = {}
        self._conn: sqlite3.Connection | None = None
        self._token = uuid.uuid4().hex[:12]
        self._folder = folder
        self._logged = 0
        #: called (once) when the folder vanished under the book; it then keeps memory only
        self.on_lost: Callable[[BaseException, str], None] | None = None
        self.legacy = False
        if folder is None:
            return
        self._open(folder, had_entries)

    # -- object versions ------------------------------------------------------------------------

    def version(self, key: str) -> str | None:
        """The recorded version of object ``key``, or None."""
        with self._lock:
            found = self._versions.get(key)
            if found is not None:
                return found
            row = self._row("reading a version", "SELECT version FROM versions WHERE key = ?", key)
            if row is not None:
                self._versions[key] = row[0]
                return str(row[0])
            return None

    def record(self, key: str, version: str) -> None:
        """Record that object ``key`` is cached at ``version``."""
        with self._lock:
            if self._versions.get(key) == version:
                return
            self._versions[key] = version
            self._sql(
                "recording a version",
                lambda c: c.execute(
                    "INSERT OR REPLACE INTO versions VALUES (?, ?)", (key, version)
                ),
                None,
            )

    def saw(self, versions: dict[str, str], at: float) -> None:
        """A validation that started at ``at`` saw these objects changed at the source,
        at these versions (not what is cached: nothing of them is, after the drop)."""
        if not versions:
            return
        rows = [(k, v, at) for k, v in versions.items()]
        with self._lock:
            self._seen.update((k, (v, at)) for k, v, _ in rows)

            def op(c: sqlite3.Connection) -> None:
                with self._write(c):
                    c.executemany("INSERT OR REPLACE INTO seen VALUES (?, ?, ?)", rows)

            self._sql("recording versions seen", op, None)

    def seen(self, key: str) -> tuple[str, float] | None:
        """The version of ``key`` a validation last saw changed, and when (see `saw`)."""
        with self._lock:
            found = self._seen.get(key)
            if found is not None:
                return found
            row = self._row(
                "reading a version seen", "SELECT version, at FROM seen WHERE key = ?", key
            )
            return None if row is None else (str(row[0]), float(row[1]))

    def under(self, prefix: str) -> dict[str, str]:
        """Versions of the objects whose keys start with ``prefix`` (from the file)."""
        with self._lock:
            rows = self._sql(
                "listing versions",
                lambda c: c.execute(
                    "SELECT key, version FROM versions WHERE key >= ? AND key < ?",
                    (prefix, _upper(prefix)),
                ).fetchall(),
                None,
            )
            if rows is None:
                return {k: v for k, v in self._versions.items() if k.startswith(prefix)}
            found = {str(k): str(v) for k, v in rows}
            self._versions.update(found)
            return found

    def forget(self, key: str, *, prefix: bool = False) -> None:
        """Drop the version of ``key`` (or of every key starting with it), and tell the
        other processes of the folder through the change log (`changes_since`)."""
        self.log([(key, prefix)])
        with self._lock:
            if prefix:
                for k in [k for k in self._versions if k.startswith(key)]:
                    del self._versions[k]
                self._sql(
                    "forgetting versions",
                    lambda c: c.execute(
                        "DELETE FROM versions WHERE key >= ? AND key < ?", (key, _upper(key))
                    ),
                    None,
                )
            else:
                self._versions.pop(key, None)
                self._sql(
                    "forgetting a version",
                    lambda c: c.execute("DELETE FROM versions WHERE key = ?", (key,)),
                    None,
                )

    # -- the change log: what one process dropped reaches every process of the folder ----------

    def log(self, keys: list[tuple[str, bool]]) -> None:
        """Append ``(key, is_prefix)`` to the folder's change log: the entries of these
        objects (or of every key under the prefix) are no longer current; every other
        process drops them from its memory when it reads the log (`changes_since`)."""
        if not keys or self._conn is None:
            return
        at = time.time()
        me = self.holder
        rows = [(k, int(p), me, at) for k, p in keys]

        def op(c: sqlite3.Connection) -> None:
            with self._write(c):
                c.executemany(
                    "INSERT INTO changes(key, prefix, holder, at) VALUES (?, ?, ?, ?)", rows
                )
                self._logged += len(rows)
                if self._logged >= _PRUNE_EVERY:
                    self._logged = 0
                    c.execute("DELETE FROM changes WHERE at < ?", (at - LOG_KEEP,))

        with self._lock:
            self._sql("logging a change", op, None)

    def last_change(self) -> int:
        """The sequence number of the last row of the change log (0: none)."""
        with self._lock:
            row = self._sql(
                "reading the change log",
                lambda c: c.execute("SELECT max(seq) FROM changes").fetchone(),
                None,
            )
        return 0 if row is None or row[0] is None else int(row[0])

    def changes_since(self, seq: int) -> tuple[int, list[tuple[str, bool]] | None]:
        """The rows of the change log after ``seq`` written by other processes:
        ``(last seq, [(key, is_prefix), ...])``; None instead of the list when rows
        after ``seq`` were pruned (everything must be taken as changed). One query."""
        if self._conn is None:
            return seq, []
        me = self.holder

        def op(c: sqlite3.Connection) -> tuple[int, list[tuple[str, bool]] | None]:
            rows = c.execute(
                "SELECT seq, key, prefix, holder FROM changes WHERE seq > ?"
                " OR seq = (SELECT min(seq) FROM changes) ORDER BY seq",
                (seq,),
            ).fetchall()
            if not rows:
                return seq, []
            first = int(rows[0][0])
            gap = first > seq + 1  # (rows this process never read were pruned)
            found = [(str(k), bool(p)) for s, k, p, h in rows if int(s) > seq and h != me]
            return max(seq, int(rows[-1][0])), None if gap else found

        nothing: tuple[int, list[tuple[str, bool]] | None] = (seq, [])
        with self._lock:
            return self._sql("reading the change log", op, nothing)

    # -- units ----------------------------------------------------------------------------------

    @property
    def holder(self) -> str:
        """How this book names itself in a claim: ``host/pid/token``."""
        return f"{_HOST}/{os.getpid()}/{self._token}"

    def unit(self, unit: str) -> UnitState | None:
        """The unit's state as the file says now (another process may have validated it)."""
        with self._lock:
            row = self._sql(
                "reading a unit",
                lambda c: c.execute(
                    "SELECT validated, changed, ended, holder, lease FROM units WHERE unit = ?",
                    (unit,),
                ).fetchone(),
                None,
            )
            if row is not None:
                state = UnitState(
                    float(row[0]), float(row[1]), float(row[2]), str(row[3]), float(row[4])
                )
                self._units[unit] = state
                return state
            return self._units.get(unit)

    def start(self, unit: str, at: float) -> UnitState:
        """The unit's state, created as "valid at ``at``" if the book has none."""
        with self._lock:
            self._sql(
                "starting a unit",
                lambda c: c.execute(
                    "INSERT OR IGNORE INTO units(unit, validated, ended) VALUES (?, ?, ?)",
                    (unit, at, at),
                ),
                None,
            )
            self._units.setdefault(unit, UnitState(at, 0.0, at))
        return self.unit(unit) or UnitState(at, 0.0, at)

    def claim(self, unit: str, now: float) -> str | None:
        """Claim the validation of ``unit`` for this book, as a lease until ``now`` +
        `LEASE` (renew it with `renew`). Returns why it was free (``"free"``; ``"lapsed"``:
        its holder stopped renewing; ``"dead"``: its holder's process is gone), or None:
        another holder has it."""
        me = self.holder

        def op(c: sqlite3.Connection) -> str | None:
            with self._write(c):
                c.execute("INSERT OR IGNORE INTO units(unit, validated) VALUES (?, 0)", (unit,))
                row = c.execute(
                    "SELECT holder, lease FROM units WHERE unit = ?", (unit,)
                ).fetchone()
                holder, lease = (str(row[0]), float(row[1])) if row else ("", 0.0)
                if not holder or holder == me:
                    why = "free"
                elif lease < now:
                    why = "lapsed"
                elif not _alive(holder):
                    why = "dead"
                else:
                    return None
                c.execute(
                    "UPDATE units SET holder = ?, lease = ? WHERE unit = ?",
                    (me, now + LEASE, unit),
                )
                return why

        with self._lock:
            found: str | None = "free"  # (no file: this process alone)
            return self._sql("claiming a unit", op, found)

    def renew(self, unit: str, now: float) -> bool:
        """Extend this book's claim of ``unit`` to ``now`` + `LEASE` (False: not ours now)."""
        me = self.holder
        with self._lock:
            return self._sql(
                "renewing a claim",
                lambda c: (
                    c.execute(
                        "UPDATE units SET lease = ? WHERE unit = ? AND holder = ?",
                        (now + LEASE, unit, me),
                    ).rowcount
                    == 1
                ),
                True,
            )

    def validated(self, unit: str, at: float, changed: float | None, ended: float) -> None:
        """Record a validation of ``unit`` that started at ``at`` and ended at ``ended``
        (and found changes at ``changed``, if any); releases this book's claim."""
        me = self.holder

        def op(c: sqlite3.Connection) -> None:
            with self._write(c):
                c.execute("INSERT OR IGNORE INTO units(unit, validated) VALUES (?, 0)", (unit,))
                c.execute(
                    "UPDATE units SET validated = max(validated, ?), ended = max(ended, ?),"
                    " changed = max(changed, ?) WHERE unit = ?",
                    (at, ended, changed or 0.0, unit),
                )
                c.execute(
                    "UPDATE units SET holder = '', lease = 0 WHERE unit = ? AND holder = ?",
                    (unit, me),
                )

        with self._lock:
            old = self._units.get(unit)
            self._units[unit] = UnitState(
                max(at, old.validated if old else 0.0),
                max(changed or 0.0, old.changed if old else 0.0),
                max(ended, old.ended if old else 0.0),
            )
            self._sql("recording a validation", op, None)

    def release(self, unit: str) -> None:
        """Give up this book's claim of ``unit`` (the validation failed or was cancelled)."""
        me = self.holder
        with self._lock:
            self._sql(
                "releasing a unit",
                lambda c: c.execute(
                    "UPDATE units SET holder = '', lease = 0 WHERE unit = ? AND holder = ?",
                    (unit, me),
                ),
                None,
            )

    def changed(self, unit: str, at: float) -> None:
        """Note that an object of ``unit`` was found changed at ``at`` (e.g. by a fill)."""
        with self._lock:
            state = self._units.get(unit)
            if state is not None:
                state.changed = max(state.changed, at)
            self._sql(
                "noting a change",
                lambda c: c.execute(
                    "UPDATE units SET changed = max(changed, ?) WHERE unit = ?", (at, unit)
                ),
                None,
            )

    def clear(self) -> None:
        """Forget everything (the cache was cleared)."""
        with self._lock:
            self._versions.clear()
            self._seen.clear()
            self._units.clear()

            def op(c: sqlite3.Connection) -> None:
                with self._write(c):
                    c.execute("DELETE FROM versions")
                    c.execute("DELETE FROM seen")
                    c.execute("DELETE FROM units")
                    c.execute(
                        "INSERT INTO changes(key, prefix, holder, at) VALUES ('', 1, ?, ?)",
                        (self.holder, time.time()),
                    )
                    c.execute("DELETE FROM meta WHERE name = 'legacy'")

            self._sql("clearing", op, None)
            self.legacy = False


def now() -> float:
    """The cache host's clock (seconds since the epoch); tests may replace it."""
    return time.time()
