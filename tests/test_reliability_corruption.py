"""Issue 6, part 2: damaged payload files, ``index.db`` and its WAL.

Random bit flips, truncations and garbage: the user always gets the right bytes (re-fetched
when the cached copy is damaged), damage is counted in ``CacheStats.corruptions`` and logged
once, nothing raises, and ``verify(repair=True)`` leaves a consistent folder.
"""

from __future__ import annotations

import logging
import pathlib
import random
import re
import sqlite3
import time
from typing import Any

import pytest
from entry_location import locate

from xarray_zcache.cache.disk import HEADER, DiskTier
from xarray_zcache.testing import faults

#: both layouts of an entry: a payload file of its own, a record in a segment file
LAYOUTS = pytest.mark.parametrize("threshold", [-1, 64 * 1024], ids=["file", "record"])


def _gone(tier: DiskTier, key: str) -> bool:
    """The damaged entry left the index (its file, if it had one, removed)."""
    try:
        where = locate(tier, key)
    except KeyError:
        return True
    return not where.in_segment and not where.exists()


@pytest.mark.parametrize("kind", faults.DAMAGE_KINDS)
def test_damage_is_never_served(tmp_path: pathlib.Path, kind: str) -> None:
    """Each kind twice: once while no process runs, once under a running store."""
    result = faults.run_corruption_rounds(tmp_path, rounds=2, seed=7, kinds=(kind,))
    result.assert_clean()
    assert result.runs == 2


def test_random_damage_rounds(tmp_path: pathlib.Path) -> None:
    result = faults.run_corruption_rounds(tmp_path, rounds=36, seed=2024)
    result.assert_clean()


# --------------------------------------------------------------------------- header fields

#: byte ranges of the fixed header (see xarray_zcache.cache.disk), then key, namespace, payload
_REGIONS = {
    "magic": (0, 4),
    "version": (4, 5),
    "flags": (5, 6),
    "namespace length": (6, 8),
    "payload length": (8, 16),
    "payload crc": (16, 20),
    "key length": (20, 24),
    "expires": (24, 32),
    "header crc": (32, 36),
    "key hash": (40, 72),
}


@LAYOUTS
@pytest.mark.parametrize("region", [*_REGIONS, "key", "namespace", "payload"])
def test_every_bit_of_a_payload_file_is_checked(
    tmp_path: pathlib.Path, region: str, threshold: int
) -> None:
    """A flip anywhere but in the 4 padding bytes is caught (the expiry and the key too),
    in a payload file and in a record."""
    tier = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=threshold)
    key, ns = "ns/v/c/0", "ns"
    value = faults.make_value(key, 3)
    try:
        rng = random.Random(region)
        for _ in range(8):
            assert tier.put(key, value, namespace=ns, expires=time.time() + 3600)
            where = locate(tier, key)
            assert where.in_segment == (threshold > 0)
            key_len = len(key)
            start, stop = _REGIONS.get(region, (0, 0))
            if region == "key":
                start, stop = HEADER.size, HEADER.size + key_len
            elif region == "namespace":
                start, stop = HEADER.size + key_len, HEADER.size + key_len + len(ns)
            elif region == "payload":
                start, stop = HEADER.size + key_len + len(ns), where.length
            faults.flip_bit(where.path, rng, where.start + rng.randrange(start, stop))
            before = tier.corruptions
            assert tier.get(key) is None
            assert tier.corruptions == before + 1
            assert _gone(tier, key)
        # the padding carries nothing: a flip there is harmless
        assert tier.put(key, value, namespace=ns)
        where = locate(tier, key)
        faults.flip_bit(where.path, rng, where.start + faults.HEADER_PAD.start)
        assert tier.get(key) == value
    finally:
        tier.close()


