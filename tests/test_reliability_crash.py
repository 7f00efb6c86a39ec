"""Issue 6, part 1: crash safety, and a lost or damaged ``index.db``.

A process filling the disk tier is SIGKILLed at random moments, many times in a row, and at
each step of a write; after each kill a fresh cache reads every key right and the folder
verifies (or is repaired). ``index.db`` deleted or damaged: the cache keeps working and the
index is rebuilt from the payload headers (which carry the key since format version 2).
"""

from __future__ import annotations

import math
import os
import pathlib
import sqlite3
import time
from typing import Any

import pytest
from entry_location import locate

from xarray_zcache.cache.disk import FORMAT_VERSION, HEADER, DiskTier
from xarray_zcache.testing import faults

# --------------------------------------------------------------------------- SIGKILL


def test_sigkill_while_filling_many_times_in_a_row(tmp_path: pathlib.Path) -> None:
    result = faults.run_crash_rounds(tmp_path, rounds=6, seed=11)
    result.assert_clean()
    assert result.runs == 6


@pytest.mark.parametrize("point", list(faults.DISK_CRASH_POINTS))
def test_sigkill_at_each_step_of_a_disk_write(tmp_path: pathlib.Path, point: str) -> None:
    """Killed between the two transactions of a put, half-way through its temp file, in
    the middle of an eviction (payload files: packing off), or about to append a record: a
    miss at worst, never a wrong byte; the leftovers (rows without file, temp files of the
    dead process) are repaired by ``verify(repair=True)``."""
    faults.crash_at(tmp_path, point).assert_clean()


@pytest.mark.parametrize(
    "point", ["after_inner_write", "after_inner_delete", "after_inner_write_of_missing_key"]
)
def test_sigkill_between_inner_write_and_invalidation(tmp_path: pathlib.Path, point: str) -> None:
    faults.crash_at(tmp_path, point).assert_clean()


# --------------------------------------------------------------------------- index.db lost


def _filled_store(
    tmp_path: pathlib.Path, name: str = "filler", pack_below: int | None = None
) -> tuple[Any, list[str]]:
    keys = faults.dataset_keys(20)
    data = faults.local_store(tmp_path / "data")
    for i, key in enumerate(keys):
        data.set_sync(key, faults.buf(faults.make_value(key, i)))
    store = faults.cached(tmp_path / "data", tmp_path / "cache", name, pack_below=pack_below)
    for key in keys:
        store.get_sync(key)
    store.cache.flush()
    return store, keys


def _reader(tmp_path: pathlib.Path) -> Any:
    return faults.cached(tmp_path / "data", tmp_path / "cache", f"reader-{time.monotonic_ns()}")


@pytest.mark.parametrize("side_files", ["kept", "deleted"])
def test_index_deleted_while_stopped_is_rebuilt_from_payload_headers(
    tmp_path: pathlib.Path, side_files: str
) -> None:
    """Payload files (packing off) carry what their rows held: the rebuilt index serves them
    all (records: ``test_index_deleted_with_packing_only_costs_fetches``)."""
    store, keys = _filled_store(tmp_path, pack_below=0)
    entries = {e["key"]: e for e in store.cache.disk_tier.entries()}
    store.cache.close()
    (tmp_path / "cache" / "index.db").unlink()
    if side_files == "deleted":
        for name in ("index.db-wal", "index.db-shm"):
            (tmp_path / "cache" / name).unlink(missing_ok=True)

    reader = _reader(tmp_path)
    result = faults.ScenarioResult("index deleted")
    faults.compare_all(reader, faults.local_store(tmp_path / "data"), keys, result, "rebuilt")
    result.assert_clean()
    stats = reader.stats()
    assert stats.total_misses() == 0  # every read served by the rebuilt disk tier
    assert stats.total_hits(tier="disk") >= len(keys)
    rebuilt = {e["key"]: e for e in reader.cache.disk_tier.entries()}
    assert rebuilt.keys() == entries.keys()
    for key, entry in entries.items():
        for field in ("namespace", "kind", "size", "checksum", "expires"):
            assert rebuilt[key][field] == entry[field], (key, field)
    # the dataset's entries and the digests of its array metadata (see keys.digest_key)
    assert reader.cache.disk_tier.last_rebuild["indexed"] == len(entries)
    reader.cache.close()
    assert _verify_clean(tmp_path)


