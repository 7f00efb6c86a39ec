"""Segment files (issue 19, item 4): small entries as records appended to per-writer files.

Every adversarial check here goes through ``tests/entry_location.py``: where an entry lives
(its record in a segment, or a payload file) and its bytes.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pathlib
import random
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from entry_location import locate, stored_bytes
from keydir_helpers import forked
from old_index import write_schema_2

from xarray_zcache.cache.disk import HEADER, DiskTier, Fill, schema
from xarray_zcache.cache.disk.compact import dead_limit
from xarray_zcache.cache.disk.segments import SEGMENT_THRESHOLD, seal_size

ON = SEGMENT_THRESHOLD


def _tier(path: pathlib.Path, capacity: int = 1 << 30, **kw: int) -> DiskTier:
    return DiskTier(path, capacity, segment_threshold=kw.pop("segment_threshold", ON), **kw)


@pytest.fixture
def tier(tmp_path: pathlib.Path) -> Iterator[DiskTier]:
    t = _tier(tmp_path / "c")
    yield t
    t.close()


def _segments(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted((root / "segments").glob("*.seg"))


def test_small_entries_are_records_large_ones_files(tier: DiskTier) -> None:
    assert tier.put("a", b"x" * 10, namespace="ns")
    assert tier.put("m", b"{}", kind="metadata")
    assert tier.put("big", b"y" * (ON + 1))
    assert tier.put_many([Fill(f"b/{i}", b"%d" % i) for i in range(50)]) == [True] * 50
    assert locate(tier, "a").in_segment and locate(tier, "m").in_segment
    assert not locate(tier, "big").in_segment and locate(tier, "big").exists()
    assert len(_segments(tier.path)) == 1  # one writer, one segment
    assert not list((tier.path / "chunks").rglob("*.cache"))[1:]  # only "big"
    for i in range(50):
        assert tier.get(f"b/{i}") == b"%d" % i
    entry = tier.get_entry("m")
    assert entry is not None and (entry.value, entry.kind, entry.namespace) == (
        b"{}",
        "metadata",
        "",
    )
    assert tier.get("a") == b"x" * 10 and "a" in tier and tier.might_contain("a")
    assert not tier.might_contain("nope") and tier.get("nope") is None
    # a record is the bytes a payload file would hold
    raw = locate(tier, "a").read()
    fields = HEADER.unpack_from(raw)
    assert raw[HEADER.size : HEADER.size + fields[6]] == b"a" and raw.endswith(b"x" * 10)
    assert tier.verify() == {**tier.verify(), "ok": 53, "corrupt": 0, "missing_files": 0}


def test_overwrite_delete_expire_never_serve_the_old_record(tier: DiskTier) -> None:
    now = time.time()
    assert tier.put("k", b"old")
    assert tier.put("k", b"new")
    assert tier.get("k") == b"new"
    assert tier.put("k", b"z" * (ON + 10))  # record -> file
    assert tier.get("k") == b"z" * (ON + 10)
    assert tier.put("k", b"small again")  # file -> record: the file goes
    assert tier.get("k") == b"small again" and not list((tier.path / "chunks").rglob("*.cache"))
    tier.delete("k")
    assert tier.get("k") is None and "k" not in tier
    assert tier.put("t", b"short-lived", expires=now + 5)
    assert tier.get("t", now=now + 10) is None and "t" not in tier
    assert tier.put("p/1", b"1") and tier.put("p/2", b"2") and tier.put("q", b"q", namespace="n")
    assert tier.delete_prefix("p/") == 2 and tier.delete_namespace("n") == 1
    assert tier.get("p/1") is None and tier.get("q") is None and len(tier) == 0
    assert tier.used_bytes() == 0


@pytest.mark.parametrize("damage", ["payload", "header", "key", "truncate", "zeroed", "swap"])
def test_a_damaged_record_is_a_miss_and_loses_its_row(tier: DiskTier, damage: str) -> None:
    for k in ("k1", "k2", "k3"):
        assert tier.put(k, f"value of {k}".encode() * 20)
    where = locate(tier, "k2")
    raw = bytearray(where.read())
    if damage == "payload":
        raw[-3] ^= 0x10
    elif damage == "header":
        raw[12] ^= 0x01  # payload length
    elif damage == "key":
        raw[HEADER.size] ^= 0x02
    elif damage == "swap":  # another key's record of the same length
        raw = bytearray(locate(tier, "k3").read())
    if damage == "truncate":
        where.truncate(len(raw) // 2)
    elif damage == "zeroed":
        where.remove()
    else:
        where.write(bytes(raw))
    assert tier.verify()["corrupt"] == 1
    assert tier.get("k2") is None
    assert tier.corruptions == 1 and "k2" not in tier
    assert tier.get("k1") == b"value of k1" * 20 and tier.get("k3") == b"value of k3" * 20
    report = tier.verify()
    assert report["corrupt"] == 0 and report["ok"] == 2


def test_verify_repair_drops_damaged_records_and_rows_of_lost_segments(tier: DiskTier) -> None:
    for i in range(10):
        assert tier.put(f"k{i}", b"v" * 100)
    where = locate(tier, "k4")
    where.write(where.read()[:-1] + b"?")
    report = tier.verify(repair=True)
    assert report["corrupt"] == 1 and report["ok"] == 9
    assert tier.verify()["ok"] == 9 == len(tier)
    tier.close()
    for seg in _segments(tier.path):
        seg.unlink()
    with _tier(tier.path) as again:
        assert again.get("k0") is None  # the row pointed into a gone segment: a miss
        assert again.verify(repair=True)["missing_files"] == 8
        assert len(again) == 0


def test_rebuild_index_never_resurrects_a_deleted_or_overwritten_record(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "c"
    with _tier(path) as t:
        assert t.put("over", b"first") and t.put("over", b"second")
        assert t.put("gone", b"deleted value")
        t.delete("gone")
        assert t.put("kept", b"small value")
        assert t.put("file", b"f" * (ON + 1))
        t.rebuild_index()
        # records cannot be told live from dead without the index: none is recovered
        assert t.get("over") is None and t.get("gone") is None and t.get("kept") is None
        assert t.get("file") == b"f" * (ON + 1)  # files are, as before
        assert t.put("over", b"third") and t.get("over") == b"third"
    (path / "index.db").unlink()
    with _tier(path) as t:
        assert t.get("over") is None and t.get("gone") is None
        assert t.get("file") == b"f" * (ON + 1)


def test_a_schema_2_folder_is_migrated_in_place(tmp_path: pathlib.Path) -> None:
    """A folder written by the previous version (schema 2, payload files only) keeps every
    entry: the index is migrated with ALTER TABLE, then small fills go to segments."""
    path = tmp_path / "c"
    values = {f"old/{i}": os.urandom(100 + i) for i in range(20)}
    with DiskTier(path, 1 << 30, segment_threshold=-1) as old:
        for k, v in values.items():
            assert old.put(k, v, namespace="ns")
        old.delete("old/0")
        old.flush()
        rows = old._index.run(
            "dump",
            lambda c: c.execute(
                "SELECT key, namespace, kind, size, created, last_access, hits, expires, checksum, "
                "token FROM entries"
            ).fetchall(),
        )
        tombs = old._index.run("dump", lambda c: c.execute("SELECT * FROM tombstones").fetchall())
    values.pop("old/0")
    write_schema_2(path, rows, tombs)  # schema 2, as v2 made it
    with _tier(path) as t:
        assert t.index_rebuilds == 0  # migrated, not rebuilt
        for k, v in values.items():
            assert t.get(k) == v and not locate(t, k).in_segment
        assert not t.put("old/0", b"stale", fetch_started_ns=time.time_ns() - 10**12)
        assert t.put("new", b"n") and locate(t, "new").in_segment
        assert t.put("old/1", b"now a record") and t.get("old/1") == b"now a record"
        assert t.verify()["ok"] == len(values) + 1
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION


def test_disk_bytes_stay_within_the_stated_bound(tmp_path: pathlib.Path) -> None:
    """Fill, overwrite and delete in a loop: the folder's bytes stay within capacity +
    record headers + capacity/4 dead + one segment (the writer's) + one (being compacted)."""
    capacity = 2 << 20
    t = _tier(tmp_path / "c", capacity)
    seal = seal_size(capacity)
    rng = random.Random(1)
    worst = 0
    try:
        for i in range(12_000):
            key = f"k/{rng.randrange(6000)}"
            op = rng.random()
            if op < 0.1:
                t.delete(key)
            elif op < 0.102:
                t.delete_prefix(f"k/{rng.randrange(600, 6000)}")
            else:
                t.put(key, os.urandom(rng.randrange(200, 2000)), namespace="n")
            if i % 500 == 0:
                headers = len(t) * (HEADER.size + 8 + 1)
                on_disk = stored_bytes(t.path)
                worst = max(worst, on_disk - headers)
                assert t.used_bytes() <= capacity
                assert on_disk <= capacity + headers + dead_limit(capacity) + 2 * seal, i
        assert t.compactions > 0 and t.evictions > 0
        report = t.verify()
        assert report["ok"] == len(t) and report["corrupt"] == report["missing_files"] == 0
    finally:
        t.close()
    assert worst > capacity // 2  # the loop did fill the tier


_CHILD = """
import sys
from xarray_zcache.cache.disk import DiskTier
path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = DiskTier(path, 1 << 30, segment_threshold=65536)
bad = 0
for i in range(n):
    key = f"k/{i}"
    if mode == "fill":
        assert t.put(key, f"child {i} ".encode() * 30)
    else:
        got = t.get(key)
        expect = {"child": f"child {i} ".encode() * 30, "parent": f"parent {i} ".encode() * 30}
        if got is not None and got not in expect.values():
            bad += 1
        if i % 4 == 0 and got is not None:
            bad += 1  # deleted by the parent
        if i % 2 == 1 and i % 4 != 0 and got != expect["parent"]:
            bad += 1  # overwritten by the parent: never the child's value
t.close()
print(bad)
"""


def _child(path: pathlib.Path, mode: str, n: int) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), mode, str(n)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    )
    return int(out.stdout.split()[-1])


