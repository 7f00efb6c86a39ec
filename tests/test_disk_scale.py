"""The disk tier's batched fills, bounded eviction batches and single-read hits (issue 19).

Behaviour only (counts of transactions, system calls, entries), never wall-clock time: the
timings are in ``benchmarks/disk_scale.py``.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import threading
import time

import pytest
from entry_location import locate

from xarray_zcache.cache.disk import DiskTier, Fill, access, core, hooks, index, schema
from xarray_zcache.cache.disk.format import WHOLE_READ
from xarray_zcache.cache.writer import BATCH_ENTRIES, DiskWriter, PendingWrite

#: ``segment_threshold`` of each layout: every entry a payload file; small ones records
FILES, RECORDS = -1, 64 * 1024
LAYOUTS = pytest.mark.parametrize("threshold", [FILES, RECORDS], ids=["file", "record"])


def temp_files(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in root.rglob("*.tmp") if p.is_file()]


def count_commits(conn: sqlite3.Connection) -> list[str]:
    seen: list[str] = []
    conn.set_trace_callback(lambda sql: seen.append(sql) if sql.strip() == "COMMIT" else None)
    return seen


def test_put_many_stores_each_fill_in_two_transactions(tmp_path: pathlib.Path) -> None:
    tier = DiskTier(tmp_path / "c", 1 << 30)
    fills = [Fill(f"k/{i}", f"value {i}".encode() * (i + 1), "ns", "chunk") for i in range(100)]
    assert tier._conn is not None
    commits = count_commits(tier._conn)
    assert tier.put_many(fills) == [True] * 100
    tier._conn.set_trace_callback(None)
    assert len(commits) == 2  # one per step of put, for the whole batch
    assert len(tier) == 100
    assert tier.used_bytes() == sum(len(f.value) for f in fills)
    for f in fills:
        entry = tier.get_entry(f.key)
        assert entry is not None and entry.value == f.value and entry.namespace == "ns"
    assert temp_files(tmp_path) == []
    tier.close()
    with DiskTier(tmp_path / "c", 1 << 30) as again:  # the rows were committed
        assert len(again) == 100 and again.get("k/7") == b"value 7" * 8


def test_put_many_judges_each_fill_like_put(tmp_path: pathlib.Path) -> None:
    tier = DiskTier(tmp_path / "c", 1000, max_object_size=100)
    started = time.time_ns()
    tier.put("old", b"v0")
    tier.delete("stale")  # a fetch of "stale" started before this delete is refused
    fills = [
        Fill("stale", b"x", fetch_started_ns=started),
        Fill("big", b"y" * 101),  # over max_object_size
        Fill("meta", b"m", kind="metadata", expires=time.time() + 3600),
        Fill("dup", b"first"),
        Fill("old", b"v1", fetch_started_ns=time.time_ns()),
        Fill("dup", b"second"),  # a later fill of a key wins
        Fill("\ud800", b"z"),  # cannot be indexed
    ]
    stored = tier.put_many(fills)
    assert stored == [False, False, True, False, True, True, False]
    assert tier.stale_rejections == 1
    assert tier.get("stale") is None and tier.get("big") is None
    entry = tier.get_entry("meta")
    assert entry is not None and entry.kind == "metadata" and entry.expires is not None
    assert tier.get("dup") == b"second" and tier.get("old") == b"v1"
    assert len(tier) == 3
    assert temp_files(tmp_path) == []
    assert tier.verify() == {**tier.verify(), "ok": 3, "corrupt": 0, "orphan_files": 0}
    tier.close()


def test_put_many_refuses_a_bad_batch_before_writing(tmp_path: pathlib.Path) -> None:
    tier = DiskTier(tmp_path / "c", 1 << 20)
    with pytest.raises(ValueError):
        tier.put_many([Fill("a", b"1"), Fill("b", b"2", kind="nope")])
    with pytest.raises(ValueError):
        tier.put_many([Fill("a", b"1", expires=float("nan"))])
    assert len(tier) == 0 and temp_files(tmp_path) == []
    tier.close()
    assert tier.put_many([Fill("a", b"1")]) == [False]  # closed


@LAYOUTS
def test_put_many_never_exceeds_capacity(tmp_path: pathlib.Path, threshold: int) -> None:
    tier = DiskTier(tmp_path / "c", 10_000, segment_threshold=threshold)
    fills = [Fill(f"k/{i}", bytes([i % 256]) * 300) for i in range(200)]  # 60,000 bytes
    seen: list[int] = []

    def check(_final: str) -> None:
        assert tier._conn is not None
        seen.append(tier._conn.execute("SELECT used FROM totals").fetchone()[0])

    with hooks.registered("after-replace", check):
        stored = tier.put_many(fills)
    if threshold == FILES:  # (checked at each file installed)
        assert seen and max(seen) <= 10_000
    assert tier.used_bytes() <= 10_000
    # the newest fills survive (LRU); every surviving entry is readable and intact
    assert stored[-1] and tier.get("k/199") == bytes([199]) * 300
    for i in range(200):
        value = tier.get(f"k/{i}")
        assert value is None or value == bytes([i % 256]) * 300
    assert temp_files(tmp_path) == []
    tier.close()


def test_eviction_by_put_goes_in_bounded_batches(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "EVICT_BATCH", 5)
    tier = DiskTier(tmp_path / "c", 100 * 100)  # room for 100 entries of 100 bytes
    assert all(tier.put_many([Fill(f"k/{i}", b"v" * 100) for i in range(100)]))
    tier.put("new", b"n" * 100)  # over capacity: 1 must go, low water would take 11
    assert tier.evictions == 5  # the batch bound, not the 11 of the low-water mark
    assert tier.used_bytes() <= tier.capacity
    tier.put("big", b"b" * 2000)  # 96 entries + 2000 bytes: 16 must go whatever the bound
    assert tier.evictions == 5 + 16
    assert tier.used_bytes() <= tier.capacity and tier.get("big") == b"b" * 2000
    # an explicit evict() is not bounded
    tier.evict(tier.capacity // 2)
    assert tier.used_bytes() <= tier.capacity // 2
    tier.close()


@LAYOUTS
def test_small_hit_is_one_read_large_hit_two(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, threshold: int
) -> None:
    tier = DiskTier(tmp_path / "c", 1 << 30, segment_threshold=threshold)
    small, large = b"s" * 1000, os.urandom(WHOLE_READ + 1)
    tier.put("small", small)
    tier.put("large", large)
    calls: list[int] = []
    pread = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        calls.append(n)
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting)
    assert tier.get("small") == small
    assert len(calls) == 1  # header and payload in one system call
    calls.clear()
    assert tier.get("large") == large
    assert len(calls) == 2  # the header, then the payload (not copied out of a larger read)
    monkeypatch.undo()
    # a damaged small file (or record) is still caught by the checksum
    where = locate(tier, "small")
    assert where.in_segment == (threshold == RECORDS)
    data = bytearray(where.read())
    data[-1] ^= 1
    where.write(bytes(data))
    assert tier.get("small") is None and tier.corruptions == 1
    tier.close()


@LAYOUTS
def test_disk_writer_stores_queued_fills_in_batches(tmp_path: pathlib.Path, threshold: int) -> None:
    tier = DiskTier(tmp_path / "c", 1 << 30, segment_threshold=threshold)
    drops: list[int] = []
    writer = DiskWriter(tier, 1 << 30, lambda: drops.append(1))
    gate, first = threading.Event(), threading.Event()

    def hold(_temp: str) -> None:  # the first write waits until the queue has filled up
        first.set()
        gate.wait(10)

    n = 2 * BATCH_ENTRIES + 10
    now = time.time_ns()
    point = "after-temp-write" if threshold == FILES else "before-append"
    with hooks.registered(point, hold):
        writer.submit(PendingWrite("k/0", b"v0", "chunk", "ns", None, now))
        assert first.wait(10)
        for i in range(1, n):
            assert writer.submit(PendingWrite(f"k/{i}", b"v%d" % i, "chunk", "ns", None, now))
        writer.submit(PendingWrite("k/5", b"newer", "chunk", "ns", None, now))  # replaces
        gate.set()
        writer.flush()
    assert writer.batched_entries == n  # k/5 once: its second queue entry found it written
    assert writer.batches <= 1 + -(-(n - 1) // BATCH_ENTRIES) + 1
    assert not drops
    assert (
        len(tier) == n
        and tier.get("k/5") == b"newer"
        and tier.get(f"k/{n - 1}") == b"v%d" % (n - 1)
    )
    assert writer.pending("k/1") is None and writer.backlog == 0
    writer.close()
    tier.close()


def trace(conn: sqlite3.Connection | None) -> list[str]:
    assert conn is not None
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    return seen


def test_hit_and_miss_open_at_most_one_file_and_run_no_sql(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "FLUSH_INTERVAL_S", 1e9)  # no statistics flush in between
    # payload files: a record's hit looks its row up first (one SELECT, then one read)
    tier = DiskTier(tmp_path / "c", 1 << 30, segment_threshold=FILES)
    tier.put_many([Fill(f"k/{i}", b"v" * 100) for i in range(50)])
    tier.put("meta", b"m", kind="metadata")
    statements = trace(tier._conn)
    opened: list[str] = []
    real_open = os.open

    def counting(path: str, flags: int, *args: int, **kwargs: int) -> int:
        fd = real_open(path, flags, *args, **kwargs)  # only opens that succeed count
        opened.append(path)
        return fd

    monkeypatch.setattr(os, "open", counting)
    for key, expected in (("k/7", b"v" * 100), ("meta", b"m"), ("absent", None)):
        opened.clear()
        assert tier.get(key) == expected
        assert len(opened) == (0 if expected is None else 1)  # one data file per hit
    monkeypatch.undo()
    assert statements == []  # neither a hit nor a miss touches the index
    tier.close()


def test_put_many_lookups_do_not_grow_with_the_batch(tmp_path: pathlib.Path) -> None:
    tier = DiskTier(tmp_path / "c", 1 << 30)
    started = time.time_ns()
    tier.put_many([Fill(f"k/{i}", b"old") for i in range(0, 300, 2)])  # half of them exist
    statements = trace(tier._conn)
    stored = tier.put_many([Fill(f"k/{i}", b"new", fetch_started_ns=started) for i in range(300)])
    assert tier._conn is not None
    tier._conn.set_trace_callback(None)
    # the existing keys were written (authoritatively) after the fetch started: stale
    assert stored == [i % 2 == 1 for i in range(300)]
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    # rows, tombstones and tokens of the batch are each read in one query, not one per entry
    assert len(selects) <= 8, selects
    assert not any("FROM tombstones WHERE key = " in s for s in selects)
    assert tier.get("k/1") == b"new" and tier.get("k/2") == b"old"
    tier.close()


def test_put_many_sees_its_own_tombstones(tmp_path: pathlib.Path) -> None:
    tier = DiskTier(tmp_path / "c", 1 << 30)
    started = time.time_ns()
    stored = tier.put_many(
        [Fill("k", b"written"), Fill("k", b"fetched earlier", fetch_started_ns=started)]
    )
    assert stored == [True, False]  # the write's tombstone refuses the older fetch
    assert tier.get("k") == b"written"
    tier.close()


def test_opening_a_filled_folder_reads_no_rows(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = DiskTier(tmp_path / "c", 1 << 30)
    tier.put_many([Fill(f"k/{i}", b"v") for i in range(200)])
    tier.close()
    statements: list[str] = []
    real_connect = schema.connect

    def traced(db_path: str, cache_bytes: int) -> tuple[sqlite3.Connection, bool]:
        conn, created = real_connect(db_path, cache_bytes)
        conn.set_trace_callback(statements.append)
        return conn, created

    monkeypatch.setattr(index, "connect", traced)
    tier = DiskTier(tmp_path / "c", 1 << 30)
    assert len(tier) == 200 and tier.used_bytes() == 200  # from the totals row
    assert statements  # (traced)
    assert not any("entries" in s for s in statements), statements  # no scan, no count
    tier.close()


def test_a_due_statistics_flush_runs_off_the_hit_path(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "FLUSH_MAX_PENDING", 5)
    tier = DiskTier(tmp_path / "c", 1 << 30)
    tier.put_many([Fill(f"k/{i}", b"v") for i in range(20)])
    assert tier._conn is not None
    writers: list[str] = []

    def note(sql: str) -> None:
        if sql.lstrip().startswith("UPDATE entries SET last_access"):
            writers.append(threading.current_thread().name)

    tier._conn.set_trace_callback(note)
    for i in range(20):
        assert tier.get(f"k/{i}") == b"v"  # due after 5 pending: pokes the flusher
    deadline = time.monotonic() + 60
    # (a run may come before the hits; ``runs`` counts a flush once it has ended)
    while (not writers or tier._flusher.runs < 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tier._flusher.runs >= 1
    assert writers and threading.current_thread().name not in writers
    tier.close()  # stops the thread, writes the rest
    assert not any(t.name == "zcache-disk-stats" and t.is_alive() for t in threading.enumerate())
    with sqlite3.connect(tmp_path / "c" / "index.db") as conn:
        assert conn.execute("SELECT SUM(hits) FROM entries").fetchone()[0] == 20