def test_index_deleted_while_running_keeps_working(tmp_path: pathlib.Path) -> None:
    store, keys = _filled_store(tmp_path)
    reference = faults.local_store(tmp_path / "data")
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        (tmp_path / "cache" / name).unlink(missing_ok=True)
    result = faults.ScenarioResult("index deleted")
    store.cache.memory_tier.clear()
    faults.compare_all(store, reference, keys, result, "live")
    for i, key in enumerate(keys[:5]):  # writes and deletes through the store still work
        store.set_sync(key, faults.buf(faults.make_value(key, 100 + i)))
    store.delete_sync(keys[5])
    store.cache.flush()
    other = _reader(tmp_path)  # another process opening the folder meanwhile
    faults.compare_all(other, reference, keys, result, "other")
    store.cache.memory_tier.clear()
    faults.compare_all(store, reference, keys, result, "live again")
    result.assert_clean()
    other.cache.close()
    store.cache.close()
    assert _verify_clean(tmp_path)


@pytest.mark.parametrize("side_files", ["kept", "deleted"])
def test_index_deleted_with_packing_only_costs_fetches(
    tmp_path: pathlib.Path, side_files: str
) -> None:
    """Records are not recovered by a rebuild (a dead record cannot be told from a live one
    without the index): every read is right, the entries are fetched again and stored anew,
    and the folder verifies clean (the old segments are dead bytes, compacted away)."""
    store, keys = _filled_store(tmp_path)
    assert store.cache.disk_tier.segment_threshold > 0  # packing is on by default
    store.cache.close()
    (tmp_path / "cache" / "index.db").unlink()
    if side_files == "deleted":
        for name in ("index.db-wal", "index.db-shm"):
            (tmp_path / "cache" / name).unlink(missing_ok=True)
    reference = faults.local_store(tmp_path / "data")
    reader = _reader(tmp_path)
    result = faults.ScenarioResult("index deleted, packing on")
    faults.compare_all(reader, reference, keys, result, "after the loss")
    reader.cache.flush()
    reader.cache.memory_tier.clear()
    faults.compare_all(reader, reference, keys, result, "stored again")
    result.assert_clean()
    assert reader.stats().total_hits(tier="disk") > 0  # served from disk again
    reader.cache.close()
    assert _verify_clean(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed-header", "empty"])
def test_unreadable_index_at_open_is_rebuilt(tmp_path: pathlib.Path, damage: str) -> None:
    """(Payload files: packing off; records are misses after a rebuild, see above.)"""
    store, keys = _filled_store(tmp_path, pack_below=0)
    entries = store.cache.disk_tier.entries()
    store.cache.close()
    db = tmp_path / "cache" / "index.db"
    size = db.stat().st_size
    if damage == "garbage":
        db.write_bytes(os.urandom(size))
    elif damage == "truncated":
        os.truncate(db, size // 3)
    elif damage == "zeroed-header":
        with open(db, "r+b") as f:
            f.write(b"\0" * 100)
    else:
        db.write_bytes(b"")
    reader = _reader(tmp_path)
    result = faults.ScenarioResult(damage)
    faults.compare_all(reader, faults.local_store(tmp_path / "data"), keys, result, damage)
    result.assert_clean()
    assert len(reader.cache.disk_tier) == len(entries)  # every entry is back
    assert reader.stats().total_misses() == 0
    reader.cache.close()
    assert _verify_clean(tmp_path)


def _verify_clean(tmp_path: pathlib.Path) -> bool:
    tier = DiskTier(tmp_path / "cache", 64_000_000)
    try:
        report = tier.verify()
        return all(v == 0 for k, v in report.items() if k != "ok") and report["ok"] == len(tier)
    finally:
        tier.close()


# --------------------------------------------------------------------------- rebuild_index


def test_rebuild_index_restores_entries_and_drops_what_it_cannot_trust(
    tmp_path: pathlib.Path,
) -> None:
    tier = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=-1)  # payload files
    now = time.time()
    tier.put("ns/a", b"alpha", namespace="ns", kind="chunk")
    tier.put("ns/zarr.json", b"{}", namespace="ns", kind="metadata", expires=now + 3600)
    tier.put("ns/expired", b"old", namespace="ns", expires=now + 0.2)
    tier.put("ns/damaged", b"x" * 100, namespace="ns")
    tier.put("k" * 10_000, b"long key", namespace="")
    tier.put("é/漢字\x00nul", b"unicode", namespace="ns")
    before = {e["key"]: e for e in tier.entries()}
    damaged = faults.payload_files(tier.path)
    (bad,) = [p for p in damaged if p.read_bytes().endswith(b"x" * 100)]
    raw = bytearray(bad.read_bytes())
    raw[HEADER.size + 2] ^= 0x01  # inside the key: the header checksum fails
    bad.write_bytes(bytes(raw))
    old = tier.path / "chunks" / "00" / ("00" * 32 + ".cache")  # a format-1 file
    old.parent.mkdir(exist_ok=True)
    old.write_bytes(b"ZCCH\x01" + b"\0" * 59 + b"payload of a format-1 file")
    time.sleep(0.25)

    counts = tier.rebuild_index()
    assert counts["indexed"] == 4
    assert counts["corrupt"] == 1 and counts["expired"] == 1 and counts["old_format"] == 1
    after = {e["key"]: e for e in tier.entries()}
    assert set(after) == {"ns/a", "ns/zarr.json", "k" * 10_000, "é/漢字\x00nul"}
    for key, entry in after.items():
        for field in ("namespace", "kind", "size", "checksum", "expires"):
            assert entry[field] == before[key][field]
    assert tier.get("ns/a") == b"alpha" and tier.get("k" * 10_000) == b"long key"
    assert not bad.exists() and not old.exists()
    # the tombstones are gone with the old index: fills that began before are refused
    assert not tier.put("ns/late", b"stale?", fetch_started_ns=time.time_ns() - 10**9)
    assert tier.put("ns/fresh", b"ok", fetch_started_ns=time.time_ns())
    assert tier.verify() == {**tier.verify(), "corrupt": 0, "orphan_files": 0, "mismatched": 0}
    tier.close()


@pytest.mark.parametrize("threshold", [-1, 64 * 1024], ids=["file", "record"])
def test_verify_repair_rebuilds_a_damaged_index(tmp_path: pathlib.Path, threshold: int) -> None:
    """Payload files are all recovered; records are misses (never stale)."""
    tier = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=threshold)
    for i in range(200):
        tier.put(f"k{i}", bytes([i % 256]) * 100)
    tier.close()
    db = tmp_path / "cache" / "index.db"
    with sqlite3.connect(db) as side:
        page_size = side.execute("PRAGMA page_size").fetchone()[0]
        side.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db, "r+b") as f:  # damage b-tree pages (not page 1: the file still opens)
        f.seek(page_size * 2)
        f.write(b"\xff" * page_size)
    tier = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=threshold)
    try:
        report = tier.verify()
        assert report["index_damaged"] == 1
        tier.verify(repair=True)
        report = tier.verify()
        if threshold < 0:
            assert report["index_damaged"] == 0 and report["ok"] == 200 == len(tier)
            assert all(tier.get(f"k{i}") == bytes([i % 256]) * 100 for i in range(200))
            assert tier.corruptions >= 1 and tier.index_rebuilds >= 1
        else:
            assert report["index_damaged"] == 0 and report["ok"] == len(tier)
            assert all(tier.get(f"k{i}") in (None, bytes([i % 256]) * 100) for i in range(200))
            assert tier.corruptions >= 1
            assert tier.put("k1", b"again") and tier.get("k1") == b"again"
    finally:
        tier.close()


@pytest.mark.parametrize("threshold", [-1, 64 * 1024], ids=["file", "record"])
def test_payload_header_carries_key_and_namespace(tmp_path: pathlib.Path, threshold: int) -> None:
    """A payload file and a record start with the same header."""
    tier = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=threshold)
    tier.put("s3+http://h/b/ds/v/c/0", b"payload", namespace="s3+http://h/b/ds", expires=5e9)
    where = locate(tier, "s3+http://h/b/ds/v/c/0")
    assert where.in_segment == (threshold > 0)
    raw = where.read()
    fields = HEADER.unpack_from(raw)
    assert fields[0] == b"ZCCH" and fields[1] == FORMAT_VERSION == 2
    ns_len, length, key_len, expires = fields[3], fields[4], fields[6], fields[7]
    assert raw[HEADER.size : HEADER.size + key_len] == b"s3+http://h/b/ds/v/c/0"
    assert raw[HEADER.size + key_len : HEADER.size + key_len + ns_len] == b"s3+http://h/b/ds"
    assert raw[-length:] == b"payload" and math.isclose(expires, 5e9)
    tier.close()
