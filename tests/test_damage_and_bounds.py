"""Damaged disk entries are misses, never wrong bytes; sizes stay within their budgets."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
from typing import Any

import pytest
from entry_location import locate
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from xarray_zcache import CacheConfig, CachedStore
from xarray_zcache.cache.hybrid import HybridCache

P = default_buffer_prototype()


def _fresh_reader(tmp_path: Any) -> CachedStore:
    """A store over the same data and disk folder, with an empty memory tier (a new process)."""
    cfg = (
        CacheConfig()
        .with_name(f"reader-{random.random()}")
        .with_memory_size("16MB")
        .with_disk_cache(tmp_path / "cache", "64MB")
    )
    return CachedStore(LocalStore(tmp_path / "data"), cfg)


def _filled(tmp_path: Any, pack_below: int | str = "64KiB") -> tuple[CachedStore, bytes]:
    cfg = (
        CacheConfig()
        .with_memory_size("16MB")
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_disk_packing(pack_below)
    )
    store = CachedStore(LocalStore(tmp_path / "data"), cfg)
    value = os.urandom(10_000)
    sync(store.inner.set("v/c/0", cpu.Buffer.from_bytes(value)))
    assert sync(store.get("v/c/0", P)).to_bytes() == value  # type: ignore[union-attr]
    store.cache.flush()
    return store, value


@pytest.mark.parametrize("pack_below", [0, "64KiB"], ids=["file", "record"])
@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete_file", "delete_row", "garbage"])
def test_damaged_entry_returns_correct_bytes(
    tmp_path: Any, damage: str, pack_below: int | str
) -> None:
    store, value = _filled(tmp_path, pack_below)
    ck = store.namespace + "/v/c/0"
    where = locate(tmp_path / "cache", ck)  # a payload file, or a record in a segment
    assert where.in_segment == (pack_below != 0)
    if damage == "truncate":
        where.truncate(len(where.read()) // 2)
    elif damage == "bitflip":
        raw = bytearray(where.read())
        raw[-100] ^= 0x10
        where.write(bytes(raw))
    elif damage == "delete_file":
        where.remove()
    elif damage == "delete_row":
        import sqlite3

        with sqlite3.connect(tmp_path / "cache" / "index.db") as db:
            db.execute("DELETE FROM entries WHERE key = ?", (ck,))
    else:
        where.write(b"not a cache file at all")

    reader = _fresh_reader(tmp_path)
    got = sync(reader.get("v/c/0", P))
    assert got is not None and got.to_bytes() == value
    stats = reader.stats()
    if damage in ("truncate", "bitflip", "garbage"):
        assert stats.corruptions >= 1
        assert stats.total_misses("chunk") == 1  # re-fetched from the inner store
    # and the entry is healthy again for the next reader
    reader.cache.flush()
    again = _fresh_reader(tmp_path)
    assert sync(again.get("v/c/0", P)).to_bytes() == value  # type: ignore[union-attr]


def test_memory_and_disk_stay_within_budget(tmp_path: Any) -> None:
    cfg = (
        CacheConfig()
        .with_memory_size("1MB")
        .with_disk_cache(tmp_path / "cache", "2MB")
        .with_max_object_size("300kB")
    )
    cache = HybridCache(cfg)
    try:
        rng = random.Random(1)
        written = 0
        for i in range(400):  # ~20 MB: 10x the disk budget, 20x memory
            size = rng.randint(10_000, 100_000)
            cache.put(f"ns/k{i}", os.urandom(size), kind="chunk", namespace="ns")
            written += size
            assert cache.memory_tier.used_bytes() <= cfg.memory_size
            if i % 50 == 0:
                cache.flush()
                assert cache.disk_tier is not None and cache.disk_tier.used_bytes() <= cfg.disk_size
        assert written > 10 * cfg.disk_size
        assert not cache.put("ns/big", b"x" * 400_000, kind="chunk", namespace="ns")
        cache.flush()
        assert "ns/big" not in cache.memory_tier
        assert cache.disk_tier is not None and "ns/big" not in cache.disk_tier
        assert cache.disk_tier.used_bytes() <= cfg.disk_size
        on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*/*/*.cache"))
        assert on_disk <= cfg.disk_size * 1.05  # payload files (+ small headers)
        stats = cache.stats()
        assert stats.memory_used <= stats.memory_capacity
        assert stats.evictions["memory"] > 0 and stats.evictions["disk"] > 0
    finally:
        cache.close()


def test_cache_folder_is_private(tmp_path: Any) -> None:
    _filled(tmp_path)
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    stored = [*(tmp_path / "cache").glob("*/*/*.cache"), *(tmp_path / "cache").glob("segments/*")]
    assert stored  # payload files, or segment files (records: the default)
    for p in stored:
        assert p.stat().st_mode & 0o777 == 0o600


def _worker(args: tuple[str, int, int]) -> int:
    folder, seed, n_ops = args
    rng = random.Random(seed)
    cfg = (
        CacheConfig()
        .with_memory_size("256kB")  # small: most reads go to disk, where the processes meet
        .with_disk_cache(os.path.join(folder, "cache"), "512kB")
    )
    store = CachedStore(LocalStore(os.path.join(folder, "data")), cfg)
    bad = 0
    for _ in range(n_ops):
        k = rng.randrange(40)
        key = f"c/{k}"
        op = rng.random()
        if op < 0.3:
            version = rng.randrange(1_000_000)
            body = f"{key}:{version}:".encode() * rng.randint(10, 2000)
            sync(store.set(key, cpu.Buffer.from_bytes(body)))
        elif op < 0.4:
            sync(store.delete(key))
        else:
            buf = sync(store.get(key, P))
            if buf is not None:
                data = buf.to_bytes()
                # a valid value of *this* key: one (key, version) unit repeated, never torn
                unit = data[: data.index(b":", len(key) + 1) + 1]
                if not unit.startswith(f"{key}:".encode()) or data != unit * (
                    len(data) // len(unit)
                ):
                    bad += 1
    store.cache.close()
    return bad


def test_two_processes_share_one_disk_folder(tmp_path: Any) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        bad = pool.map(_worker, [(str(tmp_path), seed, 1500) for seed in (1, 2)])
    assert bad == [0, 0]
    from xarray_zcache.cache.disk import DiskTier

    disk = DiskTier(tmp_path / "cache", 512_000)
    try:
        report = disk.verify()
        assert disk.used_bytes() <= 512_000
    finally:
        disk.close()
    bad_counts = {k: v for k, v in report.items() if k != "ok" and v}
    assert not bad_counts, report
