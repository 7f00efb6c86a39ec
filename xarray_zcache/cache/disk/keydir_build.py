"""Where a location map comes from (:mod:`.keydir`): the hint file checked against the
index, a scan of the index's rows, and changes folded into the arrays.

Nothing here holds state or a lock: each function reads what it is given (a connection, the
arrays as they were) and returns a new value, so :class:`.keydir.KeyDir` can call the slow
ones (a scan of a million rows, a fold of a hundred thousand changes) without its lock.
"""

from __future__ import annotations

import array
import hashlib
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import numpy as np

from xarray_zcache.cache.disk import hint
from xarray_zcache.cache.disk.folder import file_id
from xarray_zcache.cache.disk.format import KINDS
from xarray_zcache.cache.disk.locations import ABSENT, Change, hash_of, mapped
from xarray_zcache.cache.disk.schema import BUSY_TIMEOUT_MS

#: Kind code of an entry the map cannot place (:data:`.locations.ASK`).
ASK_CODE: Final = 255
#: Segment code of an entry that is a payload file of its own.
FILE: Final = -1
#: Rows read at a time while building from the index.
SCAN_BATCH: Final = 20_000
_PAGE_CACHE_KIB: Final = 256

_SCAN: Final = (
    "SELECT key, kind, segment, offset, 72 + length(CAST(key AS BLOB)) + (CASE WHEN "
    "length(CAST(namespace AS BLOB)) <= 65535 THEN length(CAST(namespace AS BLOB)) ELSE 0 END)"
    " + size FROM entries"
)


class Drop(Exception):
    """The map cannot follow the index (replaced, or its log pruned past the map)."""


class Damaged(Exception):
    """The index's rows are not as SQLite keeps them: damage SQLite did not see."""


def connect(db_path: str) -> tuple[sqlite3.Connection, tuple[int, int] | None]:
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


def state(conn: sqlite3.Connection) -> tuple[str, int]:
    """The change log's epoch, and the last change pruned from it."""
    row = conn.execute("SELECT epoch, pruned FROM changes_state WHERE id = 0").fetchone()
    if row is None:
        raise Drop("the index has no change log")
    return str(row[0]), int(row[1])


def top(conn: sqlite3.Connection) -> int:
    """The last change logged (0: none yet)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    return 0 if row is None else int(row[0])


def change(conn: sqlite3.Connection, seq: int) -> str | None:
    """A digest of change ``seq`` as logged (None: not in the log, or 0)."""
    row = conn.execute(
        "SELECT key, kind, segment, offset, length FROM changes WHERE seq = ?", (seq,)
    ).fetchone()
    return None if row is None else hashlib.sha256(repr(tuple(row)).encode()).hexdigest()


def entry_count(conn: sqlite3.Connection) -> int | None:
    """The index's entry count (None: unreadable)."""
    row = conn.execute("SELECT count FROM totals WHERE id = 0").fetchone()
    return row[0] if row is not None and isinstance(row[0], int) else None


def load_hint(
    root: str, db_path: str
) -> tuple[sqlite3.Connection, tuple[int, int] | None, hint.Hint] | None:
    """The hint file of ``root`` if it belongs to the index (its epoch), the log still holds
    every change since, and the index has not gone back to before it; with a connection to
    the index. None: no readable hint. Raises :class:`Drop` when it is not to be used."""
    loaded = hint.read(root)
    if loaded is None:
        return None
    conn, db_id = connect(db_path)
    try:
        conn.execute("BEGIN")
        try:
            epoch, pruned = state(conn)
            last = change(conn, loaded.seq)
        finally:
            conn.execute("COMMIT")
        if epoch != loaded.epoch or pruned > loaded.seq:
            raise Drop("the hint is of another index, or older than the change log")
        if last != loaded.last:
            # the index went back in time (lost WAL frames) and maybe on: another history
            raise Drop("the hint's last change is not the index's")
    except BaseException:
        conn.close()
        raise
    return conn, db_id, loaded


def scan(conn: sqlite3.Connection, stopped: Callable[[], bool]) -> hint.Hint | None:
    """The map of the rows, with the change it reflects (one read transaction); None if
    ``stopped()`` said so between two batches."""
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
        epoch, _pruned = state(conn)
        seq = top(conn)
        last = change(conn, seq)
        cur = conn.execute(_SCAN)
        previous: str | None = None
        while batch := cur.fetchmany(SCAN_BATCH):
            if stopped():
                return None
            for key, kind, segment, offset, length in batch:
                if previous is not None and key <= previous:
                    # a lookup by key would not find every row a scan finds: the map would
                    # hold keys that deletes cannot reach (UTF-8 order is the code point
                    # order SQLite's BINARY collation gives)
                    raise Damaged(f"rows out of key order at {key!r}")
                previous = key
                if not mapped(key):
                    continue
                hashes.append(hash_of(key))
                kinds.append(kind_codes.get(kind, ASK_CODE))
                if segment is None:
                    segments.append(FILE)
                else:
                    segments.append(names.setdefault(segment, len(names)))
                offsets.append(offset or 0)
                lengths.append(length)
    finally:
        conn.execute("COMMIT")
    arrays = hint.Arrays.build(hashes, kinds, segments, offsets, lengths)
    return hint.Hint(epoch, seq, last, list(names), arrays)


def fold(
    arrays: hint.Arrays, changes: Mapping[int, Change], segments: Sequence[str]
) -> tuple[hint.Arrays, list[str]]:
    """``arrays`` with ``changes`` (hash -> a location's tuple, ABSENT or ASK) folded in,
    and the segment names their codes refer to: ``segments`` (whose codes ``arrays`` use)
    with the new names appended. Neither argument is changed."""
    names = list(segments)
    ids = {name: i for i, name in enumerate(names)}

    def segment_code(segment: str | None) -> int:
        if segment is None:
            return FILE
        code = ids.get(segment)
        if code is None:
            code = ids[segment] = len(names)
            names.append(segment)
        return code

    if not changes:
        return arrays, names
    changed = np.fromiter(changes.keys(), dtype=np.uint64, count=len(changes))
    hashes: list[int] = []
    kinds: list[int] = []
    codes: list[int] = []
    offsets: list[int] = []
    lengths: list[int] = []
    kind_codes = {kind: n for n, kind in enumerate(KINDS)}
    for h, change in changes.items():
        if change is ABSENT:
            continue
        hashes.append(h)
        if isinstance(change, str):  # ASK
            kinds.append(ASK_CODE)
            codes.append(FILE)
            offsets.append(0)
            lengths.append(0)
        else:
            kind, segment, offset, length = change
            kinds.append(kind_codes[kind])
            codes.append(segment_code(segment))
            offsets.append(offset)
            lengths.append(length)
    new = hint.Arrays.build(hashes, kinds, codes, offsets, lengths)
    return arrays.without(changed).merged(new), names


def used_segments(arrays: hint.Arrays, segments: Sequence[str]) -> tuple[hint.Arrays, list[str]]:
    """``arrays`` with their segment codes renumbered to the names they use, and those names
    (what a hint stores: no name of a segment compacted away)."""
    used = np.unique(arrays.segments[arrays.segments != FILE])
    remap = np.full(len(segments) + 1, FILE, dtype=np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    codes = np.where(arrays.segments == FILE, FILE, remap[arrays.segments]).astype(np.int32)
    return hint.Arrays(arrays.hashes, arrays.kinds, codes, arrays.offsets, arrays.lengths), [
        segments[int(i)] for i in used
    ]
