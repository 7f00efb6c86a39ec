"""zarr's own store conformance suite, run against CachedStore over three inner stores.

The suite writes and reads the inner store directly (bypassing the cache) to check
the store under test, i.e. it behaves like another writer. Caches here therefore
use listing and negative TTLs of 0: a change made by another writer is seen after
the TTL, and the suite expects it at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.storage import LocalStore, MemoryStore
from zarr.testing.store import StoreTests

from xarray_zcache import CacheConfig, CachedStore
from xarray_zcache.testing.writers import async_s3fs_store


def _config(disk_path: Any = None) -> CacheConfig:
    cfg = CacheConfig().with_memory_size("16MB").with_ttl(listing=0, negative=0)
    return cfg.with_disk_cache(disk_path, "64MB") if disk_path else cfg.without_disk_cache()


class _CachedStoreTests(StoreTests[CachedStore, cpu.Buffer]):
    store_cls = CachedStore
    buffer_cls = cpu.Buffer

    async def set(self, store: CachedStore, key: str, value: Any) -> None:
        # another writer: straight to the inner store
        await store.inner.set(key, value)

    async def get(self, store: CachedStore, key: str) -> Any:
        return await store.inner.get(key, prototype=default_buffer_prototype())

    def test_store_repr(self, store: CachedStore) -> None:
        assert repr(store).startswith("CachedStore(")
        assert str(store).startswith("zcache::")

    def test_store_supports_writes(self, store: CachedStore) -> None:
        assert store.supports_writes == store.inner.supports_writes

    def test_store_supports_listing(self, store: CachedStore) -> None:
        assert store.supports_listing


class TestCachedMemoryStore(_CachedStoreTests):
    @pytest.fixture
    def store_kwargs(self) -> dict[str, Any]:
        return {"store": MemoryStore(), "config": _config()}


class TestCachedLocalStore(_CachedStoreTests):
    @pytest.fixture
    def store_kwargs(self, tmp_path: Any) -> dict[str, Any]:
        (tmp_path / "data").mkdir(exist_ok=True)
        return {
            "store": LocalStore(tmp_path / "data"),
            "config": _config(tmp_path / "cache"),
        }


class TestCachedFsspecStore(_CachedStoreTests):
    @pytest.fixture
    async def store_kwargs(
        self, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Any
    ) -> AsyncIterator[dict[str, Any]]:
        # the FsspecStore.from_url zarr builds; its aiohttp session (opened on the test's
        # event loop) is closed before that loop ends
        async with async_s3fs_store(f"s3://{s3_bucket}/root", s3_options) as inner:
            yield {"store": inner, "config": _config(tmp_path / "cache")}

    def test_store_supports_writes(self, store: CachedStore) -> None:
        assert store.supports_writes


class TestCachedObstoreLocalStore(_CachedStoreTests):
    @pytest.fixture
    def store_kwargs(self, tmp_path: Any) -> dict[str, Any]:
        from obstore.store import LocalStore as ObsLocalStore
        from zarr.storage import ObjectStore

        (tmp_path / "data").mkdir(exist_ok=True)
        inner = ObjectStore(ObsLocalStore(str(tmp_path / "data")))
        return {"store": inner, "config": _config(tmp_path / "cache")}


class TestCachedObstoreMemoryStore(_CachedStoreTests):
    @pytest.fixture
    def store_kwargs(self, tmp_path: Any) -> dict[str, Any]:
        from obstore.store import MemoryStore as ObsMemoryStore
        from zarr.storage import ObjectStore

        return {"store": ObjectStore(ObsMemoryStore()), "config": _config(tmp_path / "cache")}

    async def test_serializable_store(self, store: CachedStore) -> None:
        pytest.skip("obstore's MemoryStore cannot be pickled (obstore itself refuses)")


def test_icechunk_writable_session_matches_the_bare_session(tmp_path: Any) -> None:
    """Icechunk accepts only keys of a zarr hierarchy (StoreTests' ``foo`` is refused by
    Icechunk itself): the same zarr operations on a bare session and on a cached one
    (from the same base snapshot) must answer alike, writes, overwrites, deletes and
    listings included."""
    import numpy as np
    import zarr
    from zarr.core.sync import sync

    icechunk = pytest.importorskip("icechunk")
    repo = icechunk.Repository.create(icechunk.in_memory_storage())
    bare = repo.writable_session("main").store
    cached = CachedStore(repo.writable_session("main").store, _config(tmp_path / "cache"))
    answers = []
    for store in (bare, cached):
        got: list[Any] = []
        root = zarr.open_group(store, mode="w")
        arr = root.create_array("v", shape=(40,), chunks=(10,), dtype="f8", fill_value=-1)
        arr[:25] = np.arange(25.0)
        got.append(arr[:].tolist())
        arr[5:15] = 0.5
        got.append(zarr.open_array(store, path="v", mode="r")[:].tolist())
        sync(store.delete("v/c/1"))
        got.append(zarr.open_array(store, path="v", mode="r")[:].tolist())
        got.append(sorted(sync(_listed(store))))
        root.create_array("w", shape=(3,), dtype="i4")[:] = [1, 2, 3]
        got.append(sorted(root.array_keys()))
        answers.append(got)
    assert answers[0] == answers[1]


async def _listed(store: Any) -> list[str]:
    return [k async for k in store.list()]
