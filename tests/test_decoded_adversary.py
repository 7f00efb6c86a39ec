"""Adversarial tests of the decoded tier (issue 19 item 1), against a real moto S3.

Each test tries to make the decoded tier serve values zarr itself would not return now:
another process writing through zcache, another writer rewriting a chunk with bytes of
the same length or the very same bytes, encoded bytes read from disk each time, the
array's metadata changed under identical chunk bytes (dtype, endianness, chunk shape),
fill values of missing chunks, readers racing a writer, sharded arrays, the tier's
bound, and the selections the backend serves. Real S3 (moto), zarr, xarray, files and
a child process; no mocks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from xarray_zcache import CacheConfig, get_cache, open_store
from xarray_zcache.testing.s3server import LocalS3Server

INTERVAL = 1.0
MARGIN = 0.6


def _cfg(
    tmp_path: Path, name: str, *, memory: str = "32MB", validation: Any = INTERVAL
) -> CacheConfig:
    return (
        CacheConfig()
        .with_name(name)
        .with_memory_size(memory)
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_prefetch(0)
        .with_validation(validation)
        .with_client("s3fs")
        .with_decoded_memory_size("16MB")
    )


def _open(url: str, opts: dict[str, Any], cfg: CacheConfig, **kw: Any) -> xr.Dataset:
    kw.setdefault("chunks", None)
    return xr.open_dataset(
        url, engine="zcache", storage_options=opts, cache_config=cfg, cache=False, **kw
    )


def _zarr_values(url: str, opts: dict[str, Any], var: str = "t") -> np.ndarray:
    with xr.open_dataset(url, engine="zarr", storage_options=opts, chunks=None) as ds:
        return np.asarray(ds[var].values)


def _write(url: str, opts: dict[str, Any], data: np.ndarray, **enc: Any) -> None:
    enc.setdefault("compressors", None)
    ds = xr.Dataset({"t": (("time", "y", "x")[: data.ndim], data)})
    ds.to_zarr(url, storage_options=opts, zarr_format=3, encoding={"t": enc}, mode="w")


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    np.testing.assert_array_equal(a, b)


def _data(shape: tuple[int, ...] = (4, 8, 8), dtype: str = "f4", seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, shape).astype(dtype)


# -- 5. metadata changed under identical chunk bytes ----------------------------------------------


def _raw_array(
    url: str, opts: dict[str, Any], data: np.ndarray, chunks: tuple[int, ...], **kw: Any
) -> None:
    """``data`` as array ``t`` of a fresh zarr v3 group, written by plain zarr (no zcache)."""
    root = zarr.open_group(url, mode="w", storage_options=opts, zarr_format=3)
    arr = root.create_array(
        "t",
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        compressors=None,
        dimension_names=("time", "y", "x")[: data.ndim],
        fill_value=kw.pop("fill_value", 0),
        **kw,
    )
    arr[...] = data


def _raw(url: str, opts: dict[str, Any], key: str) -> bytes:
    import fsspec

    fs = fsspec.filesystem("s3", **opts)
    return bytes(fs.cat_file(f"{url.removeprefix('s3://')}/t/{key}"))


@pytest.mark.parametrize("change", ["dtype", "endian", "chunk-shape"])
def test_metadata_change_under_identical_chunk_bytes(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, change: str
) -> None:
    url = f"s3://{s3_bucket}/meta-{change}.zarr"
    old = np.arange(64, dtype="<i4").reshape(1, 8, 8) * 1000 + 1
    _raw_array(url, s3_options, old, (1, 4, 4))
    cfg = _cfg(tmp_path, f"meta-{change}")
    with _open(url, s3_options, cfg) as ds:
        _same(ds.t.values, old)
        _same(ds.t.values, old)  # decoded entries now
    assert get_cache(cfg).stats().decoded_hits > 0
    # the other writer: the same chunk keys, byte-identical chunk objects, new metadata
    if change == "dtype":
        new = old.view("<f4")
        _raw_array(url, s3_options, new, (1, 4, 4))
    elif change == "endian":
        new = old.byteswap()  # its big-endian encoding: the bytes of ``old`` little-endian
        big = zarr.codecs.BytesCodec(endian="big")
        _raw_array(url, s3_options, new, (1, 4, 4), serializer=big)
    else:  # chunks of 4x4 -> 2x8, and chunks c/0/0/0, c/0/1/0 hold the same 64 bytes
        new = old.copy() + 7
        new[0, 0:2, :] = old[0, 0:4, 0:4].reshape(2, 8)
        new[0, 2:4, :] = old[0, 4:8, 0:4].reshape(2, 8)
        _raw_array(url, s3_options, new, (1, 2, 8))
    expected = _zarr_values(url, s3_options)
    _same(expected.astype(new.dtype), new)
    if change == "chunk-shape":  # the test's premise: identical chunk objects
        for key in ("c/0/0/0", "c/0/1/0"):
            assert _raw(url, s3_options, key) == old[0, 0:4, 0:4].tobytes() or key != "c/0/0/0"
    time.sleep(INTERVAL + MARGIN)
    with _open(url, s3_options, cfg) as ds:
        got = ds.t.values
        _same(got, expected)
        _same(ds.t.values, expected)
