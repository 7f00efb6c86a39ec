"""`disk_pack_below` (`zcache.disk.pack-below`): small disk entries as records in segment
files, through xarray against the real S3 server, across a restart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pytest
import xarray as xr

from xarray_zcache import CacheConfig, get_cache
from xarray_zcache.cache.disk.segments import DEFAULT_SEGMENT_THRESHOLD, SEGMENT_THRESHOLD
from xarray_zcache.cache.settings import CacheSettings
from xarray_zcache.registry import close_all
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import write_zarr


def _dataset() -> xr.Dataset:
    t = np.arange(6 * 8 * 8, dtype="f4").reshape(6, 8, 8)
    return xr.Dataset({"t": (("time", "y", "x"), t)}, coords={"time": np.arange(6)})


def _segments(folder: Path) -> list[str]:
    found = []
    for _root, _, files in os.walk(folder):
        found += [f for f in files if f.endswith(".seg")]
    return found


def _payload_files(folder: Path) -> list[str]:
    found = []
    for _root, _, files in os.walk(folder):
        found += [f for f in files if f.endswith((".cache", ".meta"))]
    return found


def test_packed_entries_survive_a_restart_with_no_request(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/p.zarr"
    write_zarr(_dataset(), url, s3_options, zarr_format=3, encoding={"t": {"chunks": (1, 4, 4)}})
    folder = tmp_path / "cache"
    cfg = CacheConfig().with_name("packed").with_disk_cache(folder, "64MB").with_disk_packing()
    ds = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=cfg
    )
    xr.testing.assert_identical(ds.compute(), _dataset())
    get_cache(cfg).flush()
    assert _segments(folder)  # packed: records in segment files
    assert not _payload_files(folder)  # and no file per entry
    ds.close()
    close_all()  # a restart: memory gone, the folder stays
    before = len(
        [r for r in s3_server.requests.records() if r.bucket == s3_bucket and r.method == "GET"]
    )
    ds = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=cfg
    )
    xr.testing.assert_identical(ds.compute(), _dataset())
    after = len(
        [r for r in s3_server.requests.records() if r.bucket == s3_bucket and r.method == "GET"]
    )
    assert after == before  # every chunk and document from the records
    assert get_cache(cfg).stats().total_hits(tier="disk") > 0


def test_packing_off_then_on_reads_what_the_other_wrote(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """A folder filled with files, then opened packing (and back): each reads the other's
    entries, and a rewrite through one is seen by the other (never the old bytes)."""
    url = f"s3://{s3_bucket}/q.zarr"
    write_zarr(_dataset(), url, s3_options, zarr_format=3, encoding={"t": {"chunks": (1, 4, 4)}})
    folder = tmp_path / "cache"
    files = CacheConfig().with_name("files").with_disk_cache(folder, "64MB")
    ds = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=files
    )
    ds.compute()
    get_cache(files).flush()
    ds.close()
    close_all()
    packed = files.with_disk_packing("16KiB")
    ds = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=packed, mode="r+"
    )
    xr.testing.assert_identical(ds.compute(), _dataset())
    ds.close()
    new = _dataset()
    new["t"] = new.t + 100
    store_url = url
    from xarray_zcache import open_store

    store = open_store(store_url, storage_options=s3_options, cache_config=packed, read_only=False)
    new.to_zarr(store, mode="r+", zarr_format=3)
    get_cache(packed).flush()
    close_all()
    ds = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=files
    )
    xr.testing.assert_identical(ds.compute(), new)


def test_the_setting_from_dask_config_and_bad_values() -> None:
    with dask.config.set({"zcache.disk.pack-below": "32KiB"}):
        assert CacheConfig().disk_pack_below == 32 * 1024
    assert CacheConfig().disk_pack_below == 64 * 1024  # on by default
    with dask.config.set({"zcache.disk.pack-below": 0}):
        assert CacheConfig().disk_pack_below == 0  # off
    assert CacheConfig().with_disk_packing(0).disk_pack_below == 0
    assert CacheSettings().disk_pack_below == 64 * 1024
    assert DEFAULT_SEGMENT_THRESHOLD == SEGMENT_THRESHOLD == 64 * 1024  # a DiskTier's default
    with pytest.raises(ValueError, match=r"disk_pack_below: .*up to 65536"):
        CacheConfig().with_disk_packing("1MiB")
    with pytest.raises(ValueError, match="disk_pack_below: invalid size"):
        CacheConfig().with_disk_packing(-1)