def test_two_processes_each_own_segment_compaction_keeps_rows_right(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "c"
    n = 400
    with _tier(path) as parent:
        assert parent.put("mine", b"parent's own")  # the parent's segment, before the child's
        assert _child(path, "fill", n) == 0  # another process, its own segment (now sealed)
        assert len(_segments(path)) == 2
        for i in range(n):
            assert parent.get(f"k/{i}") == f"child {i} ".encode() * 30  # read the child's
        for i in range(n):
            if i % 4 == 0:
                parent.delete(f"k/{i}")
            elif i % 2 == 1:
                assert parent.put(f"k/{i}", f"parent {i} ".encode() * 30)
        child_segment = next(s for s in _segments(path) if not s.name.startswith(f"{os.getpid()}-"))
        freed = parent.compact()  # the child's segment is mostly dead and its writer gone
        assert freed > 0 and not child_segment.exists()
        assert parent.compactions == 1
        # a reader of another process sees the moved rows, never an old value
        assert _child(path, "read", n) == 0
        for i in range(n):
            got = parent.get(f"k/{i}")
            if i % 4 == 0:
                assert got is None
            elif i % 2 == 1:
                assert got == f"parent {i} ".encode() * 30
            else:
                assert got == f"child {i} ".encode() * 30  # moved by compaction
        assert parent.get("mine") == b"parent's own"
        assert parent.verify()["ok"] == len(parent)


def test_a_delete_during_compaction_wins(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    from xarray_zcache.cache.disk import compact

    for i in range(40):
        assert tier.put(f"k/{i}", b"%d" % i * 50)
    tier._segments.close()  # seal it (as a writer that moved on)
    for i in range(40):
        if i % 4 != 1:
            tier.delete(f"k/{i}")  # three quarters dead
    real = compact.SegmentWriter.append
    raced: list[int] = []

    def append_then_race(self: compact.SegmentWriter, records: list[tuple[bytes, bytes]]) -> list:
        where = real(self, records)
        if not raced:  # copies are written, rows not yet moved: another writer acts now
            raced.append(1)
            tier.delete("k/1")
            assert tier.put("k/5", b"newer")
        return where

    monkeypatch.setattr(compact.SegmentWriter, "append", append_then_race)
    assert tier.compact() > 0 and raced
    monkeypatch.undo()
    assert tier.get("k/1") is None and tier.get("k/5") == b"newer"
    assert tier.get("k/9") == b"9" * 50
    assert tier.verify()["ok"] == len(tier) == 9


def test_a_torn_append_is_harmless(tier: DiskTier) -> None:
    assert tier.put("a", b"A" * 300)
    (seg,) = _segments(tier.path)
    with open(seg, "ab") as f:  # a crash mid-append: a partial record, never committed
        f.write(b"ZCCH\x02 partial")
    tier._segments.close()
    assert tier.put("b", b"B" * 300)
    assert tier.get("a") == b"A" * 300 and tier.get("b") == b"B" * 300
    assert tier.verify()["ok"] == 2


def test_an_index_gone_back_in_time_never_serves_a_replaced_or_deleted_record(
    tmp_path: pathlib.Path,
) -> None:
    """Lost WAL frames (a damaged WAL, a power cut with synchronous=NORMAL) take the index
    back to an older state whose rows point to records deleted or replaced since: those are
    marked dead when their rows change, so they read as misses, never as the old value."""
    path = tmp_path / "c"
    old = tmp_path / "old.db"
    with _tier(path) as t:
        for i in range(30):
            assert t.put(f"k/{i}", b"old %d" % i)
        with contextlib.closing(sqlite3.connect(old)) as dst:
            assert t._conn is not None
            t._conn.backup(dst)  # the index as it is now
        for i in range(10):
            assert t.put(f"k/{i}", b"new %d" % i)  # replaced
        for i in range(10, 20):
            t.delete(f"k/{i}")  # deleted
        assert t.put_many([Fill(f"k/{i}", b"batch %d" % i) for i in range(20, 25)]) == [True] * 5
        t.evict(t.used_bytes() - 5)  # evicts some of the rest
    assert len(_segments(path)) == 1  # not compacted: the old records are still there
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}/index.db{suffix}")
    os.replace(old, path / "index.db")
    with _tier(path) as t:
        for i in range(30):
            got = t.get(f"k/{i}")
            assert got is None or (i >= 25 and got == b"old %d" % i), (i, got)


_CHURN = """
import os, random, sys
from xarray_zcache.cache.disk import DiskTier
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
t = DiskTier(path, 64 * 1024, segment_threshold=65536)
bad = hits = 0
for i in range(4000):
    key = f"k/{rng.randrange(150)}"
    op = rng.random()
    if op < 0.5:
        tag = f"<{key}|{seed}|{i}>".encode()
        t.put(key, tag * rng.randrange(1, 60))
    elif op < 0.6:
        t.delete(key)
    else:
        got = t.get(key)
        if got is not None:
            hits += 1
            end = got.find(b">") + 1
            tag = got[:end]
            if not tag.startswith(f"<{key}|".encode()) or got != tag * (len(got) // len(tag)):
                bad += 1
t.close()
print(bad, hits)
"""


def test_two_processes_churning_one_folder_never_read_wrong_bytes(tmp_path: pathlib.Path) -> None:
    """Both at once: puts, deletes and reads of the same keys, eviction and compaction in a
    small tier; every hit is a whole value written for its key."""
    path = tmp_path / "c"
    _tier(path).close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHURN, str(path), str(seed)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for seed in (1, 2)
    ]
    results = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert [int(bad) for bad, _hits in results] == [0, 0]
    assert all(int(hits) > 100 for _bad, hits in results)
    with _tier(path) as t:
        report = t.verify()
        assert report["corrupt"] == 0 and report["ok"] == len(t)
        assert stored_bytes(path) <= 64 * 1024 * 5 // 4 + len(t) * 100 + 3 * seal_size(64 * 1024)


