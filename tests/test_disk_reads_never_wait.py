"""A disk read never waits for a writer (``reads.py``, ``_drop_row``): a read that finds
the record its row points to dead (a writer replacing it at that moment, or an index gone
back in time) or expired is a miss at once, and the row is dropped later, by a read that
finds the index free."""

from __future__ import annotations

import contextlib
import pathlib
import sqlite3
import time

from keydir_helpers import KEYS, filled, tier, value

from xarray_zcache.cache.disk import DiskTier
from xarray_zcache.cache.disk.segments import SEGMENT_THRESHOLD, kill_records


def _row(path: pathlib.Path, key: str) -> tuple[str, int] | None:
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        row = conn.execute("SELECT segment, offset FROM entries WHERE key = ?", (key,)).fetchone()
    return None if row is None else (row[0], row[1])


def test_a_dead_record_is_a_miss_at_once_while_another_process_writes(
    tmp_path: pathlib.Path,
) -> None:
    """Another connection holds the index's write lock (as a writer process's batch does)
    while a read meets a dead record: the read returns a miss without waiting out the busy
    timeout (30 s); once the lock is free, the next read drops the row."""
    path = tmp_path / "c"
    filled(path)
    key = KEYS[7]
    at = _row(path, key)
    assert at is not None and at[0] is not None
    # the row stays, its record dies (an index gone back to before the record was replaced)
    # (the index's own path: no location map)
    with DiskTier(path, 1 << 30, segment_threshold=SEGMENT_THRESHOLD, location_map=False) as t:
        assert not kill_records(str(path), [at])
        writer = sqlite3.connect(path / "index.db", isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # the write lock, held
            t0 = time.monotonic()
            assert t.get(key) is None
            assert time.monotonic() - t0 < 5
            assert _row(path, key) == at  # not dropped: the index was busy
            writer.execute("COMMIT")
        finally:
            writer.close()
        assert t.get(key) is None  # the lock is free: dropped now
        assert _row(path, key) is None
        assert t.corruptions == 0  # a dead record is not damage
        assert all(t.get(k) == value(k) for k in KEYS if k != key)


def test_a_dead_record_is_a_miss_at_once_while_this_process_writes(
    tmp_path: pathlib.Path,
) -> None:
    """The same while this process's own index lock is held (a batch of fills)."""
    path = tmp_path / "c"
    filled(path)
    key = KEYS[9]
    at = _row(path, key)
    assert at is not None
    with tier(path) as t:
        assert not kill_records(str(path), [at])
        with t._index.lock:
            assert t.get(key) is None
        assert _row(path, key) == at
        assert t.get(key) is None
        assert _row(path, key) is None
