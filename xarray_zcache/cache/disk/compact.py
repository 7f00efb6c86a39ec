"""Compaction: giving back the dead bytes of sealed segments (:mod:`.segments`).

A record becomes dead bytes when its row is deleted or changed (delete, overwrite, eviction,
expiry); a segment file only shrinks by going away. A *sealed* segment (its writer's lock is
free: the writer moved on or is gone) is compacted when

* no row points into it (it is simply unlinked), or
* at least :data:`DEAD_FRACTION` of it is dead, or
* the dead bytes of all sealed segments exceed :func:`dead_limit` (``capacity / 4``): then
  the segments with the most dead bytes go first, until they do not.

Compacting copies the live records (each checked: a damaged one loses its row and counts as
a corruption; one marked dead, its row unchanged, loses its row too: a miss, not damage)
to the compactor's current segment, then moves their rows in one transaction
per group, each ``UPDATE`` conditioned on the row still carrying the token, segment and
offset it had when read: a concurrent delete or overwrite wins, its copy is dead bytes.
The old segment is unlinked, in a write transaction, once no row points into it; a writer
whose records went into it commits no row there afterwards (it checks, under the same lock,
that the file exists).

**Bound on disk space.** Payload bytes of live entries are at most ``capacity`` (eviction);
on top of that the folder holds, per small live entry, its record header (72 bytes + key +
namespace), dead bytes of sealed segments up to ``capacity / 4`` (between two checks, which
run each quarter segment appended, plus what deletes left since the last check), and the
current segment of each writing tier (at most :func:`.segments.seal_size` each, dead or
alive), plus the index and its WAL. ``tests/test_disk_tier_segments.py`` checks it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import sqlite3
from collections.abc import Iterator
from typing import Final

from xarray_zcache.cache.disk.folder import scandir
from xarray_zcache.cache.disk.format import digest, pread_exact
from xarray_zcache.cache.disk.index import Index
from xarray_zcache.cache.disk.schema import txn
from xarray_zcache.cache.disk.segments import (
    DELETED,
    FdCache,
    SegmentWriter,
    check_record,
    is_segment_name,
    kill_records,
    record_length,
    segment_dir,
    segment_path,
    try_lock,
)

#: A sealed segment at least this dead is compacted whatever the total.
DEAD_FRACTION: Final = 0.5
#: Live bytes copied per transaction.
_GROUP_BYTES: Final = 8 * 1024 * 1024

_MOVE: Final = (
    "UPDATE entries SET segment = ?, offset = ? "
    "WHERE key = ? AND token = ? AND segment = ? AND offset = ?"
)
_DROP: Final = "DELETE FROM entries WHERE key = ? AND token = ? AND segment = ? AND offset = ?"


def dead_limit(capacity: int) -> int:
    """Dead bytes of sealed segments above which the deadest are compacted."""
    return capacity // 4


@dataclasses.dataclass(frozen=True, slots=True)
class Compaction:
    """What compaction works with: the tier's folder, index, writer and read descriptors."""

    root: str
    index: Index
    writer: SegmentWriter
    fds: FdCache
    capacity: int


@dataclasses.dataclass(slots=True)
class Done:
    """What :func:`compact` did."""

    freed: int = 0
    compacted: int = 0
    corrupt: int = 0


def segment_sizes(root: str) -> dict[str, int]:
    """Segment file name -> size, for the segment files of ``root``."""
    sizes: dict[str, int] = {}
    for entry in scandir(segment_dir(root)):
        if is_segment_name(entry.name):
            with contextlib.suppress(OSError):
                sizes[entry.name] = entry.stat().st_size
    return sizes


def compact(job: Compaction) -> Done:
    """Compact the sealed segments that are due (see the module doc)."""
    done = Done()
    sizes = segment_sizes(job.root)
    sizes.pop(job.writer.current or "", None)
    if not sizes:
        return done
    live = dict(
        job.index.run(
            "reading segment totals",
            lambda conn: conn.execute("SELECT name, live FROM segments").fetchall(),
        )
    )
    dead = {name: max(0, size - max(0, live.get(name, 0))) for name, size in sizes.items()}
    total = sum(dead.values())
    limit = dead_limit(job.capacity)
    error: OSError | None = None
    # wholly dead segments first (nothing to copy: they free space even on a full disk)
    for name in sorted(dead, key=lambda n: (dead[n] < sizes[n], -dead[n])):
        size = sizes[name]
        due = dead[name] >= size or dead[name] >= DEAD_FRACTION * size or total > limit
        if not due or dead[name] == 0:
            continue
        try:
            if not _compact_one(job, name, done):
                continue
        except OSError as exc:  # (a full disk: copies cannot be written) try the others
            error = error or exc
            continue
        done.freed += dead[name]
        done.compacted += 1
        total -= dead[name]
    if error is not None and not done.compacted:
        raise error
    return done


