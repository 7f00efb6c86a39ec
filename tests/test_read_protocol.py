"""The read protocol owned by `HybridCache`: races driven through its named hooks.

Each test reproduces a fault of the first release (issue 9, faults 1, 2 and 4)
deterministically: a hook runs the competing write at the exact point where the
old code let a stale value back into the cache.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from xarray_zcache import CacheConfig, CachedStore
from xarray_zcache.cache import CacheSettings, HybridCache, Read
from xarray_zcache.registry import close_all

P = default_buffer_prototype()


def B(data: bytes) -> Any:
    return P.buffer.from_bytes(data)


@pytest.fixture(autouse=True)
def _fresh_caches() -> Any:
    yield
    close_all()


def _disk_config(tmp_path: Path) -> CacheConfig:
    return (
        CacheConfig()
        .with_name(f"proto-{tmp_path.name}")
        .with_memory_size("8MB")
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_prefetch(0)
    )


def _value(store: CachedStore, key: str) -> bytes | None:
    buf = store.get_sync(key, prototype=P)  # type: ignore[attr-defined]
    return None if buf is None else buf.to_bytes()


@pytest.mark.parametrize("path", ["sync", "async"])
def test_disk_hit_promotion_after_a_write_is_dropped(tmp_path: Path, path: str) -> None:
    """Fault 1: a disk hit read the old bytes while a write completed: no stale promotion."""
    cfg = _disk_config(tmp_path)
    store = CachedStore(LocalStore(tmp_path / "data"), cfg)
    sync(store.set("a/c/0", B(b"old")))
    cache = store.cache
    cache.flush()
    # the value is on disk only (as in a new process)
    cache.memory_tier.delete(store.namespace + "/a/c/0")
    sync(store.inner.set("a/c/0", B(b"old")))  # the disk entry came from a read
    cache.invalidate(store.namespace + "/a/c/0")
    assert _value(store, "a/c/0") == b"old"
    cache.flush()
    cache.memory_tier.delete(store.namespace + "/a/c/0")
    assert cache.disk_tier is not None and store.namespace + "/a/c/0" in cache.disk_tier

    writes = []

    def write_meanwhile(key: str) -> None:
        if not writes:
            writes.append(key)
            store.set_sync("a/c/0", B(b"new"))  # type: ignore[attr-defined]

    cache.hooks["disk-read"] = write_meanwhile
    if path == "sync":
        first = _value(store, "a/c/0")
    else:
        buf = sync(store.get("a/c/0", P))
        first = None if buf is None else buf.to_bytes()
    del cache.hooks["disk-read"]
    assert writes, "the hook did not run: the read did not come from disk"
    assert first in (b"old", b"new")  # concurrent with the write: either is right
    assert _value(store, "a/c/0") == b"new"
    assert sync(store.get("a/c/0", P)).to_bytes() == b"new"  # type: ignore[union-attr]


def test_promotion_keeps_kind_and_expiry(tmp_path: Path) -> None:
    """Fault 2: the scheduler's promotion kept neither the kind nor the expiry."""
    cache = HybridCache(
        CacheSettings(
            memory_size=1_000_000,
            disk_path=str(tmp_path / "cache"),
            disk_size=10_000_000,
            metadata_ttl=30.0,
        )
    )
    try:
        assert cache.put("ns/a/zarr.json", b"{}", kind="metadata", namespace="ns")
        cache.flush()
        cache.memory_tier.delete("ns/a/zarr.json")
        assert cache.promote(["ns/a/zarr.json"]) == 1
        assert cache.memory_tier.peek("ns/a/zarr.json") == b"{}"
        # promoted metadata expires with its TTL: 60 s from now it is gone
        cache.memory_tier.drop_expired(time.time() + 60)
        assert cache.memory_tier.peek("ns/a/zarr.json") is None
        assert cache.stats().promotions == 1
    finally:
        cache.close()


def test_sync_admission_and_write_do_not_interleave(tmp_path: Path) -> None:
    """Fault 4: a reader preempted between its check and its put stored an older value.

    The hook runs inside the admission (after the check). A writer thread starts
    there; with check-then-put atomic it cannot complete until the admission did,
    so its invalidation comes after and removes the old value.
    """
    store = CachedStore(MemoryStore(), CacheConfig().without_disk_cache().with_prefetch(0))
    sync(store.inner.set("k", B(b"old")))
    cache = store.cache
    done = threading.Event()

    def write_during_admission(key: str) -> None:
        if done.is_set() or not key.endswith("/k"):
            return
        t = threading.Thread(
            target=lambda: (store.set_sync("k", B(b"new")), done.set())  # type: ignore[attr-defined]
        )
        t.start()
        done.wait(0.5)  # with the lock held, the writer cannot finish meanwhile

    cache.hooks["admit"] = write_during_admission
    first = _value(store, "k")
    done.wait(10)
    del cache.hooks["admit"]
    assert done.is_set()
    assert first in (b"old", b"new")
    assert _value(store, "k") == b"new"


def test_get_or_load_single_flight_counts_one_request() -> None:
    """Concurrent misses of one key on one loop: one load, the rest join it."""
    import asyncio

    cache = HybridCache(CacheSettings(memory_size=1_000_000))
    calls = 0

    async def load() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return b"x"

    async def main() -> list[bytes | None]:
        return await asyncio.gather(
            *(cache.get_or_load(Read("ns/k", "chunk"), load) for _ in range(8))
        )

    assert asyncio.run(main()) == [b"x"] * 8
    assert calls == 1
    s = cache.stats()
    assert s.requests_sent == 1
    cache.close()


def test_cache_package_imports_no_zarr_dask_or_xarray() -> None:
    """Layers: `xarray_zcache.cache` (and its disk tier) load none of zarr, xarray, dask."""
    code = (
        "import sys, xarray_zcache.cache, xarray_zcache.cache.disk, xarray_zcache.keys;"
        "bad = [m for m in ('zarr', 'xarray', 'dask', 'distributed') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_scheduler_module_does_not_import_zarr() -> None:
    code = (
        "import sys, xarray_zcache.distributed.scheduler;"
        "print([m for m in ('zarr', 'xarray') if m in sys.modules]);"
        "sys.exit(1 if 'zarr' in sys.modules else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_zarr_array_round_trip_through_the_chain(tmp_path: Path) -> None:
    store = CachedStore(LocalStore(tmp_path / "data"), _disk_config(tmp_path))
    arr = zarr.create_array(store, shape=(8,), chunks=(2,), dtype="i4")
    arr[:] = list(range(8))
    assert arr[:].tolist() == list(range(8))
