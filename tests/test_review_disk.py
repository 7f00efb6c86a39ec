"""Adversarial review of the disk tier with packing on by default and index schema 4.

Each test reproduces one finding of the review (docs in the test); the figures of a tier
(evictions, corruptions) must be exact, whatever fails in between.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
import subprocess
from collections.abc import Iterator

import pytest
from entry_location import locate
from keydir_helpers import extract_package

from xarray_zcache.cache.disk import DiskTier, Fill
from xarray_zcache.cache.disk.format import digest, payload_path
from xarray_zcache.cache.disk.segments import DEAD_MAGIC, SEGMENT_THRESHOLD


def _tier(path: pathlib.Path, capacity: int = 1 << 30) -> DiskTier:
    return DiskTier(path, capacity, segment_threshold=SEGMENT_THRESHOLD)


def _undeletable(path: str) -> None:
    """Make ``path`` something ``unlink`` and ``open(O_WRONLY)`` refuse (even as root): a
    non-empty directory in place of the file."""
    os.unlink(path)
    os.mkdir(path)
    with open(os.path.join(path, "x"), "wb"):
        pass


def test_make_room_counts_only_the_entries_it_removed(tmp_path: pathlib.Path) -> None:
    """A full disk's ``make_room`` counted every victim it chose as evicted, also one whose
    file could not be unlinked (its row is kept: the entry is still there)."""
    with _tier(tmp_path / "c", 10 << 20) as t:
        assert t.put("big", b"x" * 100_000)  # a payload file of its own
        _undeletable(payload_path(t._root, digest("big").hex(), "chunk"))
        before = t.evictions
        t._make_room(50_000)
        assert "big" in t  # its row is kept: nothing was evicted
        assert t.evictions == before


def test_an_eviction_rolled_back_is_not_counted(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    with _tier(path, 10_000) as t:
        assert t.put("A", b"a" * 4000)
        assert t.put("B", b"b" * 4000)
        with _tier(path, 10_000) as other:  # X in a segment of its own (sealed at close)
            assert other.put("X", b"x" * 100)
        x = locate(path, "X")
        assert x.in_segment
        _undeletable(str(x.path))  # X's record cannot be marked dead: its overwrite fails
        # N needs room (A is evicted in the batch's transaction); X's overwrite then fails and
        # the whole transaction rolls back: A's row is back
        assert t.put_many([Fill("N", b"n" * 3000), Fill("X", b"y" * 100)]) == [False, False]
        assert "A" in t
        assert t.evictions == 0, "an eviction rolled back was counted"


def test_compaction_counts_a_dead_record_as_no_corruption(tmp_path: pathlib.Path) -> None:
    """A row pointing to a record marked dead (a crash after the record of an overwrite or
    delete was marked dead, before its transaction committed; an index gone back in time) is
    a miss for ``get`` (not damage); compaction counted it as a corruption."""
    path = tmp_path / "c"
    with _tier(path) as t:
        assert t.put_many([Fill(f"k/{i}", b"%03d" % i * 100) for i in range(20)]) == [True] * 20
    # as left by a crash between kill_records and the commit of an overwrite of k/19
    k19 = locate(path, "k/19")
    with open(k19.path, "r+b") as f:
        f.seek(k19.start)
        f.write(DEAD_MAGIC)
    with _tier(path) as t:  # the segment is sealed now
        for i in range(15):
            t.delete(f"k/{i}")  # most of it dead: due for compaction
        assert t.compact() > 0
        assert t.compactions == 1
        assert t.corruptions == 0, "a dead record counted as a corruption"
        assert t.get("k/19") is None
        for i in range(15, 19):
            assert t.get(f"k/{i}") == b"%03d" % i * 100


_WRITER = r"""
import mmap, os, random, struct, sys, time
from xarray_zcache.cache.disk import DiskTier
path, floors, seconds, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
t = DiskTier(path, 4 << 20)
f = open(floors, "r+b")
m = mmap.mmap(f.fileno(), 8 * n)
rng = random.Random(7)
version = 0
end = time.monotonic() + seconds
ops = 0
while time.monotonic() < end:
    i = rng.randrange(n)
    version += 1
    if rng.random() < 0.8:
        value = (b"k%d v%d|" % (i, version)) * rng.randrange(5, 300)
        t.put(f"k/{i}", value)
    else:
        t.delete(f"k/{i}")
    m[8 * i : 8 * i + 8] = struct.pack("<q", version)  # done: nothing older may be read now
    ops += 1
