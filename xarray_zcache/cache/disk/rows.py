"""Operations on the index rows, each run inside the caller's ``BEGIN IMMEDIATE`` transaction.

**The index row is the authority.** Every change to payload files (install or unlink)
happens inside a write transaction, and files are unlinked *before* their rows are deleted,
so that between transactions a visible payload file always has a committed row (the
converse need not hold: a crash can leave a row whose file is gone, which reads as a miss
and is cleaned by eviction or ``verify``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from xarray_zcache.cache.disk import hooks
from xarray_zcache.cache.disk.folder import unlink_missing_ok
from xarray_zcache.cache.disk.format import KINDS, digest, payload_path
from xarray_zcache.cache.disk.locations import PREFIX_CHANGE, mapped
from xarray_zcache.cache.disk.schema import SchemaDamaged
from xarray_zcache.cache.disk.segments import kill_records

logger = logging.getLogger("xarray_zcache.disk")

#: A ``horizon`` (see ``prune``) further in the future than this is damage: reset it.
HORIZON_SLACK_NS: Final = 86_400 * 10**9
#: The change log (:mod:`.keydir`) keeps this many of its latest changes when pruned, and at
#: least this share of the index's entry count: a process whose location map is further
#: behind rebuilds it from the rows. (A build from the rows takes about 3.4 µs an entry; a
#: log of a quarter of the entries lets writers log up to ~70,000 changes/s during a build
#: before the log is pruned past it, which would start the build again, forever.)
CHANGES_KEPT: Final = 100_000
CHANGES_KEPT_PER_ENTRY: Final = 0.25

UPSERT: Final = """
INSERT INTO entries(key, namespace, kind, size, created, last_access, hits, expires, checksum,
                    token, segment, offset)
VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)
ON CONFLICT(key) DO UPDATE SET
    namespace = excluded.namespace, kind = excluded.kind, size = excluded.size,
    created = excluded.created, last_access = excluded.last_access, expires = excluded.expires,
    checksum = excluded.checksum, token = excluded.token, segment = excluded.segment,
    offset = excluded.offset
