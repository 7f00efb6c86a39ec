"""Issue 6, part 5: resource exhaustion.

The disk tier's filesystem fills up (a 1 MiB tmpfs mounted for the test when running as
root; injected ``ENOSPC`` otherwise): the cache keeps serving from memory and the inner store
with a warning, never raises, leaves no partial file, and stores again once there is room.
The memory tier stays within its budget under a workload ten times its size.
"""

from __future__ import annotations

import logging
import pathlib
import random
import shutil
import threading
import time

import pytest
from pympler.asizeof import asizeof
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from xarray_zcache import CacheConfig, CachedStore
from xarray_zcache.cache import disk as disk_module
from xarray_zcache.cache.disk import hooks
from xarray_zcache.cache.disk import index as disk_index
from xarray_zcache.testing import faults

P = default_buffer_prototype()


def test_disk_full_rounds(tmp_path: pathlib.Path) -> None:
    result = faults.run_disk_full_rounds(tmp_path, rounds=3, seed=4)
    result.assert_clean()


def test_disk_full_injected_enospc(tmp_path: pathlib.Path) -> None:
    """The same with ``OSError(ENOSPC)`` raised at every write of the folder's files."""
    result = faults.run_disk_full_rounds(tmp_path, rounds=2, seed=5, force_injection=True)
    result.assert_clean()


def test_new_cache_on_a_full_filesystem(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No room even for the index: the tier runs without it (warning), then comes back."""
    monkeypatch.setattr(disk_index, "REOPEN_INTERVAL_S", 0.0)
    keys = faults.dataset_keys(10)
    reference = faults.local_store(tmp_path / "data")
    for key in keys:
        reference.set_sync(key, faults.buf(faults.make_value(key, 1)))
    with faults.small_tmpfs(tmp_path / "mnt") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        assert shutil.disk_usage(tmp_path / "mnt").total <= 1 << 20
        filler = faults.fill_disk(tmp_path / "mnt")
        assert shutil.disk_usage(tmp_path / "mnt").free == 0
        result = faults.ScenarioResult("new cache, full disk")
        with caplog.at_level(logging.WARNING, logger="xarray_zcache"):
            store = faults.cached(tmp_path / "data", tmp_path / "mnt" / "cache", "newcomer")
            faults.compare_all(store, reference, keys, result, "full")
            store.set_sync(keys[0], faults.buf(faults.make_value(keys[0], 2)))
            store.delete_sync(keys[1])
            faults.compare_all(store, reference, keys, result, "full, after writes")
        result.assert_clean()
        assert any("cannot be opened" in r.getMessage() for r in caplog.records)
        assert store.stats().total_misses() >= len(keys)  # served by memory and the store
        filler.unlink()
        store.cache.memory_tier.clear()
        faults.compare_all(store, reference, keys, result, "room again")
        store.cache.flush()
        result.assert_clean()
        disk = store.cache.disk_tier
        assert disk is not None and f"{store.namespace}/{keys[2]}" in disk  # storing again
        store.cache.close()


@pytest.mark.parametrize("packing", [False, True], ids=["file", "record"])
def test_no_partial_files_after_enospc_mid_write(tmp_path: pathlib.Path, packing: bool) -> None:
    """ENOSPC after the header is written (a file) or at the append (a record): the temp
    file is removed, no empty segment is left, nothing is installed."""
    tier = disk_module.DiskTier(
        tmp_path / "cache", 1 << 20, segment_threshold=64 * 1024 if packing else -1
    )
    temps: list[str] = []

    def no_space(temp: str) -> None:  # the payload write, after the header
        temps.append(temp)
        raise OSError(28, "No space left on device")

    try:
        point = "before-append" if packing else "after-header-write"
        with hooks.registered(point, no_space):
            assert not tier.put("k", b"x" * 1000)
        assert temps  # the header of a temp file was written (a segment created) each time
        assert faults.temp_files(tier.path) == [] and faults.payload_files(tier.path) == []
        assert list((tier.path / "segments").glob("*")) == []
        assert tier.get("k") is None and "k" not in tier
        assert tier.put("k", b"y" * 1000) and tier.get("k") == b"y" * 1000
    finally:
        tier.close()


@pytest.mark.parametrize("policy", ["lru", "slru"])
def test_memory_tier_within_budget_under_10x_workload(policy: str) -> None:
    """Threads reading whole objects and ranges of a 10 MB store through a 1 MB memory tier."""
    inner = MemoryStore()
    rng = random.Random(1)
    sizes = {f"v/c/{i}": rng.randint(1_000, 60_000) for i in range(340)}
    for key, size in sizes.items():
        sync(inner.set(key, cpu.Buffer.from_bytes(rng.randbytes(size))))
    assert sum(sizes.values()) > 10 * 1_000_000
    cfg = (
        CacheConfig()
        .with_name(f"budget-{policy}")
        .with_memory_size("1MB")
        .without_disk_cache()
        .with_eviction_policy(policy)  # type: ignore[arg-type]
        .with_prefetch(0)
    )
    store = CachedStore(inner, cfg)
    tier = store.cache.memory_tier
    over: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if tier.used_bytes() > tier.capacity:
                over.append(tier.used_bytes())
            time.sleep(0.0005)

    def reader(seed: int) -> None:
        r = random.Random(seed)
        keys = list(sizes)
        for _ in range(400):
            key = r.choice(keys[:40]) if r.random() < 0.5 else r.choice(keys)  # a hot set
            if r.random() < 0.3:
                start = r.randrange(sizes[key])
                got = sync(store.get(key, P, RangeByteRequest(start, start + 500)))
            else:
                got = store.get_sync(key)
            assert got is not None

    watcher = threading.Thread(target=watch)
    watcher.start()
    readers = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    watcher.join()
    assert over == []
    assert tier.used_bytes() <= tier.capacity
    # the real footprint (payloads, keys, entries, dict slots) is what the budget bounds
    footprint = asizeof(tier._probation) + asizeof(tier._protected)
    assert footprint <= tier.capacity * 1.1, (footprint, tier.capacity)
    stats = store.stats()
    assert stats.evictions["memory"] > 0 and stats.memory_used <= stats.memory_capacity