def test_clearing_gives_the_space_back(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    with _tier(path) as t:
        assert all(t.put_many([Fill(f"k/{i}", os.urandom(2000)) for i in range(200)]))
        assert stored_bytes(path) > 400_000
    with _tier(path) as t:  # as `zcache clear` does: another tier, all sealed
        assert t.delete_prefix("") == 200
        assert _segments(path) == [] and stored_bytes(path) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_tier_used_on_both_sides_of_fork_never_serves_a_refused_value(
    tmp_path: pathlib.Path,
) -> None:
    t = _tier(tmp_path / "c")
    assert t.put("warm", b"w" * 100)  # the writer's segment is open now
    r, w = os.pipe()

    def child() -> None:
        os.read(r, 1)
        assert t.put("K", b"NEW-v2.." * 9)  # the latest value of K
        assert t.get("K") == b"NEW-v2.." * 9
        assert t.get("warm") == b"w" * 100

    started = time.time_ns()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        faulthandler.dump_traceback_later(60, exit=True)  # a hang: its stack, then exit 1
        try:
            child()
        finally:
            os._exit(0 if t.get("K") == b"NEW-v2.." * 9 else 1)
    t.delete("K")
    assert not t.put("K", b"STALE-v1" * 9, fetch_started_ns=started)  # refused as stale
    os.write(w, b"x")
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert t.put("after", b"a" * 50)  # the parent's writer goes on, at right offsets
    t2 = _tier(tmp_path / "c")
    try:
        assert t2.get("K") == b"NEW-v2.." * 9
        assert t2.get("after") == b"a" * 50
        assert t2.get("warm") == b"w" * 100
    finally:
        t2.close()
        t.close()


def _disk(cache: object) -> DiskTier:
    tier = getattr(cache, "disk_tier", None)
    assert isinstance(tier, DiskTier)
    return tier


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.filterwarnings("ignore:This process.*multi-threaded")
def test_a_forked_child_builds_its_own_caches(tmp_path: pathlib.Path) -> None:
    from xarray_zcache import registry
    from xarray_zcache.config import CacheConfig

    cfg = CacheConfig().with_disk_cache(tmp_path / "c", "1GiB").with_disk_packing()
    parent = registry.get_cache(cfg)
    try:
        _disk(parent).put("p", b"parent" * 10)
        r, w = os.pipe()

        def child() -> None:
            os.close(r)
            mine = registry.get_cache(cfg)
            assert mine is not parent
            assert _disk(mine).get("p") == b"parent" * 10
            _disk(mine).put("c", b"child" * 10)
            assert _disk(mine).get("c") == b"child" * 10
            mine.close()  # the child's own
            os.write(w, b"ok")

        assert forked(child) == 0
        os.close(w)
        assert os.read(r, 2) == b"ok"
        os.close(r)
        assert registry.get_cache(cfg) is parent
        _disk(parent).put("p2", b"again" * 10)
        assert _disk(parent).get("p2") == b"again" * 10
        assert _disk(parent).get("c") == b"child" * 10
    finally:
        registry.close_all()


def _back_in_time(path: pathlib.Path, snap: pathlib.Path) -> None:
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}/index.db{suffix}")
    os.replace(snap, path / "index.db")


