"""Writes and deletes through zcache are seen at once; other writers after the TTL."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from xarray_zcache import CacheConfig, CachedStore

P = default_buffer_prototype()


def B(data: bytes) -> cpu.Buffer:
    return cpu.Buffer.from_bytes(data)


def _get(store: CachedStore, key: str, byte_range: Any = None) -> bytes | None:
    buf = sync(store.get(key, P, byte_range))
    return None if buf is None else buf.to_bytes()


@pytest.fixture(params=["local", "s3"])
def store(request: Any, tmp_path: Any) -> CachedStore:
    cfg = CacheConfig().with_memory_size("16MB").with_disk_cache(tmp_path / "cache", "64MB")
    if request.param == "local":
        inner: Any = LocalStore(tmp_path / "data")
    else:
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        inner = FsspecStore.from_url(
            f"s3://{bucket}/data", storage_options=server.storage_options()
        )
    return CachedStore(inner, cfg)


def test_write_then_read_sees_new_bytes(store: CachedStore) -> None:
    sync(store.set("a/c/0", B(b"old")))
    assert _get(store, "a/c/0") == b"old"
    assert _get(store, "a/c/0", zarr.abc.store.RangeByteRequest(0, 2)) == b"ol"
    sync(store.set("a/c/0", B(b"new!")))
    assert _get(store, "a/c/0") == b"new!"
    assert _get(store, "a/c/0", zarr.abc.store.RangeByteRequest(0, 2)) == b"ne"
    assert _get(store, "a/c/0", zarr.abc.store.SuffixByteRequest(1)) == b"!"


def test_ranged_entries_invalidated_by_write(store: CachedStore) -> None:
    """A cached range (no whole object cached) must not survive a write of its key."""
    sync(store.inner.set("k", B(b"0123456789")))
    rng = zarr.abc.store.RangeByteRequest(2, 5)
    assert _get(store, "k", rng) == b"234"
    sync(store.set("k", B(b"abcdefghij")))
    store.cache.memory_tier.delete(store.namespace + "/k")  # force the ranged path again
    store.cache.disk_tier.delete(store.namespace + "/k")  # type: ignore[union-attr]
    assert _get(store, "k", rng) == b"cde"


def test_delete_is_seen_at_once(store: CachedStore) -> None:
    sync(store.set("g/zarr.json", B(b"{}")))
    sync(store.set("g/c/0", B(b"chunk")))
    assert _get(store, "g/c/0") == b"chunk"
    sync(store.delete("g/c/0"))
    assert _get(store, "g/c/0") is None
    sync(store.delete_dir("g"))
    assert _get(store, "g/zarr.json") is None
    assert not sync(store.exists("g/zarr.json"))


def test_listing_sees_writes_through_store(store: CachedStore) -> None:
    async def listing() -> list[str]:
        return sorted([k async for k in store.list_prefix("")])

    assert sync(listing()) == []
    sync(store.set("x/zarr.json", B(b"{}")))
    assert sync(listing()) == ["x/zarr.json"]
    sync(store.delete("x/zarr.json"))
    assert sync(listing()) == []


def test_missing_metadata_then_created_is_found(store: CachedStore) -> None:
    assert _get(store, "new/zarr.json") is None  # negative entry
    assert _get(store, "new/zarr.json") is None  # served by the negative entry
    assert store.stats().negative_hits >= 1
    sync(store.set("new/zarr.json", B(b'{"a": 1}')))
    assert _get(store, "new/zarr.json") == b'{"a": 1}'


def test_missing_chunk_is_remembered_until_written(store: CachedStore) -> None:
    """zarr leaves all-fill chunks unwritten: their absence is cached like data."""
    assert _get(store, "c/9") is None
    before = store.stats().negative_hits
    assert _get(store, "c/9") is None  # served by the negative entry: no request
    assert store.stats().negative_hits == before + 1
    sync(store.set("c/9", B(b"now")))  # a write through zcache is seen at once
    assert _get(store, "c/9") == b"now"


def test_other_writer_seen_after_ttl(tmp_path: Any) -> None:
    cfg = (
        CacheConfig()
        .with_memory_size("16MB")
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_ttl(metadata=0.3, chunks=0.3, negative=0.3, listing=0.3)
    )
    inner = LocalStore(tmp_path / "data")
    store = CachedStore(inner, cfg)
    other = LocalStore(tmp_path / "data")  # another writer, not through zcache
    sync(other.set("c/0", B(b"v1")))
    assert _get(store, "c/0") == b"v1"
    assert _get(store, "m/zarr.json") is None
    sync(other.set("c/0", B(b"v2")))
    sync(other.set("m/zarr.json", B(b"{}")))
    assert _get(store, "c/0") == b"v1"  # within the TTL the cache may serve the old value
    time.sleep(0.4)
    assert _get(store, "c/0") == b"v2"
    assert _get(store, "m/zarr.json") == b"{}"


def test_failed_write_leaves_no_stale_entry(tmp_path: Any) -> None:
    store = CachedStore(
        LocalStore(tmp_path / "data"),
        CacheConfig().with_memory_size("16MB").with_disk_cache(tmp_path / "cache", "64MB"),
    )
    sync(store.set("c/0", B(b"v1")))
    ro = store.with_read_only(True)
    with pytest.raises(ValueError, match="read-only"):
        sync(ro.set("c/0", B(b"v2")))
    assert _get(store, "c/0") == b"v1"  # a refused write changes nothing


def test_cache_on_write_false_only_invalidates(tmp_path: Any) -> None:
    cfg = CacheConfig().with_memory_size("16MB").without_disk_cache().with_cache_on_write(False)
    store = CachedStore(LocalStore(tmp_path / "data"), cfg)
    sync(store.set("c/0", B(b"v1")))
    assert store.namespace + "/c/0" not in store.cache.memory_tier
    assert _get(store, "c/0") == b"v1"


def test_xarray_append_through_zcache_is_seen(tmp_path: Any) -> None:
    """Appending along time through zcache: the next open sees the longer dataset."""
    cfg = CacheConfig().with_memory_size("16MB").with_disk_cache(tmp_path / "cache", "64MB")
    path = str(tmp_path / "ds.zarr")
    ds = xr.Dataset({"v": (("time",), np.arange(4.0))}, coords={"time": np.arange(4)})
    ds.to_zarr(path, zarr_format=3)
    first = xr.open_dataset(path, engine="zcache", cache_config=cfg).load()
    assert first.sizes["time"] == 4
    store = CachedStore(LocalStore(path), cfg)
    more = xr.Dataset({"v": (("time",), np.arange(4.0, 6.0))}, coords={"time": [4, 5]})
    more.to_zarr(store, append_dim="time", zarr_format=3)
    again = xr.open_dataset(path, engine="zcache", cache_config=cfg).load()
    np.testing.assert_array_equal(again.v.values, np.arange(6.0))