@LAYOUTS
def test_flipped_expiry_never_serves_an_expired_entry(
    tmp_path: pathlib.Path, threshold: int
) -> None:
    """The expiry sits in the header: before format 2 a flip could make an entry immortal."""
    tier = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=threshold)
    try:
        for bit in range(64):
            tier.put("k", b"v", expires=time.time() + 0.05)
            where = locate(tier, "k")
            raw = bytearray(where.read())
            raw[24 + bit // 8] ^= 1 << (bit % 8)
            where.write(bytes(raw))
            assert tier.get("k") is None
    finally:
        tier.close()


# --------------------------------------------------------------------------- counted, logged once


def _fill(tmp_path: pathlib.Path, n: int = 20) -> tuple[Any, list[str]]:
    keys = faults.dataset_keys(n)
    data = faults.local_store(tmp_path / "data")
    for i, key in enumerate(keys):
        data.set_sync(key, faults.buf(faults.make_value(key, i)))
    store = faults.cached(tmp_path / "data", tmp_path / "cache", "filler")
    for key in keys:
        store.get_sync(key)
    store.cache.close()
    return store, keys


def test_damage_is_counted_and_logged_once(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    _store, keys = _fill(tmp_path)
    rng = random.Random(5)
    spans = [s for s in faults.entry_spans(tmp_path / "cache") if s.kind == "chunk"]
    assert len(spans) == 17 and all(s.in_segment for s in spans)  # records (the default)
    for span in spans[:10]:
        with open(span.path, "r+b") as f:  # truncated: the end of its bytes gone (zeroed)
            cut = rng.randrange(span.length)
            if span.in_segment:
                f.seek(span.start + cut)
                f.write(bytes(span.length - cut))
            else:
                f.truncate(cut)
    for span in spans[10:15]:
        faults.flip_bit(span.path, rng, span.start + span.length - 1)
    reader = faults.cached(tmp_path / "data", tmp_path / "cache", "reader")
    result = faults.ScenarioResult("counted")
    with caplog.at_level(logging.DEBUG, logger="xarray_zcache"):
        faults.compare_all(reader, faults.local_store(tmp_path / "data"), keys, result, "x")
    result.assert_clean()
    stats = reader.stats()
    assert stats.corruptions == 15
    assert stats.total_misses() == 15  # exactly the damaged entries were fetched again
    assert "corrupt entries dropped" in str(stats) and stats.to_dict()["corruptions"] == 15
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert re.search("damaged (payload file|record)", warnings[0].getMessage())
    reader.cache.close()


def test_damaged_index_is_counted_in_stats(tmp_path: pathlib.Path) -> None:
    _store, keys = _fill(tmp_path)
    db = tmp_path / "cache" / "index.db"
    db.write_bytes(b"this is not an SQLite database" * 100)
    reader = faults.cached(tmp_path / "data", tmp_path / "cache", "reader")
    result = faults.ScenarioResult("index")
    faults.compare_all(reader, faults.local_store(tmp_path / "data"), keys, result, "x")
    result.assert_clean()
    assert reader.cache.disk_tier.corruptions == 1  # the tier saw it...
    assert reader.stats().corruptions >= 1  # ...the user's stats do not
    reader.cache.close()


@LAYOUTS
def test_damaged_index_under_a_running_store_is_rebuilt(
    tmp_path: pathlib.Path, threshold: int
) -> None:
    """SQLite reports the damage mid-operation: the tier rebuilds the index and retries.

    The rebuild recovers payload files; records are not recovered (without the index a dead
    record cannot be told from a live one): they are misses, never stale values.
    """
    tier = DiskTier(tmp_path / "cache", 1 << 20, segment_threshold=threshold)
    try:
        for i in range(300):
            tier.put(f"k{i}", bytes([i % 256]) * 50)
        with sqlite3.connect(tier.path / "index.db") as side:
            side.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            page_size = side.execute("PRAGMA page_size").fetchone()[0]
            pages = side.execute("PRAGMA page_count").fetchone()[0]
        with open(tier.path / "index.db", "r+b") as f:
            for page in range(1, pages):
                f.seek(page * page_size)
                f.write(b"\xa5" * page_size)
        # the running connection's page cache does not know: force it to read again
        tier._conn.execute("PRAGMA cache_size=0")  # type: ignore[union-attr]
        tier._conn.execute("PRAGMA shrink_memory")  # type: ignore[union-attr]
        tier.delete("k1")  # must not raise; the tombstone is recorded in the new index
        assert tier.put("k-new", b"new")
        assert tier.get("k-new") == b"new" and tier.get("k1") is None
        report = tier.verify()
        if threshold < 0:
            assert tier.index_rebuilds >= 1
            assert all(tier.get(f"k{i}") == bytes([i % 256]) * 50 for i in range(2, 300))
            assert report["index_damaged"] == 0 and report["ok"] == len(tier) == 300
        else:
            got = [tier.get(f"k{i}") for i in range(2, 300)]
            assert all(g is None for g in got)  # misses (fetched again), never stale
            assert report["index_damaged"] == 0 and report["ok"] == len(tier) == 1
            assert tier.put("k2", b"again") and tier.get("k2") == b"again"
    finally:
        tier.close()
