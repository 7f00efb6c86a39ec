"""The ``zcache`` engine: URLs and stores, zarr formats 2 and 3, groups, datatree, options."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from xarray_zcache import CacheConfig, get_cache
from xarray_zcache.backend import ZCacheBackendEntrypoint, open_store
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import s3fs_store, write_zarr

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def config(tmp_path: Any) -> CacheConfig:
    return CacheConfig().with_memory_size("32MB").with_disk_cache(tmp_path / "cache", "64MB")


def _ds() -> xr.Dataset:
    return xr.Dataset(
        {"t": (("time", "x"), np.arange(40.0).reshape(8, 5)), "q": (("x",), np.ones(5))},
        coords={"time": np.arange(8)},
        attrs={"title": "sample"},
    )


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("consolidated", [True, False])
def test_local_formats(
    tmp_path: Any, config: CacheConfig, zarr_format: int, consolidated: bool
) -> None:
    path = tmp_path / "d.zarr"
    _ds().to_zarr(path, zarr_format=zarr_format, consolidated=consolidated)
    for url in (str(path), f"file://{path}", f"zcache::{path}"):
        ds = xr.open_dataset(url, engine="zcache", cache_config=config, chunks={})
        xr.testing.assert_identical(ds.load(), _ds())
    assert get_cache(config).stats().total_hits() > 0


def test_s3_groups_datatree_and_options(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    url = f"s3://{s3_bucket}/tree.zarr"
    write_zarr(_ds(), url, s3_options, group="a", zarr_format=3)
    child = _ds().isel(time=slice(0, 2)).rename(time="step", x="y")  # a tree must align
    write_zarr(child, url, s3_options, group="a/b", zarr_format=3)
    ds = xr.open_dataset(
        url,
        engine="zcache",
        group="a/b",
        storage_options=s3_options,
        cache_config=config,
        drop_variables=["q"],
    )
    assert set(ds.data_vars) == {"t"} and ds.sizes["step"] == 2
    tree = xr.open_datatree(url, engine="zcache", storage_options=s3_options, cache_config=config)
    assert tree["a/b"].ds.sizes["step"] == 2
    xr.testing.assert_identical(tree["a"].to_dataset().load(), _ds())
    groups = ZCacheBackendEntrypoint().open_groups_as_dict(
        url, storage_options=s3_options, cache_config=config
    )
    assert "/a/b" in groups


def test_sharded_dataset_through_engine(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    url = f"s3://{s3_bucket}/sharded.zarr"
    ds = xr.Dataset({"v": (("y", "x"), np.arange(64 * 64, dtype="i4").reshape(64, 64))})
    write_zarr(
        ds, url, s3_options, zarr_format=3, encoding={"v": {"chunks": (8, 8), "shards": (32, 32)}}
    )
    opened = xr.open_dataset(url, engine="zcache", storage_options=s3_options, cache_config=config)
    np.testing.assert_array_equal(opened.v.values, ds.v.values)
    before = s3_server.requests.chunk_gets(s3_bucket)
    again = xr.open_dataset(url, engine="zcache", storage_options=s3_options, cache_config=config)
    np.testing.assert_array_equal(again.v.values, ds.v.values)
    assert s3_server.requests.chunk_gets(s3_bucket) - before == 0


def test_store_object_and_named_config(tmp_path: Any) -> None:
    import dask.config

    path = tmp_path / "d.zarr"
    _ds().to_zarr(path, zarr_format=3)
    store = zarr.storage.LocalStore(path, read_only=True)
    caches = {"mine": {"memory-size": "8MB", "disk": {"path": str(tmp_path / "c"), "size": "8MB"}}}
    with dask.config.set({"zcache.caches": caches}):
        ds = xr.open_dataset(store, engine="zcache", cache_config="mine")
        xr.testing.assert_identical(ds.load(), _ds())
        cached = open_store(store, cache_config="mine")
        assert cached.config.name == "mine" and cached.config.memory_size == 8_000_000


def test_guess_can_open_only_the_prefix() -> None:
    entry = ZCacheBackendEntrypoint()
    assert entry.guess_can_open("zcache::s3://bucket/x.zarr")
    assert not entry.guess_can_open("s3://bucket/x.zarr")
    assert not entry.guess_can_open("/tmp/x.zarr")


def _chain_options(s3_options: dict[str, Any], tmp_path: Any) -> dict[str, Any]:
    return {"s3": s3_options, "simplecache": {"cache_storage": str(tmp_path / "sc")}}


@pytest.mark.parametrize("prefix", ["", "zcache::"])
def test_chained_s3_url_opens_as_with_the_zarr_engine(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    config: CacheConfig,
    tmp_path: Any,
    prefix: str,
) -> None:
    write_zarr(_ds(), f"s3://{s3_bucket}/x.zarr", s3_options, zarr_format=3)
    url = f"simplecache::s3://{s3_bucket}/x.zarr"
    options = _chain_options(s3_options, tmp_path)
    with s3fs_store(url, options, read_only=True) as plain:  # (its session closed after)
        expected = xr.open_dataset(plain, engine="zarr").load()
    ds = xr.open_dataset(
        prefix + url, engine="zcache", storage_options=options, cache_config=config
    )
    xr.testing.assert_identical(ds.load(), expected)
    before = s3_server.requests.chunk_gets(s3_bucket)
    again = xr.open_dataset(url, engine="zcache", storage_options=options, cache_config=config)
    xr.testing.assert_identical(again.load(), expected)
    assert s3_server.requests.chunk_gets(s3_bucket) == before  # served by the cache
    # the s3 link of the chain gets the read tuning, the user's own values kept
    store = open_store(prefix + url, storage_options=options, cache_config=config)
    s3fs = store.inner.fs.fs  # type: ignore[attr-defined]
    assert s3fs.max_concurrency == 1
    assert s3fs.config_kwargs["max_pool_connections"] == 64
    assert s3fs.config_kwargs["s3"] == s3_options["config_kwargs"]["s3"]
    assert s3_bucket in store.namespace and s3_server.endpoint_url in store.namespace


def test_plain_s3_url_keeps_its_tuning(
    s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    config = config.with_client("s3fs")  # the tuning of s3fs, when s3fs reads the URL
    options = {k: v for k, v in s3_options.items() if k != "max_concurrency"}
    store = open_store(f"s3://{s3_bucket}/x.zarr", storage_options=options, cache_config=config)
    fs = store.inner.fs  # type: ignore[attr-defined]
    assert fs.max_concurrency == 1 and fs.config_kwargs["max_pool_connections"] == 64
    mine = {**options, "max_concurrency": 4, "config_kwargs": {"max_pool_connections": 8}}
    store = open_store(
        f"zcache::s3://{s3_bucket}/x.zarr", storage_options=mine, cache_config=config
    )
    fs = store.inner.fs  # type: ignore[attr-defined]
    assert fs.max_concurrency == 4 and fs.config_kwargs["max_pool_connections"] == 8


def test_memory_url_and_bad_chains(config: CacheConfig) -> None:
    _ds().to_zarr("memory://zcache-test/m.zarr", zarr_format=3, mode="w")
    ds = xr.open_dataset("memory://zcache-test/m.zarr", engine="zcache", cache_config=config)
    xr.testing.assert_identical(ds.load(), _ds())
    with pytest.raises(ValueError, match=r"unknown or unavailable URL scheme 'nosuch'"):
        open_store("nosuch::s3://bucket/x.zarr", cache_config=config)
    with pytest.raises(ValueError, match=r"storage_options\['s3'\]: expected a mapping"):
        open_store("simplecache::s3://b/x.zarr", storage_options={"s3": 1}, cache_config=config)


@pytest.mark.parametrize("opener", [xr.open_dataset, xr.open_datatree])
def test_consolidated_metadata_warning_points_at_the_caller(
    tmp_path: Any, config: CacheConfig, opener: Any
) -> None:
    path = tmp_path / "plain.zarr"
    _ds().to_zarr(path, zarr_format=3, consolidated=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opened = opener(path, engine="zcache", cache_config=config)
    found = [w for w in caught if "consolidated metadata" in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in caught]
    assert found[0].category is RuntimeWarning
    assert found[0].filename == __file__
    assert "t" in (opened.data_vars if isinstance(opened, xr.Dataset) else opened.ds.data_vars)
    # consolidated metadata present, or consolidated given: no warning
    _ds().to_zarr(tmp_path / "cons.zarr", zarr_format=2, consolidated=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opener(tmp_path / "cons.zarr", engine="zcache", cache_config=config)
        opener(path, engine="zcache", cache_config=config, consolidated=False)
    assert not [w for w in caught if "consolidated metadata" in str(w.message)]