t.close()
print(ops, t.compactions)
"""


def test_hits_on_the_read_connection_never_serve_an_older_value_than_a_finished_write(
    tmp_path: pathlib.Path,
) -> None:
    """Another process overwrites and deletes keys (its segments sealed and compacted as it
    goes) while this one reads them, with its index lock held most of the time (a statistics
    flush, a compaction: hits then go to the read connection): a hit is never a value older
    than the last write or delete finished before the ``get`` started."""
    import mmap
    import random
    import struct
    import subprocess
    import sys
    import threading
    import time

    path, n, seconds = tmp_path / "c", 200, 15.0
    floors = tmp_path / "floors"
    floors.write_bytes(bytes(8 * n))
    t = _tier(path, 4 << 20)
    stop = threading.Event()

    def hold_the_lock() -> None:  # as a long flush would, and compact now and then
        k = 0
        while not stop.is_set():
            with t._index.lock:
                time.sleep(0.002)
            k += 1
            if k % 50 == 0:
                t.compact()

    holder = threading.Thread(target=hold_the_lock, daemon=True)
    holder.start()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(floors), str(seconds), str(n)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    bad: list[tuple[int, int, int]] = []
    hits = 0
    rng = random.Random(3)
    with open(floors, "r+b") as f:
        m = mmap.mmap(f.fileno(), 8 * n)
        try:
            while writer.poll() is None:
                i = rng.randrange(n)
                (floor,) = struct.unpack("<q", m[8 * i : 8 * i + 8])
                got = t.get(f"k/{i}")
                if got is None:
                    continue
                hits += 1
                head = got.split(b"|", 1)[0] + b"|"
                ki, vi = head[:-1].split(b" ")
                whole = got == head * (len(got) // len(head))
                if ki != b"k%d" % i or int(vi[1:]) < floor or not whole:
                    bad.append((i, int(vi[1:]), floor))
        finally:
            stop.set()
            holder.join()
            m.close()
            out, _ = writer.communicate(timeout=60)
            t.close()
    assert writer.returncode == 0
    ops, compactions = map(int, out.split())
    assert hits > 100 and ops > 100 and compactions > 0, (hits, ops, compactions)
    assert bad == [], bad[:10]


def test_delete_prefix_counts_only_the_entries_it_removed(tmp_path: pathlib.Path) -> None:
    """``delete_prefix`` returned every key it tried, also one whose file could not be
    unlinked (its row is kept)."""
    with _tier(tmp_path / "c") as t:
        assert t.put("p/big", b"x" * 100_000)  # a payload file
        assert t.put("p/small", b"y" * 100)  # a record
        _undeletable(payload_path(t._root, digest("p/big").hex(), "chunk"))
        assert t.delete_prefix("p/") == 1  # p/small only
        assert "p/big" in t and "p/small" not in t


@contextlib.contextmanager
def _read_only(folder: pathlib.Path) -> Iterator[bool]:
    """``folder`` read-only (a read-only bind mount, as after a filesystem error: EROFS on
    every write, reads fine); yields False if it cannot be done here."""
    done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if done.returncode != 0:
        yield False
        return
    try:
        ro = subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True
        ).returncode
        yield ro == 0
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_value_deleted_by_prefix_is_never_served_when_its_segment_is_read_only(
    tmp_path: pathlib.Path,
) -> None:
    with _tier(tmp_path / "c") as t:
        assert t.put("p/1", b"deleted value" * 10)
        assert t.put("q/1", b"other" * 10)
        with _read_only(t.path / "segments") as ok:
            if not ok:
                pytest.skip("cannot bind-mount read-only here (needs root)")
            t.delete_prefix("p/")  # no error raised: the caller believes p/1 is gone
            assert t.get("p/1") is None, "a deleted value is still served"


#: The last commit whose index is of schema 2 (before segment files): an old process.
_SCHEMA_2_COMMIT = "0a1fb41ab6abd90c4e4bbe80c856b46ed24ce74a"

_SCHEMA_2_PROCESS = r"""
import sys
from xarray_zcache.cache.disk import DiskTier, schema
assert schema.SCHEMA_VERSION == 2
t = DiskTier(sys.argv[1], 1 << 30)
assert t.put("K", b"v0" * 50)
print("ready", flush=True)
sys.stdin.readline()  # another process migrates the folder and writes K as a record
print(t.put("K", b"v2" * 50), flush=True)  # the latest value of K
sys.stdin.readline()
t.close()
"""


def test_a_schema_2_process_overwriting_a_record_after_the_migration_is_never_stale(
    tmp_path: pathlib.Path,
) -> None:
    import sys

    old_code = tmp_path / "schema2"
    old_code.mkdir()
    if not extract_package(_SCHEMA_2_COMMIT, old_code):
        pytest.skip("the schema-2 code is not in this checkout's history")
    path = tmp_path / "c"
    old = subprocess.Popen(
        [sys.executable, "-c", _SCHEMA_2_PROCESS, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(old_code)},
        cwd=old_code,  # (``-c`` puts the working directory first on sys.path)
    )
    try:
        assert old.stdout is not None and old.stdin is not None
        assert old.stdout.readline().strip() == "ready"
        with _tier(path) as t:  # migrates 2 -> 4 while the old process has it open
            assert t.put("K", b"v1" * 50)  # a record
            old.stdin.write("\n")
            old.stdin.flush()
            assert old.stdout.readline().strip() == "True"  # the old process stored v2
            assert t.get("K") in (None, b"v2" * 50), "an overwritten value is served"
            # the record's bytes left the segment's live count (its row points at a file now)
            with contextlib.closing(sqlite3.connect(path / "index.db")) as db:
                live = db.execute("SELECT COALESCE(SUM(live), 0) FROM segments").fetchone()[0]
                rows = db.execute(
                    "SELECT COUNT(*) FROM entries WHERE segment IS NOT NULL"
                ).fetchone()[0]
            assert (live, rows) == (0, 0)
    finally:
        if old.stdin is not None:
            old.stdin.write("\n")
            old.stdin.close()
        old.wait(timeout=60)


def test_a_deleted_record_is_not_served_by_another_tier_when_its_segment_is_read_only(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "c"
    with _tier(path) as t, _tier(path) as other:  # two tiers: as two processes
        assert t.put("K", b"deleted value" * 10)
        assert other.get("K") == b"deleted value" * 10
        with _read_only(t.path / "segments") as ok:
            if not ok:
                pytest.skip("cannot bind-mount read-only here (needs root)")
            t.delete("K")  # returns normally (owed here)
            assert t.get("K") is None
            assert other.get("K") is None, "a deleted value is still served by another tier"


def test_a_record_evicted_between_the_two_transactions_of_put_was_stored(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``put`` of a record returned False (not stored) when another process evicted its row
    between the commit of the row and the second transaction, which counted it as evicted:
    stores and evictions of the folder then disagree (two processes filling a small cache
    showed one entry more evicted than stored)."""
    from xarray_zcache.cache.disk import writes

    path = tmp_path / "c"
    with _tier(path) as t, _tier(path) as other:
        place = writes.place_file

        def evicted_meanwhile(conn: object, req: object) -> bool:
            other.evict(0)  # another process: the row committed a moment ago goes
            return place(conn, req)  # type: ignore[arg-type]

        monkeypatch.setattr(writes, "place_file", evicted_meanwhile)
        stored = t.put("K", b"k" * 100)
        assert other.evictions == 1  # K was there, and evicted
        assert stored, "a record whose row was committed (then evicted) reported not stored"