"""

#: Called with ``(exc, action)`` when a file cannot be removed.
OnError = Callable[[BaseException, str], None]
#: key, kind, size, segment (None: a file of its own), offset
Row = tuple[str, str, int, str | None, int | None]
#: The columns of a :data:`Row`.
ROW: Final = "key, kind, size, segment, offset"


def sql_safe(text: str) -> bool:
    """Whether ``text`` can be stored in SQLite (lone surrogates cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def prefix_upper(prefix: str) -> str | None:
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


def used(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT used FROM totals WHERE id = 0").fetchone()
    if row is None or not isinstance(row[0], int):
        raise SchemaDamaged("the totals row is damaged")
    return row[0]


def recount(conn: sqlite3.Connection) -> None:
    conn.execute(
        "UPDATE totals SET used = (SELECT COALESCE(SUM(size), 0) FROM entries), "
        "count = (SELECT COUNT(*) FROM entries) WHERE id = 0"
    )


def totals_ok(conn: sqlite3.Connection) -> bool:
    """Whether the ``totals`` row exists, is sane, and its horizon is not in the future."""
    row = conn.execute("SELECT horizon, used, count FROM totals WHERE id = 0").fetchone()
    return (
        row is not None
        and all(isinstance(v, int) and v >= 0 for v in row)
        and row[0] <= time.time_ns() + HORIZON_SLACK_NS
    )


def reset_totals(conn: sqlite3.Connection) -> None:
    """Recreate the ``totals`` row; fetches started before now count as stale."""
    conn.execute(
        "INSERT INTO totals(id, used, count, horizon) VALUES (0, 0, 0, ?) "
        "ON CONFLICT(id) DO UPDATE SET horizon = excluded.horizon",
        (time.time_ns(),),
    )
    recount(conn)


def tombstone(conn: sqlite3.Connection, key: str, at: int) -> None:
    conn.execute(
        "INSERT INTO tombstones(key, at) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET at = MAX(at, excluded.at)",
        (key, at),
    )


def is_stale(conn: sqlite3.Connection, key: str, fetch_started_ns: int) -> bool:
    """Whether a value fetched at ``fetch_started_ns`` is older than a recorded write/delete.

    Tombstones vs stale fills from other processes: a fill (a value read from the source)
    races with writes and deletes of the same key in any process of the host. Writes and
    deletes leave a tombstone (key or prefix, with time); a fill whose fetch started before
    the latest tombstone covering its key, or before the pruning horizon, is refused.
    """
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


def prune(conn: sqlite3.Connection, older_than_s: float) -> None:
    """Forget old tombstones; fetches started before the cutoff are refused from now on."""
    cutoff = time.time_ns() - int(older_than_s * 1e9)
    conn.execute("DELETE FROM tombstones WHERE at < ?", (cutoff,))
    conn.execute("DELETE FROM prefix_tombstones WHERE at < ?", (cutoff,))
    conn.execute("UPDATE totals SET horizon = MAX(horizon, ?) WHERE id = 0", (cutoff,))
    prune_changes(conn, changes_kept(conn))


def changes_kept(conn: sqlite3.Connection) -> int:
    """How many of its latest changes the log keeps (:data:`CHANGES_KEPT`)."""
    row = conn.execute("SELECT count FROM totals WHERE id = 0").fetchone()
    entries = row[0] if row is not None and isinstance(row[0], int) else 0
    return max(CHANGES_KEPT, int(entries * CHANGES_KEPT_PER_ENTRY))


def prune_changes(conn: sqlite3.Connection, keep: int) -> None:
    """Delete all but the latest ``keep`` changes of the change log (``changes_state.pruned``
    then says up to where: a location map behind it cannot catch up, see :mod:`.keydir`)."""
    cutoff = changes_cutoff(conn, keep)
    if cutoff is None:
        return
    conn.execute("DELETE FROM changes WHERE seq <= ?", (cutoff,))
    conn.execute("UPDATE changes_state SET pruned = ? WHERE id = 0", (cutoff,))


def changes_cutoff(conn: sqlite3.Connection, keep: int) -> int | None:
    """The change up to which :func:`prune_changes` would delete (None: nothing to do)."""
    top = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    pruned = conn.execute("SELECT pruned FROM changes_state WHERE id = 0").fetchone()
    if top is None or pruned is None or int(top[0]) - keep <= pruned[0]:
        return None
    return int(top[0]) - keep


def unlink_key_files(root: str, key: str) -> None:
    hexdigest = digest(key).hex()
    for kind in KINDS:
        unlink_missing_ok(payload_path(root, hexdigest, kind))


def delete_key(conn: sqlite3.Connection, root: str, key: str, at: int | None = None) -> None:
    """Unlink the files of ``key`` (or mark its record dead), delete its row, record a
    tombstone."""
    unlink_key_files(root, key)
    if sql_safe(key):
        found = conn.execute(
            "SELECT segment, offset FROM entries WHERE key = ? AND segment IS NOT NULL", (key,)
        ).fetchone()
        if found is not None and kill_records(root, [found]):
            # the row goes all the same: a deleted value is never served (only an index
            # rolled back by a power loss could point at the unmarked record again)
            logger.warning(
                "xarray-zcache: segment %s cannot be written: a deleted record is not marked "
                "dead (its row is removed)",
                found[0],
            )
        gone = conn.execute("DELETE FROM entries WHERE key = ?", (key,)).rowcount
        if not gone and mapped(key):
            # logged all the same: a damaged index may no longer find a row that a
            # location map (built by a scan, or from a hint) still holds
            conn.execute("INSERT INTO changes(key) VALUES (?)", (key,))
        tombstone(conn, key, time.time_ns() if at is None else at)


def remove_rows(conn: sqlite3.Connection, root: str, rows: Iterable[Row], on_error: OnError) -> int:
    """:func:`remove_rows_counted`, returning only the bytes removed."""
    return remove_rows_counted(conn, root, rows, on_error)[1]


def remove_rows_counted(
    conn: sqlite3.Connection,
    root: str,
    rows: Iterable[Row],
    on_error: OnError,
    removed: list[str] | None = None,
    *,
    invalidating: bool = False,
) -> tuple[int, int]:
    """Unlink the files of ``(key, kind, size, segment, offset)`` rows, then delete the rows.

    The rows must be read in the caller's transaction; a row is deleted only if it still
    points where it did (its segment and offset), never a newer row of its key.

    Files go first so that a visible file always has a row. A row whose file cannot be
    unlinked (other than already gone) is kept. The record of a row in a segment is marked
    dead first (:func:`.segments.kill_records`), its bytes reclaimed by compaction. Returns
    ``(rows, bytes)`` removed: exactly the rows deleted and the sum of their sizes (a row kept,
    or no longer found as it was read, counts in neither); their keys are appended to
    ``removed`` if given.

    ``invalidating`` (deletes, not eviction or expiry): the row of a record that cannot be
    marked dead is deleted all the same, since a deleted value must never be served; only an
    index rolled back by a power loss could point at that record again.
    """
    done: list[tuple[str, str | None, int | None, int]] = []
    rows = list(rows)
    failed = kill_records(
        root, [(r[3], r[4]) for r in rows if r[3] is not None and r[4] is not None]
    )
    for key, kind, size, segment, offset in rows:
        if segment is not None:
            if segment in failed:
                on_error(OSError(f"segment {segment} cannot be written"), "removing a record")
                if not invalidating:
                    continue
            done.append((key, segment, offset, size))
            continue
        path = payload_path(root, digest(key).hex(), kind)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another process (or a crash) removed it already
        except OSError as exc:
            on_error(exc, f"removing {path}")
            continue
        hooks.fire("after-unlink", path)
        done.append((key, None, None, size))
    # only the row whose record was marked dead (or file unlinked): never a newer row of the key
    count = freed = 0
    for key, segment, offset, size in done:
        cur = conn.execute(
            "DELETE FROM entries WHERE key = ? AND segment IS ? AND offset IS ?",
            (key, segment, offset),
        )
        if cur.rowcount > 0:
            count += 1
            freed += size
            if removed is not None:
                removed.append(key)
    return count, freed


def delete_prefix(
    conn: sqlite3.Connection, root: str, prefix: str, on_error: OnError, at: int | None = None
) -> list[str]:
    """Remove the entries whose key starts with ``prefix``; record a prefix tombstone."""
    upper = prefix_upper(prefix)
    if upper is None:
        cur = conn.execute(f"SELECT {ROW} FROM entries WHERE key >= ?", (prefix,))
    else:
        cur = conn.execute(f"SELECT {ROW} FROM entries WHERE key >= ? AND key < ?", (prefix, upper))
    rows: list[Row] = [r for r in cur.fetchall() if r[0].startswith(prefix)]
    removed: list[str] = []  # a row whose file cannot be removed is kept: not counted
    remove_rows_counted(conn, root, rows, on_error, removed, invalidating=True)
    if mapped(prefix[-1:]):  # (a prefix ending in UNMAPPED covers only keys no map holds)
        log_prefix(conn, prefix)
    conn.execute(
        "INSERT INTO prefix_tombstones(prefix, at) VALUES (?, ?) "
        "ON CONFLICT(prefix) DO UPDATE SET at = MAX(at, excluded.at)",
        (prefix, time.time_ns() if at is None else at),
    )
    return removed


def delete_namespace(
    conn: sqlite3.Connection, root: str, namespace: str, on_error: OnError
) -> list[str]:
    """Remove the entries of ``namespace`` and record a tombstone for each of their keys."""
    rows = conn.execute(f"SELECT {ROW} FROM entries WHERE namespace = ?", (namespace,)).fetchall()
    removed: list[str] = []  # a row whose file cannot be removed is kept: not counted
    remove_rows_counted(conn, root, rows, on_error, removed, invalidating=True)
    log_prefix(conn, "")  # (by namespace: no prefix of keys says which)
    now_ns = time.time_ns()
    conn.executemany(
        "INSERT INTO tombstones(key, at) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET at = MAX(at, excluded.at)",
        [(r[0], now_ns) for r in rows],
    )
    return removed


def log_prefix(conn: sqlite3.Connection, prefix: str) -> None:
    """Log that every key under ``prefix`` was invalidated (location maps are built again):
    the rows a damaged index's range scan did not find are then not served from a map
    either."""
    conn.execute("INSERT INTO changes(key, kind) VALUES (?, ?)", (prefix, PREFIX_CHANGE))


@dataclasses.dataclass(frozen=True, slots=True)
class Freed:
    """What an eviction removed."""

    expired: int = 0
    expired_bytes: int = 0
    evicted: int = 0
    evicted_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.expired_bytes + self.evicted_bytes


def drop_expired(conn: sqlite3.Connection, root: str, now: float, on_error: OnError) -> Freed:
    rows = conn.execute(f"SELECT {ROW} FROM entries WHERE expires < ?", (now,)).fetchall()
    count, freed = remove_rows_counted(conn, root, rows, on_error) if rows else (0, 0)
    return Freed(expired=count, expired_bytes=freed)


def evict(
    conn: sqlite3.Connection,
    root: str,
    target: int,
    now: float,
    on_error: OnError,
    protect: str | None = None,
    *,
    limit: int | None = None,
    hard_target: int | None = None,
) -> Freed:
    """Drop expired rows, then LRU rows (never ``protect``) until usage <= ``target``.

    With ``limit``, at most ``limit`` LRU rows are removed, unless more are needed to bring
    usage down to ``hard_target`` (default ``target``): eviction to a low-water mark then
    happens in bounded batches (each holding the write lock briefly) rather than all at once.
    """
    expired = drop_expired(conn, root, now, on_error)
    total = used(conn)
    need = total - target
    if need <= 0:
        return expired
    must = need if hard_target is None else max(0, total - hard_target)
    victims: list[Row] = []
    got = 0
    cur = conn.execute(f"SELECT {ROW} FROM entries ORDER BY last_access")
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
                if got >= need or (limit is not None and len(victims) >= limit and got >= must):
                    need = got
                    break
    finally:
        cur.close()
    count, evicted = remove_rows_counted(conn, root, victims, on_error)
    return dataclasses.replace(expired, evicted=count, evicted_bytes=evicted)


def summary(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Entries and bytes per ``(namespace, kind)``, computed by SQLite (one ``GROUP BY``)."""
    cur = conn.execute(
        "SELECT namespace, kind, COUNT(*), COALESCE(SUM(size), 0) FROM entries "
        "GROUP BY namespace, kind ORDER BY namespace, kind"
    )
    return [
        {"namespace": ns, "kind": kind, "entries": int(n), "bytes": int(size)}
        for ns, kind, n, size in cur.fetchall()
    ]