def test_make_room_racing_an_overwrite_never_leaves_a_live_record_without_row(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk's ``make_room`` races another process overwriting K: the row it deletes is
    the one whose record it marked dead, so a later delete of K kills the new record and an
    index gone back in time never serves the deleted value."""
    from xarray_zcache.cache.disk import writes

    path, snap = tmp_path / "c", tmp_path / "old.db"
    a, b = _tier(path), _tier(path)
    assert a.put("K", b"v1" * 10)
    orig = writes.txn
    fired: list[int] = []

    def racing_txn(conn: sqlite3.Connection) -> object:
        if not fired:  # the first transaction of a's make_room
            fired.append(1)
            assert b.put("K", b"v2-NEW" * 10)  # another process overwrites K
            with contextlib.closing(sqlite3.connect(snap)) as dst:
                assert b._conn is not None
                b._conn.backup(dst)  # the index as of now: K -> the v2 record
        return orig(conn)

    monkeypatch.setattr(writes, "txn", racing_txn)
    a._make_room(1)
    monkeypatch.setattr(writes, "txn", orig)
    assert fired
    b.delete("K")  # K must never be served again
    assert b.get("K") is None
    a.close()
    b.close()
    _back_in_time(path, snap)
    with _tier(path) as t:
        assert t.get("K") is None


def test_removing_a_stale_row_never_deletes_the_newer_row_of_its_key(tier: DiskTier) -> None:
    """``remove_rows`` given a row read before an overwrite deletes nothing of the new row
    (whose record stays live): it deletes only the row whose record it marked dead."""
    from xarray_zcache.cache.disk import rows

    assert tier.put("K", b"old" * 10)
    conn = tier._conn
    assert conn is not None
    stale = conn.execute(f"SELECT {rows.ROW} FROM entries WHERE key = 'K'").fetchone()
    assert tier.put("K", b"new" * 10)
    with tier._index.lock, schema.txn(conn):
        rows.remove_rows(conn, tier._root, [stale], tier._warn.error)
    assert tier.get("K") == b"new" * 10


def _held_unlinked_segments() -> int:
    """Bytes of unlinked segment files this process still holds open."""
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.endswith(".seg (deleted)"):
                held += os.fstat(int(fd)).st_size
        except OSError:
            continue
    return held


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_readers_let_go_of_compacted_segments(tmp_path: pathlib.Path) -> None:
    """Another tier (as another process would) that read from segments since compacted does
    not keep them open: periodic maintenance, or its next read, closes them."""
    path = tmp_path / "c"
    a, b = _tier(path, 8 << 20), _tier(path, 8 << 20)
    try:
        val = os.urandom(60_000)
        for i in range(100):
            assert a.put(f"k/{i}", val)
        assert all(b.get(f"k/{i}") == val for i in range(100))
        a.delete_prefix("k/")  # zcache clear: compacts at once
        assert _held_unlinked_segments() > 0  # b's descriptors, until it looks
        b.drop_expired()  # periodic maintenance
        assert _held_unlinked_segments() == 0
        # on use: a descriptor of a segment unlinked since is dropped, the read finds it gone
        assert a.put("x", val)
        assert b.get("x") == val
        (seg,) = _segments(path)
        fd = b._fds.acquire(seg.name)
        b._fds.release(fd)
        os.unlink(seg)
        a._segments.close()  # (the writer's own descriptor of it)
        time.sleep(0.15)
        with pytest.raises(FileNotFoundError):
            b._fds.acquire(seg.name)
        assert _held_unlinked_segments() == 0
        assert b.get("x") is None  # a miss, not an error
    finally:
        a.close()
        b.close()


def test_might_contain_never_raises(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    """It runs unguarded in the caller's thread: on any error, True (``get`` decides)."""
    assert tier.put("K", b"v" * 10)

    def broken(*args: object, **kwargs: object) -> object:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(tier._index, "run", broken)
    monkeypatch.setattr(tier._index, "query", broken)  # the lookup's read connection
    assert tier._keydir is not None
    monkeypatch.setattr(tier._keydir, "find", broken)  # the location map too
    assert tier.might_contain("K") is True
    assert tier.might_contain("other") is True


def test_free_segment_counts_only_rows_it_deleted(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xarray_zcache.cache.disk import compact

    for i in range(5):
        assert tier.put(f"k/{i}", b"x" * 100)
    tier._segments.close()  # sealed: free_segment may take it

    def full(conn: sqlite3.Connection) -> object:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(compact, "txn", full)
    n, nbytes, space = compact.free_segment(tier._compaction())
    assert (n, nbytes) == (0, 0)  # the rows could not be deleted: nothing counted
    assert space > 0  # the file went: its space came back
    monkeypatch.undo()
    for i in range(5):
        assert tier.get(f"k/{i}") is None  # the rows left read as misses


def test_hostile_keys_never_name_a_file_and_records_stay_private(tmp_path: pathlib.Path) -> None:
    """Records carry the key inside the segment only: whatever the key, the folder holds the
    index, ``segments/<pid>-<random>.seg`` (mode 0600, folder 0700) and nothing else; no
    path is made of a key (the equivalents for payload files: ``tests/test_disk_tier.py``)."""
    keys = ["../../etc/passwd", "/abs/path", "a\x00b", "é漢字", "k" * 10_000, "..", ""]
    keys += ["a/../../b\\..\\c", "segments/../index.db", "x.seg"]
    abs_existed = os.path.exists("/abs")
    t = _tier(tmp_path / "cache", 1 << 20)
    try:
        for i, key in enumerate(keys):
            assert t.put(key, f"value-{i}".encode(), kind=("chunk", "metadata")[i % 2])
            assert t.get(key) == f"value-{i}".encode()
            assert locate(t, key).in_segment
        assert sorted(os.listdir(tmp_path)) == ["cache"]
        assert os.path.exists("/abs") == abs_existed
        for dirpath, dirs, files in os.walk(tmp_path / "cache"):
            rel = pathlib.Path(dirpath).relative_to(tmp_path / "cache")
            if rel == pathlib.Path("."):
                assert all(n.startswith("index.db") or n == "settings.json" for n in files)
                continue
            if rel.parts[0] in ("chunks", "metadata"):  # (created empty with the folder)
                assert files == [], files
                continue
            assert rel == pathlib.Path("segments") and not dirs, rel
            assert oct(os.stat(dirpath).st_mode & 0o777) == oct(0o700)
            for name in files:
                assert re.fullmatch(r"\d+-[0-9a-f]{16}\.seg", name), name
                assert os.stat(os.path.join(dirpath, name)).st_mode & 0o777 == 0o600
        assert set(t.keys()) == set(keys)
        for key in keys:
            t.delete(key)
        assert len(t) == 0 and t.verify()["ok"] == 0
    finally:
        t.close()
