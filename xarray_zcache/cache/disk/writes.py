"""The two transactions of ``put``, and making room when the filesystem is full.

A small entry whose record was appended to a segment (:mod:`.segments`) needs only the first:
its row is committed pointing to the complete record (if the segment still exists, checked
under the write lock), and there is nothing to place. What follows is about payload files.

**Crash safety.** The payload is first written completely to a temp file beside its final
name (:func:`~xarray_zcache.cache.disk.format.write_temp`); only :func:`place_file` renames it
into place, atomically. A reader therefore never sees a half-written entry; a crash leaves at
most a temp file (never read; removed by ``verify(repair=True)`` once its process is gone)
and a row without file (a miss, cleaned by eviction or ``verify``).

**Why two transactions.** Transaction 1 (:func:`commit_row`) checks tombstones, unlinks any
previous file of the key, commits the new row with a random token, and evicts if the total
exceeds the capacity, so that no committed state ever exceeds it. Transaction 2
(:func:`place_file`) renames the temp file into place only if the row still carries that
token: a delete, eviction or newer write of the key, by any process, in between wins. Both
run under the database write lock, so a visible payload file always has a committed row
(the invariant ``get`` relies on to read files without SQL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Final

from xarray_zcache.cache.disk import hooks, rows
from xarray_zcache.cache.disk.entry import PutRequest
from xarray_zcache.cache.disk.folder import unlink_missing_ok
from xarray_zcache.cache.disk.schema import txn
from xarray_zcache.cache.disk.segments import kill_records

#: How many least recently used rows ``make_room`` considers at most.
_ROOM_CANDIDATES: Final = 1024


def commit_row(
    conn: sqlite3.Connection,
    req: PutRequest,
    *,
    capacity: int,
    make_space: Callable[[sqlite3.Connection, str], None],
) -> bool:
    """Transaction 1: refuse a stale fill, drop the old files, commit the row with its token.

    ``make_space(conn, key)`` is called (in the transaction) when the total exceeds
    ``capacity``; it must not evict ``key``. Returns False if the fill is stale.
    """
    with txn(conn):
        return _commit_one(conn, req, capacity, make_space)


def commit_rows(
    conn: sqlite3.Connection,
    reqs: Sequence[PutRequest],
    *,
    capacity: int,
    make_space: Callable[[sqlite3.Connection, str], None],
) -> list[bool]:
    """Transaction 1 of several ``put`` calls, in one transaction (see :func:`commit_row`).

    Each request is judged as :func:`commit_row` would, in order (a later request for the
    same key replaces the row, hence the token, of an earlier one), with what the batch
    needs read once: the pruning horizon, the prefix tombstones, the rows of its keys (a key
    without a row has no payload file to unlink: a visible file always has a row). Returns,
    for each request, False if the fill is stale.
    """
    with txn(conn):
        horizon = conn.execute("SELECT horizon FROM totals WHERE id = 0").fetchone()[0]
        fills = [r.fetch_started_ns for r in reqs if r.fetch_started_ns is not None]
        prefixes = (
            conn.execute(
                "SELECT prefix, at FROM prefix_tombstones WHERE at > ?", (min(fills),)
            ).fetchall()
            if fills
            else []
        )
        keys = [r.key for r in reqs]
        sizes = _lookup(conn, "SELECT key, size FROM entries", keys)
        records = _records(conn, keys)
        tombs = _lookup(conn, "SELECT key, at FROM tombstones", keys)
        total = rows.used(conn)
        gone = _gone_segments(reqs)
        out: list[bool] = []
        pending: list[tuple[object, ...]] = []  # rows to upsert (in order: later ones win)
        for n, req in enumerate(reqs):
            if req.segment_file in gone:
                out.append(False)
                continue
            started = req.fetch_started_ns
            if started is not None:
                if (
                    started < horizon
                    or tombs.get(req.key, -1) > started
                    or any(at > started and req.key.startswith(p) for p, at in prefixes)
                ):
                    out.append(False)
                    continue
            else:
                # an authoritative write: older in-flight fetches of the key must be refused
                rows.tombstone(conn, req.key, req.write_ns)
                tombs[req.key] = max(tombs.get(req.key, -1), req.write_ns)
            old = sizes.get(req.key)
            if old is not None:  # the key's file of either kind: the new row owns the key
                _drop_record(req, records.pop(req.key, None))
                for path in req.paths:
                    unlink_missing_ok(path)
            pending.append(_row(req))
            sizes[req.key] = req.size
            total += req.size - (old or 0)
            if total > capacity:
                conn.executemany(rows.UPSERT, pending)
                pending.clear()
                make_space(conn, req.key)
                total = rows.used(conn)
                # some may be evicted
                sizes = _lookup(conn, "SELECT key, size FROM entries", keys[n + 1 :])
                records = _records(conn, keys[n + 1 :])
            out.append(True)
        conn.executemany(rows.UPSERT, pending)
        return out


def _records(conn: sqlite3.Connection, keys: list[str]) -> dict[str, tuple[str, int]]:
    """``key -> (segment, offset)`` of the rows of ``keys`` that point to a record."""
    found: dict[str, tuple[str, int]] = {}
    unique = list(dict.fromkeys(keys))
    for i in range(0, len(unique), 500):
        part = unique[i : i + 500]
        marks = ",".join("?" * len(part))
        cur = conn.execute(
            f"SELECT key, segment, offset FROM entries WHERE key IN ({marks}) "
            "AND segment IS NOT NULL",
            part,
        )
        found.update((k, (seg, off)) for k, seg, off in cur.fetchall())
    return found


def _drop_record(req: PutRequest, found: tuple[str, int] | None) -> None:
    """Mark the record the key's row points to dead before the row changes (see
    :func:`.segments.kill_records`)."""
    if found is not None and kill_records(req.root, [found]):
        raise OSError(errno.EIO, f"segment {found[0]} cannot be written")


def _gone_segments(reqs: Sequence[PutRequest]) -> set[str]:
    """The segment files of ``reqs`` that no longer exist (compacted away after the records
    were appended; under the write lock, as compaction's unlink): no row may point there."""
    files = {r.segment_file for r in reqs if r.segment_file is not None}
    return {f for f in files if not os.path.exists(f)}


def _lookup(conn: sqlite3.Connection, select: str, keys: list[str]) -> dict[str, int]:
    """``key -> value`` of the rows of ``keys`` that exist: ``select`` (``SELECT key, <column>
    FROM <table>``) with ``WHERE key IN (...)``, one query per 500 keys."""
    found: dict[str, int] = {}
    unique = list(dict.fromkeys(keys))
    for i in range(0, len(unique), 500):
        part = unique[i : i + 500]
        marks = ",".join("?" * len(part))
        found.update(conn.execute(f"{select} WHERE key IN ({marks})", part).fetchall())
    return found


def _commit_one(
    conn: sqlite3.Connection,
    req: PutRequest,
    capacity: int,
    make_space: Callable[[sqlite3.Connection, str], None],
) -> bool:
    if _gone_segments([req]):
        return False
    if req.fetch_started_ns is not None:
        if rows.is_stale(conn, req.key, req.fetch_started_ns):
            return False
    else:
        # an authoritative write: older in-flight fetches of the key must be refused
        rows.tombstone(conn, req.key, req.write_ns)
    found = conn.execute(
        "SELECT segment, offset FROM entries WHERE key = ? AND segment IS NOT NULL", (req.key,)
    ).fetchone()
    _drop_record(req, found)
    for path in req.paths:  # the key's file of either kind: the new row owns the key
        unlink_missing_ok(path)
    _upsert(conn, req)
    if rows.used(conn) > capacity:
        make_space(conn, req.key)
    return True


def _upsert(conn: sqlite3.Connection, req: PutRequest) -> None:
    conn.execute(rows.UPSERT, _row(req))


def _row(req: PutRequest) -> tuple[object, ...]:
    now = req.write_ns / 1e9
    return (
        req.key,
        req.namespace,
        req.kind,
        req.size,
        now,
        now,
        req.expires,
        req.checksum,
        req.token,
        req.segment,
        req.offset,
    )


def place_file(conn: sqlite3.Connection, req: PutRequest) -> bool:
    """Transaction 2: rename the temp file into place if the row is still ours.

    Returns False if the row was deleted, evicted or overwritten meanwhile. If the rename
    fails, the row is deleted (no row may promise a file that will not come) and the error
    raised.
    """
    with txn(conn):
        row = conn.execute("SELECT token FROM entries WHERE key = ?", (req.key,)).fetchone()
        placed = _place_one(conn, req, None if row is None else row[0])
    if isinstance(placed, OSError):
        raise placed
    return placed


def place_files(conn: sqlite3.Connection, reqs: Sequence[PutRequest]) -> list[bool | OSError]:
    """Transaction 2 of several ``put`` calls, in one transaction (see :func:`place_file`).

    Returns, for each request, whether its file was placed, or the error of its rename (its
    row is then deleted; the other requests are not affected).
    """
    last = {req.key: i for i, req in enumerate(reqs)}  # a later fill of a key wins
    with txn(conn):
        tokens = _lookup(conn, "SELECT key, token FROM entries", [r.key for r in reqs])
        return [
            _place_one(conn, req, tokens.get(req.key)) if last[req.key] == i else False
            for i, req in enumerate(reqs)
        ]


def _place_one(conn: sqlite3.Connection, req: PutRequest, token: int | None) -> bool | OSError:
    """Rename the temp file of ``req`` into place if ``token`` (its row's) is still ours."""
    if req.segment is not None:
        # a record: nothing to place; it was stored when its row committed (readable since,
        # and counted by whoever evicted, deleted or replaced it meanwhile)
        return True
    if token != req.token:
        return False  # deleted, evicted or overwritten meanwhile
    hooks.fire("before-replace", req.temp, req.final)
    try:
        os.replace(req.temp, req.final)
    except OSError as exc:
        conn.execute("DELETE FROM entries WHERE key = ? AND token = ?", (req.key, req.token))
        return exc
    hooks.fire("after-replace", req.final)
    return True


@dataclasses.dataclass(frozen=True, slots=True)
class Room:
    """What :func:`make_room` did."""

    #: rows deleted (committed) and their payload bytes
    evicted: int
    evicted_bytes: int
    wal_shrunk: bool
    #: victims whose files were unlinked or records marked dead (space freed, even if their
    #: rows could not be deleted now)
    victims: int = 0


def make_room(
    conn: sqlite3.Connection, root: str, db_path: str, nbytes: int, on_error: rows.OnError
) -> Room:
    """Evict least recently used entries worth about ``2 * nbytes`` (the disk is full),
    then checkpoint and truncate the WAL.

    Victims are chosen inside the write transaction; their files are unlinked before their
    rows are deleted, so space is freed even if the commit fails now (rows without file are
    allowed and cleaned later).
    """
    victims: list[rows.Row] = []
    got = 0
    evicted = evicted_bytes = 0
    try:
        with txn(conn):
            # the victims are read in the transaction that removes them: a row changed by
            # another process meanwhile is never deleted in place of the one whose record dies
            candidates = conn.execute(
                f"SELECT {rows.ROW} FROM entries ORDER BY last_access LIMIT {_ROOM_CANDIDATES}"
            ).fetchall()
            for row in candidates:
                if got >= 2 * nbytes:
                    break
                victims.append(row)
                got += row[2]
            if victims:
                # exactly the rows deleted (a row whose file cannot be unlinked is kept)
                counted = rows.remove_rows_counted(conn, root, victims, on_error)
        if victims:
            evicted, evicted_bytes = counted  # committed: those rows are gone
    except sqlite3.OperationalError:
        pass  # files unlinked are gone; their rows go (and count) at the next eviction or verify
    wal = db_path + "-wal"
    before = os.path.getsize(wal) if os.path.exists(wal) else 0
    with contextlib.suppress(sqlite3.OperationalError):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    after = os.path.getsize(wal) if os.path.exists(wal) else 0
    return Room(evicted, evicted_bytes, after < before, len(victims))
