"""Never mixing versions, and misses that cannot hide new data (issue 11, first slices).

Another writer (plain xarray/zarr, not through zcache) changes the data; readers
through zcache must see either the old or the new data — never a mix — and the
new data once the metadata is read again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from xarray_zcache import CacheConfig
from xarray_zcache.registry import close_all


def _cfg(tmp_path: Path, name: str, **ttl: Any) -> CacheConfig:
    cfg = (
        CacheConfig()
        .with_name(name)
        .with_memory_size("16MB")
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_prefetch(0)
    )
    return cfg.with_ttl(**ttl) if ttl else cfg


def _series(n: int, dtype: str = "f8", offset: float = 0.0) -> xr.Dataset:
    return xr.Dataset({"v": ("time", (np.arange(n) + offset).astype(dtype))})


def _read(path: Path, cfg: CacheConfig) -> np.ndarray:
    with xr.open_dataset(path, engine="zcache", cache_config=cfg, chunks=None) as ds:
        return np.asarray(ds.v.values)


def test_one_ttl_sets_every_kind() -> None:
    cfg = CacheConfig().with_ttl(5)
    assert (cfg.metadata_ttl, cfg.chunk_ttl, cfg.listing_ttl, cfg.negative_ttl) == (5, 5, 5, 5)
    cfg = CacheConfig().with_ttl("1 hour", chunks=None)
    assert cfg.metadata_ttl == 3600 and cfg.chunk_ttl is None and cfg.negative_ttl == 3600


def test_append_by_another_writer_is_read_whole_once_metadata_refreshes(tmp_path: Path) -> None:
    path = tmp_path / "series.zarr"
    _series(10).to_zarr(path, encoding={"v": {"chunks": (4,)}}, zarr_format=3)
    cfg = _cfg(tmp_path, "append", metadata=1)
    assert _read(path, cfg).tolist() == list(range(10))
    _series(12).isel(time=slice(10, 12)).to_zarr(path, append_dim="time")
    got = _read(path, cfg)  # within the metadata TTL: the old version, whole
    assert got.tolist() in (list(range(10)), list(range(12)))
    time.sleep(1.2)
    assert _read(path, cfg).tolist() == list(range(12))  # not [..., 9, nan, nan]
    close_all()  # a new process on the same folder
    assert _read(path, cfg).tolist() == list(range(12))


def test_append_with_default_settings_never_mixes(tmp_path: Path) -> None:
    path = tmp_path / "series.zarr"
    _series(10).to_zarr(path, encoding={"v": {"chunks": (4,)}}, zarr_format=3)
    cfg = _cfg(tmp_path, "append-default")
    assert _read(path, cfg).tolist() == list(range(10))
    _series(12).isel(time=slice(10, 12)).to_zarr(path, append_dim="time")
    for _ in range(2):
        assert _read(path, cfg).tolist() in (list(range(10)), list(range(12)))
        close_all()


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_rewrite_with_mode_w_by_another_writer(tmp_path: Path, change: str) -> None:
    path = tmp_path / "data.zarr"
    _series(10, "i8").to_zarr(path, encoding={"v": {"chunks": (4,)}}, zarr_format=3)
    cfg = _cfg(tmp_path, f"rewrite-{change}", metadata=1)
    assert _read(path, cfg).tolist() == list(range(10))
    new = _series(12, "i8") if change == "shape" else _series(10, "f8", 0.5)
    new.to_zarr(path, mode="w", encoding={"v": {"chunks": (4,)}}, zarr_format=3)
    time.sleep(1.2)
    for _ in range(2):
        np.testing.assert_array_equal(_read(path, cfg), new.v.values)
        close_all()


def test_missing_dataset_created_later_opens(tmp_path: Path) -> None:
    path = tmp_path / "later.zarr"
    cfg = _cfg(tmp_path, "later")
    with pytest.raises(Exception):  # noqa: B017 - whatever zarr raises for "no group"
        xr.open_dataset(path, engine="zcache", cache_config=cfg, chunks=None)
    _series(6).to_zarr(path, zarr_format=3)  # another writer creates it
    assert _read(path, cfg).tolist() == list(range(6))
    close_all()
    assert _read(path, cfg).tolist() == list(range(6))


def test_negative_chunk_entries_never_outlive_the_chunk_ttl(tmp_path: Path) -> None:
    import zarr

    path = tmp_path / "sparse.zarr"
    arr = zarr.create_array(str(path), shape=(8,), chunks=(4,), dtype="i4", fill_value=-1)
    arr[:4] = 1  # chunk 1 holds only the fill value: zarr leaves it unwritten
    cfg = _cfg(tmp_path, "sparse", chunks=1, metadata=None)
    from xarray_zcache import open_store

    store = open_store(str(path), cache_config=cfg)
    assert zarr.open_array(store, mode="r")[:].tolist() == [1] * 4 + [-1] * 4
    zarr.open_array(str(path), mode="r+")[4:] = 7  # another writer fills chunk 1
    time.sleep(1.2)
    assert zarr.open_array(store, mode="r")[:].tolist() == [1] * 4 + [7] * 4