def free_segment(job: Compaction) -> tuple[int, int, int]:
    """Drop every row of the sealed, non-empty segment with the fewest live bytes and unlink
    it, copying nothing: space for a full disk. Returns ``(entries, payload bytes)`` evicted
    and the bytes of the file."""
    sizes = segment_sizes(job.root)
    sizes.pop(job.writer.current or "", None)
    live = dict(
        job.index.run(
            "reading segment totals",
            lambda conn: conn.execute("SELECT name, live FROM segments").fetchall(),
        )
    )
    for name in sorted((n for n in sizes if sizes[n] > 0), key=lambda n: live.get(n, 0)):
        path = segment_path(job.root, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if not try_lock(fd):
                continue

            n, freed = job.index.run(
                "freeing a segment", functools.partial(_free, path=path, name=name)
            )
            return n, freed, sizes[name]
        finally:
            os.close(fd)
            job.fds.forget(name)
    return 0, 0, 0


def _compact_one(job: Compaction, name: str, done: Done) -> bool:
    """Copy the live records of segment ``name`` away and unlink it; whether it went."""
    path = segment_path(job.root, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if not try_lock(fd):
            return False  # its writer still appends to it
        found = job.index.run(
            "reading a segment's rows",
            lambda conn: conn.execute(
                "SELECT key, offset, size, namespace, token FROM entries "
                "WHERE segment = ? ORDER BY offset",
                (name,),
            ).fetchall(),
        )
        for group in _groups(found):
            _move(job, fd, name, group, done)
        return bool(job.index.run("removing a compacted segment", lambda c: _drop(c, path, name)))
    finally:
        os.close(fd)  # releases the lock
        job.fds.forget(name)


def _groups(
    found: list[tuple[str, int, int, str, int]],
) -> Iterator[list[tuple[str, int, int, str, int]]]:
    group: list[tuple[str, int, int, str, int]] = []
    size = 0
    for row in found:
        group.append(row)
        size += row[2]
        if size >= _GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def _move(
    job: Compaction, fd: int, name: str, group: list[tuple[str, int, int, str, int]], done: Done
) -> None:
    """Copy one group of live records to the current segment and move their rows."""
    keep: list[tuple[str, int, int]] = []
    records: list[tuple[bytes, bytes]] = []
    bad: list[tuple[str, int, str, int]] = []
    dead: list[tuple[str, int, str, int]] = []
    for key, offset, size, namespace, token in group:
        if not isinstance(offset, int):
            continue
        key_bytes = key.encode("utf-8")
        length = record_length(key_bytes, namespace.encode("utf-8"), size)
        data = pread_exact(fd, length, offset)
        problem, header, payload = check_record(data, length, digest(key), key_bytes)
        if problem == DELETED:  # marked dead, its row not changed (a crash, an index gone
            dead.append((key, token, name, offset))  # back in time): a miss, not damage
            continue
        if problem is not None or header is None:
            bad.append((key, token, name, offset))
            continue
        keep.append((key, token, offset))
        records.append((data[: header.offset], payload))
    where = job.writer.append(records) if records else []

    def commit(conn: sqlite3.Connection) -> int:
        with txn(conn):
            moved = [
                (segment, new, key, token, name, old)
                for (key, token, old), (segment, new) in zip(keep, where, strict=True)
                if os.path.exists(segment_path(job.root, segment))
            ]
            done_moves = [m for m in moved if conn.execute(_MOVE, m).rowcount]
            # the originals are dead now: an older index state must not find them alive
            failed = kill_records(job.root, [(name, m[5]) for m in done_moves])
            if failed:
                raise OSError(errno.EIO, f"segment {name} cannot be written")
            for row in dead:
                conn.execute(_DROP, row)
            dropped = 0
            for row in bad:
                dropped += conn.execute(_DROP, row).rowcount
            return dropped

    done.corrupt += job.index.run("compacting a segment", commit)


def _free(conn: sqlite3.Connection, *, path: str, name: str) -> tuple[int, int]:
    """Unlink segment ``name``, then delete its rows. The file goes first, so that the space
    comes back even if the index cannot be written now (a full disk): a row left pointing
    into it reads as a miss and is dropped then (no record needs marking dead). Returns the
    rows deleted (0 if the index could not be written) and their payload bytes."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    try:
        with txn(conn):
            (freed,) = conn.execute(
                "SELECT COALESCE(SUM(size), 0) FROM entries WHERE segment = ?", (name,)
            ).fetchone()
            n = conn.execute("DELETE FROM entries WHERE segment = ?", (name,)).rowcount
            conn.execute("DELETE FROM segments WHERE name = ?", (name,))
    except sqlite3.OperationalError:
        return 0, 0  # nothing deleted (yet): those rows read as misses and go later
    return int(n), int(freed)


def _drop(conn: sqlite3.Connection, path: str, name: str) -> bool:
    with txn(conn):
        if conn.execute("SELECT 1 FROM entries WHERE segment = ? LIMIT 1", (name,)).fetchone():
            return False  # a row came in meanwhile (a late commit of its writer): next time
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        conn.execute("DELETE FROM segments WHERE name = ?", (name,))
    return True
