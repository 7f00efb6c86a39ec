"""Tests of the persistent disk tier (real files under tmp_path, no mocks).

The tests of payload files (their names, modes, damage, the rebuild from them) run with
packing off (``segment_threshold=FILES``); the same guarantees for records in segment files
are in ``tests/test_disk_segments.py``. The other tests run on both layouts (the ``tier``
fixture).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import pathlib
import random
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator

import pytest

from xarray_zcache.cache.disk import HEADER, DiskTier

HEADER_SIZE = HEADER.size


def file_overhead(f: pathlib.Path) -> int:
    """Bytes of a payload file that are not payload: the fixed header, the key, the namespace."""
    fields = HEADER.unpack(f.read_bytes()[:HEADER_SIZE])
    return HEADER_SIZE + fields[6] + fields[3]  # + key length + namespace length


#: ``segment_threshold`` of a tier whose every entry is a payload file (packing off)
FILES = -1

PAYLOAD_NAME = re.compile(r"^[0-9a-f]{64}\.(cache|meta)$")


# --------------------------------------------------------------------------- helpers


def make_value(key: str, version: int) -> bytes:
    """A value that names its key and version and whose length depends on the version."""
    token = f"<{key}|{version}>".encode()
    return token * (1 + (version * 7919) % 97)


def is_valid_value(key: str, data: bytes) -> bool:
    """Whether ``data`` is exactly ``make_value(key, v)`` for some version ``v``."""
    prefix = f"<{key}|".encode()
    end = data.find(b">") + 1
    if end <= len(prefix) or not data.startswith(prefix):
        return False
    try:
        version = int(data[len(prefix) : end - 1])
    except ValueError:
        return False
    return data == make_value(key, version)


def payload_files(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for sub in ("chunks", "metadata") for p in (root / sub).rglob("*") if p.is_file()]


def file_of(tier: DiskTier, key: str, kind: str = "chunk") -> pathlib.Path:
    import hashlib

    h = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    sub, ext = ("chunks", ".cache") if kind == "chunk" else ("metadata", ".meta")
    return tier.path / sub / h[:2] / f"{h}{ext}"


@pytest.fixture(params=[FILES, 64 * 1024], ids=["file", "record"])
def tier(tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> Iterator[DiskTier]:
    """A tier on each layout: entries as payload files, and as records (the default)."""
    t = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=request.param)
    yield t
    t.close()


@pytest.fixture
def file_tier(tmp_path: pathlib.Path) -> Iterator[DiskTier]:
    """A tier whose entries are payload files (for tests of the files themselves)."""
    t = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=FILES)
    yield t
    t.close()


# --------------------------------------------------------------------------- basics


def test_roundtrip(file_tier: DiskTier) -> None:
    tier = file_tier
    assert tier.get("a") is None
    assert tier.put("a", b"hello", namespace="ns")
    assert tier.put("m/zarr.json", b"{}", kind="metadata")
    assert tier.put("empty", b"")
    assert tier.get("a") == b"hello"
    assert tier.get("m/zarr.json") == b"{}"
    assert tier.get("empty") == b""
    assert tier.read_range("a", 1, 3) == b"el"
    assert tier.read_range("missing", 0, 1) is None
    assert "a" in tier and "missing" not in tier
    assert len(tier) == 3
    assert tier.keys() == ["a", "empty", "m/zarr.json"]
    assert tier.used_bytes() == 7
    assert file_of(tier, "m/zarr.json", "metadata").exists()
    # overwrite with another kind: only one file remains
    assert tier.put("a", b"bye", kind="metadata")
    assert tier.get("a") == b"bye"
    assert not file_of(tier, "a", "chunk").exists()
    assert tier.used_bytes() == 5
    tier.delete("a")
    assert tier.get("a") is None and "a" not in tier
    assert not file_of(tier, "a", "metadata").exists()
    with pytest.raises(ValueError, match="kind"):
        tier.put("x", b"1", kind="other")


def test_persistence_across_instances(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cache"
    t1 = DiskTier(path, 10_000)
    assert t1.put("k1", b"one", namespace="s3://b")
    assert t1.put("k2", b"two", expires=time.time() + 3600)
    for _ in range(3):
        assert t1.get("k1") == b"one"
    t1.close()
    t1.close()  # idempotent
    assert t1.get("k1") is None and not t1.put("k3", b"x")

    t2 = DiskTier(str(path), 10_000)
    try:
        assert t2.get("k2") == b"two"
        rows = {r["key"]: r for r in t2.entries()}
        assert set(rows) == {"k1", "k2"}
        assert rows["k1"]["hits"] == 3
        assert rows["k2"]["hits"] == 1
        assert rows["k1"]["namespace"] == "s3://b"
        assert rows["k1"]["expires"] is None and rows["k2"]["expires"] > time.time()
        assert rows["k1"]["created"] <= rows["k1"]["last_access"] <= time.time()
        assert rows["k1"]["size"] == 3
        assert t2.used_bytes() == 6 and len(t2) == 2
    finally:
        t2.close()


def test_hits_are_batched_not_written_per_get(tier: DiskTier) -> None:
    assert tier.put("k", b"v")
    tier.flush()
    for _ in range(5):
        assert tier.get("k") == b"v"
    with sqlite3.connect(tier.path / "index.db") as other:
        (hits,) = other.execute("SELECT hits FROM entries WHERE key = 'k'").fetchone()
    assert hits == 0  # still pending in memory
    tier.flush()
    with sqlite3.connect(tier.path / "index.db") as other:
        (hits,) = other.execute("SELECT hits FROM entries WHERE key = 'k'").fetchone()
    assert hits == 5


def test_modes(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cache"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    t = DiskTier(path, 10_000, segment_threshold=FILES)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert t.put("k", b"v") and t.put("m", b"v", kind="metadata")
        files = payload_files(path)
        assert len(files) == 2
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert stat.S_IMODE((path / "index.db").stat().st_mode) == 0o600
    finally:
        t.close()


def test_path_expanded_and_resolved(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    t = DiskTier("~/sub/../cache", 100)
    try:
        assert t.path == (tmp_path / "cache").resolve()
    finally:
        t.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_folder_owned_by_other_user_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, 12345, 12345)
    with pytest.raises(PermissionError, match=re.escape(str(path))):
        DiskTier(path, 100)


def test_invalid_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        DiskTier(tmp_path / "c", -1)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):
        DiskTier(tmp_path / "file", 100)


def test_hostile_keys_stay_inside_folder(tmp_path: pathlib.Path) -> None:
    keys = [
        "../../etc/passwd",
        "/abs/path",
        "a\x00b",
        "é漢字",
        "k" * 10_000,
        "..",
        "",
        "a/../../b\\..\\c",
        "\udcff-lone-surrogate",
    ]
    abs_existed = os.path.exists("/abs")
    t = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=FILES)
    try:
        for i, key in enumerate(keys):
            value = f"value-{i}".encode()
            stored = t.put(key, value)
            if key.startswith("\udcff"):
                assert not stored  # cannot be indexed; never raises
                assert t.get(key) is None
                continue
            assert stored, key
            assert t.get(key) == value
            assert key in t
        assert sorted(os.listdir(tmp_path)) == ["cache"]
        assert os.path.exists("/abs") == abs_existed
        for dirpath, _dirs, files in os.walk(tmp_path / "cache"):
            rel = pathlib.Path(dirpath).relative_to(tmp_path / "cache")
            for name in files:
                if rel == pathlib.Path("."):
                    assert name.startswith("index.db")
                else:
                    assert PAYLOAD_NAME.match(name), name
                    assert rel.parts[0] in ("chunks", "metadata") and len(rel.parts) == 2
        assert set(t.keys()) == set(keys[:-1])
        for key in keys:
            t.delete(key)
        assert len(t) == 0 and payload_files(t.path) == []
    finally:
        t.close()


# --------------------------------------------------------------------------- bounds


def test_capacity_bound_under_10x_workload(tmp_path: pathlib.Path) -> None:
    capacity = 50_000
    t = DiskTier(tmp_path / "cache", capacity, segment_threshold=FILES)
    rng = random.Random(0)
    try:
        written = 0
        for i in range(600):
            key = f"var/{rng.randrange(300)}"
            size = rng.randrange(0, 2500)
            if t.put(key, bytes([i % 256]) * size, kind=rng.choice(["chunk", "metadata"])):
                written += size
            assert t.used_bytes() <= capacity
            if i % 7 == 0:
                t.get(f"var/{rng.randrange(300)}")
        assert written > 10 * capacity
        files = payload_files(t.path)
        assert len(files) == len(t)
        assert sum(f.stat().st_size - file_overhead(f) for f in files) == t.used_bytes()
        assert sum(f.stat().st_size - file_overhead(f) for f in files) <= capacity
        assert t.evictions > 0 and t.evicted_bytes > 0
        assert t.verify()["ok"] == len(t)
    finally:
        t.close()


def test_value_close_to_capacity_evicts_others_not_itself(tmp_path: pathlib.Path) -> None:
    t = DiskTier(tmp_path / "cache", 1000)
    try:
        assert t.put("small", b"x" * 100)
        assert t.put("big", b"y" * 950)
        assert t.get("big") == b"y" * 950
        assert t.get("small") is None
        assert t.used_bytes() == 950
    finally:
        t.close()


def test_lru_order(tmp_path: pathlib.Path) -> None:
    t = DiskTier(tmp_path / "cache", 10_000)
    try:
        for i in range(5):
            assert t.put(f"k{i}", b"x" * 100)
        now = time.time()
        for i in (0, 2, 4):  # k1 and k3 are the least recently used
            assert t.get(f"k{i}", now=now + 10 + i) is not None
        assert t.evict(target=300) == 200
        assert t.keys() == ["k0", "k2", "k4"]
        assert t.evictions == 2 and t.evicted_bytes == 200
    finally:
        t.close()


def test_size_limits(tmp_path: pathlib.Path) -> None:
    t = DiskTier(tmp_path / "cache", 1000, max_object_size=100)
    try:
        assert not t.put("big", b"x" * 101)
        assert t.put("ok", b"x" * 100)
        assert t.get("big") is None and "big" not in t
        assert t.keys() == ["ok"]
    finally:
        t.close()
    t0 = DiskTier(tmp_path / "zero", 0)
    try:
        assert not t0.put("k", b"")
        assert not t0.put("k", b"x")
        assert len(t0) == 0
    finally:
        t0.close()
    t1 = DiskTier(tmp_path / "small", 10)
    try:
        assert not t1.put("k", b"x" * 11)
        assert t1.put("k", b"x" * 10)
    finally:
        t1.close()


def test_ttl_expiry(tier: DiskTier) -> None:
    now = time.time()
    assert tier.put("short", b"s", expires=now + 10)
    assert tier.put("long", b"l", expires=now + 1000)
    assert tier.put("never", b"n")
    assert tier.get("short", now=now + 5) == b"s"
    assert tier.get("short", now=now + 20) is None
    remaining = tier.keys()
    assert "short" not in remaining
    assert not file_of(tier, "short").exists()
    assert tier.drop_expired(now=now + 2000) == 1
    assert tier.keys() == ["never"]
    assert tier.put("past", b"p", expires=now - 1)
    assert "past" not in tier  # index lookup honours expiry
    assert tier.get("past") is None


# --------------------------------------------------------------------------- damage


def test_damaged_files_are_misses(file_tier: DiskTier, caplog: pytest.LogCaptureFixture) -> None:
    tier = file_tier
    values = {f"k{i}": f"value-{i}".encode() * 50 for i in range(6)}
    for k, v in values.items():
        assert tier.put(k, v)
    # truncated payload
    f0 = file_of(tier, "k0")
    f0.write_bytes(f0.read_bytes()[:-7])
    # bit-flipped payload
    f1 = file_of(tier, "k1")
    data = bytearray(f1.read_bytes())
    data[HEADER_SIZE + 10] ^= 0x04
    f1.write_bytes(bytes(data))
    # truncated header
    file_of(tier, "k2").write_bytes(b"ZCC")
    # deleted file, row left
    file_of(tier, "k3").unlink()
    # row missing for a present file
    with sqlite3.connect(tier.path / "index.db") as other:
        other.execute("DELETE FROM entries WHERE key = 'k4'")
    # a file swapped with another key's file (key hash mismatch)
    file_of(tier, "k5").write_bytes(file_of(tier, "k4").read_bytes())

    with caplog.at_level(logging.WARNING, logger="xarray_zcache.disk"):
        results = {k: tier.get(k) for k in values}
        again = {k: tier.get(k) for k in values}
    for k, got in [*results.items(), *again.items()]:
        assert got is None or got == values[k], k
    assert results["k0"] is None and results["k1"] is None and results["k2"] is None
    assert results["k3"] is None and results["k5"] is None
    assert tier.corruptions == 4  # k0, k1, k2, k5
    warnings = [r for r in caplog.records if r.name == "xarray_zcache.disk"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    # the damaged entries are gone (file and row); the orphan row of k3 remains in the index
    for k in ("k0", "k1", "k2", "k5"):
        assert not file_of(tier, k).exists() and k not in tier
    report = tier.verify()
    assert report["corrupt"] == 0
    assert report["missing_files"] == 1  # k3
    assert report["orphan_files"] == 1  # k4
    tier.verify(repair=True)
    report = tier.verify()
    assert report == {**report, "missing_files": 0, "orphan_files": 0, "corrupt": 0}
    assert report["ok"] == len(tier) == 0
    assert tier.used_bytes() == 0


def test_verify_reports_and_repairs_corruption(file_tier: DiskTier) -> None:
    tier = file_tier
    for i in range(4):
        assert tier.put(f"k{i}", b"abc" * 100)
    f = file_of(tier, "k0")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    (f.parent / "junk.txt").write_bytes(b"?")
    report = tier.verify()
    assert report["corrupt"] == 1 and report["ok"] == 3 and report["unknown_files"] == 1
    tier.verify(repair=True)
    report = tier.verify()
    assert report["corrupt"] == 0 and report["ok"] == 3 == len(tier)
    assert tier.used_bytes() == 900


# --------------------------------------------------------------------------- invalidation


def test_tombstones_reject_stale_puts(tier: DiskTier) -> None:
    before = time.time_ns()
    assert tier.put("k", b"old", fetch_started_ns=before)
    tier.delete("k")
    assert not tier.put("k", b"stale", fetch_started_ns=before)
    assert tier.get("k") is None
    assert tier.stale_rejections == 1
    assert tier.put("k", b"fresh", fetch_started_ns=time.time_ns())
    assert tier.get("k") == b"fresh"

    # an authoritative write (no fetch_started_ns) also refuses older in-flight fetches
    fetch = time.time_ns()
    assert tier.put("w", b"written")
    assert not tier.put("w", b"older-read", fetch_started_ns=fetch)
    assert tier.get("w") == b"written"

    # prefix tombstones
    fetch = time.time_ns()
    assert tier.put("ds/a", b"1") and tier.put("ds/b", b"2")
    assert tier.delete_prefix("ds/") == 2
    assert not tier.put("ds/c", b"3", fetch_started_ns=fetch)
    assert tier.put("other/c", b"3", fetch_started_ns=fetch)
    assert tier.put("ds/c", b"3", fetch_started_ns=time.time_ns())

    # pruning moves the horizon: fetches older than it are refused
    old_fetch = time.time_ns()
    time.sleep(0.01)
    tier.prune_tombstones(older_than_s=0)
    assert not tier.put("new", b"x", fetch_started_ns=old_fetch)
    assert tier.put("new", b"x", fetch_started_ns=time.time_ns())


def test_delete_prefix_with_sql_wildcards(tier: DiskTier) -> None:
    keys = ["a%b/1", "a%b/2", "a_b/1", "axb/1", "a%c", "ab", "a\x00b", "a\U0010ffff", "b"]
    for k in keys:
        assert tier.put(k, k.encode("utf-8"))
    assert tier.delete_prefix("a%b") == 2
    assert tier.delete_prefix("a_") == 1
    assert sorted(tier.keys()) == sorted(["axb/1", "a%c", "ab", "a\x00b", "a\U0010ffff", "b"])
    assert tier.delete_prefix("a\x00") == 1
    assert tier.delete_prefix("a\U0010ffff") == 1
    assert tier.delete_prefix("zzz") == 0
    assert tier.get("axb/1") == b"axb/1"
    assert tier.delete_prefix("") == 4
    assert len(tier) == 0 and payload_files(tier.path) == []


def test_get_entry_keeps_kind_expiry_and_namespace(file_tier: DiskTier) -> None:
    tier = file_tier
    expires = time.time() + 3600
    assert tier.put("c", b"chunk", namespace="s3://b", expires=expires)
    assert tier.put("m", b"{}", kind="metadata")
    entry = tier.get_entry("c")
    assert entry is not None
    assert (entry.value, entry.kind, entry.expires, entry.namespace) == (
        b"chunk",
        "chunk",
        expires,
        "s3://b",
    )
    meta = tier.get_entry("m")
    assert meta is not None and (meta.value, meta.kind, meta.expires) == (b"{}", "metadata", None)
    assert tier.get_entry("missing") is None
    # same rules as get: expired entries are misses (and removed), damage is a miss
    assert tier.get_entry("c", now=expires + 1) is None and "c" not in tier
    f = file_of(tier, "m", "metadata")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert tier.get_entry("m") is None and tier.corruptions == 1
    tier.flush()


def test_summary_groups_by_namespace_and_kind(tier: DiskTier) -> None:
    assert tier.summary() == []
    assert tier.put("a/1", b"x" * 10, namespace="a")
    assert tier.put("a/2", b"x" * 5, namespace="a")
    assert tier.put("a/zarr.json", b"{}", namespace="a", kind="metadata")
    assert tier.put("b/1", b"y" * 7, namespace="b")
    assert tier.put("none", b"z")
    assert tier.summary() == [
        {"namespace": "", "kind": "chunk", "entries": 1, "bytes": 1},
        {"namespace": "a", "kind": "chunk", "entries": 2, "bytes": 15},
        {"namespace": "a", "kind": "metadata", "entries": 1, "bytes": 2},
        {"namespace": "b", "kind": "chunk", "entries": 1, "bytes": 7},
    ]
    assert sum(r["bytes"] for r in tier.summary()) == tier.used_bytes()


def test_usage_sums_hits_expiry_and_times_by_sql(tier: DiskTier) -> None:
    now = time.time()
    assert tier.usage(now) == []
    assert tier.put("a/1", b"x" * 10, namespace="a")
    assert tier.put("a/2", b"x" * 5, namespace="a", expires=now - 1)
    assert tier.put("a/zarr.json", b"{}", namespace="a", kind="metadata", expires=now + 60)
    assert tier.put("b/1", b"y" * 7, namespace="b")
    for _ in range(3):
        assert tier.get("a/1") == b"x" * 10  # pending access records: flushed by usage()
    assert tier.get("b/1") == b"y" * 7
    rows = {(r["namespace"], r["kind"]): r for r in tier.usage(now)}
    assert list(rows) == [("a", "chunk"), ("a", "metadata"), ("b", "chunk")]
    a = rows["a", "chunk"]
    assert (a["entries"], a["bytes"], a["hits"]) == (2, 15, 3)
    assert (a["expired"], a["expired_bytes"]) == (1, 5)
    assert a["oldest_created"] <= a["newest_created"] <= a["last_access"]
    assert rows["a", "metadata"]["expired"] == 0 and rows["b", "chunk"]["hits"] == 1
    entries = tier.entries()
    assert sum(r["hits"] for r in rows.values()) == sum(e["hits"] for e in entries)
    # the same grouping and totals as summary()
    assert [
        {k: r[k] for k in ("namespace", "kind", "entries", "bytes")} for r in rows.values()
    ] == (tier.summary())


def test_top_entries_orders_by_sql(tier: DiskTier) -> None:
    for i, hits in enumerate([0, 2, 5, 2]):
        assert tier.put(f"k{i}", b"v", namespace="n")
        for _ in range(hits):
            assert tier.get(f"k{i}") == b"v"
        time.sleep(0.01)  # distinct creation times
    hot = tier.top_entries(3, "hits")
    assert [(r["key"], r["hits"]) for r in hot] == [("k2", 5), ("k3", 2), ("k1", 2)]
    assert set(hot[0]) == set(tier.entries()[0])
    assert [r["key"] for r in tier.top_entries(10, "hits")] == ["k2", "k3", "k1"]  # no 0 hits
    assert [r["key"] for r in tier.top_entries(1, "oldest")] == ["k0"]
    assert [r["key"] for r in tier.top_entries(2, "newest")] == ["k3", "k2"]
    assert tier.top_entries(0) == []
    with pytest.raises(ValueError, match="by must be one of 'hits', 'oldest', 'newest'"):
        tier.top_entries(1, "size")  # type: ignore[arg-type]


def test_probe_and_open_existing_create_nothing(tmp_path: pathlib.Path) -> None:
    from xarray_zcache.cache.disk.tier import NotACacheFolder

    with pytest.raises(FileNotFoundError):
        DiskTier.probe(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        DiskTier.open_existing(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        DiskTier.probe(tmp_path / "file")

    plain = tmp_path / "plain"
    (plain / "chunks").mkdir(parents=True)
    found = DiskTier.probe(plain)
    assert (found.state, found.detail, found.layout) == ("missing", "no index.db in it", False)
    assert not found.recoverable
    with pytest.raises(NotACacheFolder, match=r"no index\.db") as err:
        DiskTier.open_existing(plain, rebuild=True)
    assert err.value.folder == found
    assert sorted(p.name for p in plain.iterdir()) == ["chunks"]

    other = tmp_path / "app"
    other.mkdir()
    with contextlib.closing(sqlite3.connect(other / "index.db")) as conn:
        conn.execute("CREATE TABLE things(x)")
    assert DiskTier.probe(other).state == "foreign"

    folder = tmp_path / "cache"
    with DiskTier(folder, 1 << 20, segment_threshold=FILES) as t:
        assert t.put("k", b"v", namespace="n")
    assert DiskTier.probe(folder).ok
    with DiskTier.open_existing(folder) as t:
        assert t.capacity > 1 << 40 and t.keys() == ["k"]

    (folder / "index.db").unlink()
    for side in ("index.db-wal", "index.db-shm"):
        (folder / side).unlink(missing_ok=True)
    lost = DiskTier.probe(folder)
    assert lost.state == "missing" and lost.layout and lost.recoverable
    with pytest.raises(NotACacheFolder):
        DiskTier.open_existing(folder)
    assert not (folder / "index.db").exists()
    with DiskTier.open_existing(folder, rebuild=True) as t:  # rebuilt from the payload files
        assert t.keys() == ["k"] and t.last_rebuild["indexed"] == 1

    (folder / "index.db").write_bytes(b"garbage" * 100)
    for side in ("index.db-wal", "index.db-shm"):
        (folder / side).unlink(missing_ok=True)
    damaged = DiskTier.probe(folder)
    assert damaged.state == "damaged" and damaged.recoverable


def test_delete_namespace(file_tier: DiskTier) -> None:
    tier = file_tier
    fetch = time.time_ns()
    assert tier.put("a/1", b"1", namespace="a")
    assert tier.put("a/zarr.json", b"{}", namespace="a", kind="metadata")
    assert tier.put("b/1", b"2", namespace="b")
    assert tier.get("a/1") == b"1"  # a pending access record, dropped with the entry
    assert tier.delete_namespace("a") == 2
    assert tier.delete_namespace("a") == 0 and tier.delete_namespace("nope") == 0
    assert tier.keys() == ["b/1"] and tier.get("a/1") is None
    assert len(payload_files(tier.path)) == 1
    # the removed keys got tombstones: fills fetched before the removal are stale
    assert not tier.put("a/1", b"stale", namespace="a", fetch_started_ns=fetch)
    assert tier.put("a/1", b"new", namespace="a", fetch_started_ns=time.time_ns())
    assert tier.verify() == {**tier.verify(), "ok": 2}


def test_disk_package_imports_only_the_standard_library() -> None:
    """The disk tier stands alone: no zarr, dask, xarray or distributed; NumPy only once a
    tier builds its location map (``keydir``), not to import the package."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent / "xarray_zcache"
    code = f"""
import sys, types
parents = (("xarray_zcache", {str(root)!r}), ("xarray_zcache.cache", {str(root / "cache")!r}))
for name, path in parents:
    module = types.ModuleType(name)  # the parents, without running their __init__
    module.__path__ = [path]
    sys.modules[name] = module
import xarray_zcache.cache.disk
loaded = {{m.split(".")[0] for m in sys.modules}}
print(",".join(sorted({{"zarr", "dask", "xarray", "distributed", "numpy"}} & loaded)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""


def test_crash_hooks_name_the_points_of_a_put(tmp_path: pathlib.Path) -> None:
    from xarray_zcache.cache.disk import hooks

    tier = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=FILES)
    seen: list[str] = []

    def fail(*_args: object) -> None:
        raise OSError(5, "injected")

    try:
        with pytest.raises(ValueError, match="point must be one of"):
            hooks.register("nowhere", fail)
        points = ["after-header-write", "after-temp-write", "before-replace", "after-replace"]
        with contextlib.ExitStack() as stack:
            for point in points:
                stack.enter_context(hooks.registered(point, lambda *a, p=point: seen.append(p)))
            assert tier.put("k", b"v")
        assert seen == points
        # a failure right before the rename, like a crash there: nothing visible and no temp
        # file; the committed row has no file (a miss, which verify reports and repairs)
        with hooks.registered("before-replace", fail):
            assert not tier.put("k2", b"v2")
        assert tier.get("k2") is None and tier.get("k") == b"v"
        assert [p.name for p in payload_files(tier.path)] == [file_of(tier, "k").name]
        assert tier.verify()["missing_files"] == 1
        tier.verify(repair=True)
        assert "k2" not in tier and tier.verify()["ok"] == 1
    finally:
        hooks.clear()
        tier.close()


# --------------------------------------------------------------------------- concurrency


def test_threads_share_one_tier(tier: DiskTier) -> None:
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            key = f"k{rng.randrange(20)}"
            r = rng.random()
            if r < 0.5:
                tier.put(key, make_value(key, rng.randrange(1000)))
            elif r < 0.9:
                got = tier.get(key)
                if got is not None and not is_valid_value(key, got):
                    errors.append(key)
            else:
                tier.delete(key)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert tier.corruptions == 0
    report = tier.verify()
    assert report["corrupt"] == report["orphan_files"] == report["mismatched"] == 0
    assert report["ok"] == len(tier)


def _value_version(key: str, data: bytes) -> int:
    return int(data[len(f"<{key}|") : data.find(b">")])


def _process_worker(
    path: str,
    capacity: int,
    seed: int,
    n_ops: int,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.queues.Queue[tuple[int, int, int, list[str]]],
) -> None:
    """Random put/get/delete on overlapping keys; reports (hits, foreign hits, stored, errors).

    Versions written by this process are ``seed * 10**6 + n``, so hits on values written by
    the other process ("foreign hits") show that the two really share the folder.
    """
    t = DiskTier(path, capacity, segment_threshold=FILES)
    rng = random.Random(seed)
    hits = foreign = stored = 0
    bad: list[str] = []
    barrier.wait(30)
    try:
        for n in range(n_ops):
            key = f"k{rng.randrange(40)}"
            r = rng.random()
            if r < 0.5:
                fetch = time.time_ns() - rng.randrange(0, 2_000_000)
                value = make_value(key, seed * 10**6 + n)
                kind = "metadata" if rng.random() < 0.2 else "chunk"
                if t.put(key, value, kind=kind, fetch_started_ns=fetch):
                    stored += 1
                used = t.used_bytes()
                if used > capacity:
                    bad.append(f"used {used} > {capacity}")
            elif r < 0.88:
                got = t.get(key)
                if got is not None:
                    hits += 1
                    if not is_valid_value(key, got):
                        bad.append(f"{key}: {got[:40]!r}")
                    elif _value_version(key, got) // 10**6 != seed:
                        foreign += 1
            elif r < 0.98:
                t.delete(key)
            else:
                t.delete_prefix(f"k{rng.randrange(4)}")
    except Exception as exc:  # report instead of dying silently
        bad.append(repr(exc))
    finally:
        if t.corruptions:
            bad.append(f"{t.corruptions} damaged files seen (torn write?)")
        t.close()
        results.put((hits, foreign, stored, bad))


@pytest.mark.slow
def test_two_processes_share_one_folder(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "cache")
    capacity = 15_000
    DiskTier(
        path, capacity, segment_threshold=FILES
    ).close()  # create the folder and schema up front
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(path, capacity, seed, 2000, barrier, results))
        for seed in (1, 2)
    ]
    for p in procs:
        p.start()
    reports = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for hits, _foreign, stored, bad in reports:
        assert bad == []
        assert hits > 50 and stored > 200
    assert sum(foreign for _h, foreign, _s, _b in reports) > 0
    t = DiskTier(path, capacity, segment_threshold=FILES)
    try:
        report = t.verify()
        assert report["corrupt"] == report["orphan_files"] == report["mismatched"] == 0
        assert report["missing_files"] == 0 and report["temp_files"] == 0
        assert report["ok"] == len(t)
        assert t.used_bytes() <= capacity
        assert t.used_bytes() == sum(
            f.stat().st_size - file_overhead(f) for f in payload_files(t.path)
        )
        keys = t.keys()
        for key in keys:
            got = t.get(key)
            assert got is not None and is_valid_value(key, got)
    finally:
        t.close()


def _crash_writer(path: str, ready: multiprocessing.synchronize.Event, seed: int) -> None:
    t = DiskTier(path, 40_000)
    rng = random.Random(seed)
    i = 0
    while True:
        key = f"k{rng.randrange(30)}"
        if rng.random() < 0.8:
            t.put(key, make_value(key, rng.randrange(100_000)))
        else:
            t.delete(key)
        i += 1
        if i == 100:
            ready.set()


@pytest.mark.slow
def test_sigkill_never_leaves_visible_partial_entries(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("spawn")
    rng = random.Random(3)
    for seed in range(2):
        ready = ctx.Event()
        proc = ctx.Process(target=_crash_writer, args=(path, ready, seed))
        proc.start()
        try:
            assert ready.wait(30)
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            proc.kill()  # SIGKILL
            proc.join()
        t = DiskTier(path, 40_000)
        try:
            for i in range(30):
                key = f"k{i}"
                got = t.get(key)
                assert got is None or is_valid_value(key, got)
            report = t.verify()
            # a crash may leave temp files and rows without file, never bad or orphan files
            assert report["corrupt"] == report["orphan_files"] == report["mismatched"] == 0
            assert t.corruptions == 0
            t.verify(repair=True)
            assert t.verify()["missing_files"] == 0
        finally:
            t.close()


def test_an_invalidation_recorded_late_keeps_the_time_it_happened(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete the index could not record (a full disk) is recorded before the next write,
    with a tombstone of when it happened: a fill fetched before it is refused, one fetched
    after it is stored (recording it at the settling time refused fresh fills too, and a
    disk tier that had been full stored nothing of what was read meanwhile)."""
    import sqlite3

    tier = DiskTier(tmp_path / "cache", 1 << 20)
    assert tier.put("k", b"v0")
    before = time.time_ns()
    real_run = tier._index.run

    def full(action: str, op: object, **kw: bool) -> object:
        if action == "deleting an entry":
            raise sqlite3.OperationalError("database or disk is full")
        return real_run(action, op, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tier._index, "run", full)
    tier.delete("k")  # owed
    monkeypatch.setattr(tier._index, "run", real_run)
    after = time.time_ns()
    assert tier.get("k") is None  # not served while owed
    time.sleep(0.01)
    assert not tier.put("k", b"stale", fetch_started_ns=before)  # (settles the delete first)
    assert tier.put("k", b"fresh", fetch_started_ns=after)
    assert tier.get("k") == b"fresh"
    tier.close()
