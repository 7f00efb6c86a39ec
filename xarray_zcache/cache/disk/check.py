"""``verify`` and the filling of a new index from the payload files (``rebuild_index``)."""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Callable

from xarray_zcache.cache.disk import rows, scan, segments
from xarray_zcache.cache.disk.format import digest
from xarray_zcache.cache.disk.index import Index
from xarray_zcache.cache.disk.schema import as_damage, txn


def verify(index: Index, *, repair: bool) -> dict[str, int]:
    """See ``DiskTier.verify``; runs in one write transaction, holding ``index.lock``.

    Unlike other operations this does not use ``Index.run``: without ``repair`` a damaged
    index must be reported, not replaced.
    """
    counts = dict.fromkeys(scan.VERIFY_COUNTS, 0)
    with index.lock:
        conn = index.require()
        damage: sqlite3.DatabaseError | None = None
        try:
            damaged = conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
        except (sqlite3.DatabaseError, TypeError, ValueError) as exc:
            damage = as_damage(exc)
            if damage is None:
                raise
            damaged = True
        if damaged:
            counts["index_damaged"] = 1
            if not repair:
                scan.verify_files(index.root, None, counts, repair=False)
                return counts
            damage = damage or sqlite3.DatabaseError("integrity_check failed")
            conn = index.recover(damage, "verifying", conn)
        snapshot = dict(counts)
        try:
            with txn(conn):
                _verify_rows(conn, index.root, counts, repair=repair)
        except (sqlite3.DatabaseError, TypeError, ValueError) as exc:
            # damage SQLite's integrity check does not see (undecodable text...)
            damage = as_damage(exc)
            if damage is None:
                raise
            counts.clear()
            counts.update(snapshot, index_damaged=1)
            if not repair:
                scan.verify_files(index.root, None, counts, repair=False)
            else:
                conn = index.recover(damage, "verifying", conn)
                with txn(conn):
                    _verify_rows(conn, index.root, counts, repair=True)
    return counts


def _verify_rows(
    conn: sqlite3.Connection, root: str, counts: dict[str, int], *, repair: bool
) -> None:
    """The file pass of ``verify`` against the rows (in a transaction)."""
    found: dict[tuple[str, str], tuple[str, int, int]] = {}
    records: list[tuple[str, str, int, int, str, int]] = []
    cur = conn.execute("SELECT key, kind, size, checksum, segment, offset, namespace FROM entries")
    for key, kind, size, checksum, segment, offset, namespace in cur:
        if segment is None:
            found[(digest(key).hex(), kind)] = (key, size, checksum)
        else:
            records.append((key, segment, offset, size, namespace, checksum))
    bad_keys = scan.verify_files(root, found, counts, repair=repair)
    bad_keys += _verify_records(root, records, counts)
    if repair:
        conn.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in bad_keys])
        rows.recount(conn)
        conn.execute(
            "UPDATE totals SET horizon = ? WHERE id = 0 AND horizon > ?",
            (time.time_ns(), time.time_ns() + rows.HORIZON_SLACK_NS),
        )


def _verify_records(
    root: str, records: list[tuple[str, str, int, int, str, int]], counts: dict[str, int]
) -> list[str]:
    """Check the record of each segment row (header, key, both checksums, the row's size and
    checksum); the keys whose record is damaged (``corrupt``) or whose segment is gone
    (``missing_files``)."""
    bad: list[str] = []
    fds: dict[str, int | None] = {}
    try:
        for key, segment, offset, size, namespace, checksum in sorted(
            records, key=lambda r: (r[1], r[2])
        ):
            if segment not in fds:
                try:
                    fds[segment] = os.open(segments.segment_path(root, segment), os.O_RDONLY)
                except OSError:
                    fds[segment] = None
            fd = fds[segment]
            if fd is None:
                counts["missing_files"] += 1
                bad.append(key)
                continue
            key_bytes = key.encode("utf-8")
            length = segments.record_length(key_bytes, namespace.encode("utf-8"), size)
            try:
                problem, header, _payload = segments.read_record(
                    fd, offset, length, digest(key), key_bytes
                )
            except OSError as exc:
                problem, header = f"unreadable: {exc.strerror}", None
            if problem is None and header is not None and header.crc != checksum:
                problem = "checksum differs from the index"
            if problem is not None or header is None:
                counts["corrupt"] += 1
                bad.append(key)
            else:
                counts["ok"] += 1
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
    return bad


def fill_from_files(
    conn: sqlite3.Connection,
    root: str,
    capacity: int,
    shrink: Callable[[sqlite3.Connection, float], None],
) -> dict[str, int]:
    """Fill the (new, empty) index ``conn`` from the payload files (folder lock held).

    Records in segment files are not recovered: a dead record (deleted, overwritten, evicted)
    cannot be told from a live one without the index, so recovering them could serve a value
    that was deleted or replaced. Those entries are misses (fetched again from the source);
    their segments hold dead bytes only and are removed by compaction.

    ``shrink(conn, now)`` is called in the transaction if the entries exceed ``capacity``.
    Returns the counts of ``rebuild_index``.
    """
    counts = dict.fromkeys(scan.REBUILD_COUNTS, 0)
    now = time.time()
    found = scan.collect_entries(root, counts)
    new_rows = [
        (
            e.key,
            e.header.namespace.decode("utf-8", "replace"),
            e.kind,
            e.header.length,
            e.mtime,
            e.mtime,
            None if math.isinf(e.header.expires) else e.header.expires,
            e.header.crc,
            0,
            None,
            None,
        )
        for e in found
    ]
    with txn(conn):
        conn.execute("DELETE FROM entries")
        conn.executemany(rows.UPSERT, new_rows)
        rows.recount(conn)
        # the tombstones are lost: refuse every fill whose fetch started before now
        conn.execute("UPDATE totals SET horizon = MAX(horizon, ?) WHERE id = 0", (time.time_ns(),))
        if rows.used(conn) > capacity:
            shrink(conn, now)
    counts["indexed"] = len(new_rows)
    return counts
