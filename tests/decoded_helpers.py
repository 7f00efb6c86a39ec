"""Helpers shared by the decoded-tier tests (`test_decoded_tier.py`,
`test_decoded_adversary.py`, `test_decoded_array_api.py`): a cache config, opening
through ``engine="zcache"`` and through plain zarr, writing a variable, comparing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from xarray_zcache import CacheConfig


def make_cfg(
    tmp_path: Path,
    name: str,
    *,
    memory: str = "32MB",
    validation: Any = "never",
    decoded: Any = None,
) -> CacheConfig:
    """A memory + disk cache over s3fs, no read-ahead; ``decoded``: the decoded tier's
    size (None: its default, half the memory tier)."""
    return (
        CacheConfig()
        .with_name(name)
        .with_memory_size(memory)
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_prefetch(0)
        .with_validation(validation)
        .with_client("s3fs")
        .with_decoded_memory_size(decoded)
    )


def open_zcache(url: Any, opts: dict[str, Any] | None, cfg: CacheConfig, **kw: Any) -> xr.Dataset:
    """``url`` opened with ``engine="zcache"`` (no dask chunks, no xarray cache)."""
    kw.setdefault("chunks", None)
    return xr.open_dataset(
        url, engine="zcache", storage_options=opts, cache_config=cfg, cache=False, **kw
    )


def zarr_values(url: str, opts: dict[str, Any], var: str = "t") -> np.ndarray:
    """What xarray's own zarr backend reads for ``var``."""
    with xr.open_dataset(url, engine="zarr", storage_options=opts, chunks=None) as ds:
        return np.asarray(ds[var].values)


def write_var(
    url: str, opts: dict[str, Any], data: np.ndarray, *, compressors: Any, **enc: Any
) -> None:
    """``data`` as variable ``t`` of a new dataset (``zarr_format`` in ``enc``: 3)."""
    zarr_format = enc.pop("zarr_format", 3)
    if zarr_format == 3:
        enc["compressors"] = compressors
    ds = xr.Dataset({"t": (("time", "y", "x")[: data.ndim], data)})
    ds.to_zarr(url, storage_options=opts, zarr_format=zarr_format, encoding={"t": enc}, mode="w")


def zstd() -> list[Any]:
    return [zarr.codecs.ZstdCodec()]


def same(a: np.ndarray, b: np.ndarray) -> None:
    """Same dtype, shape and values, bit for bit (NaN payloads and -0.0 included)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    np.testing.assert_array_equal(a, b)
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def random_data(
    shape: tuple[int, ...] = (8, 16, 16), dtype: str = "f4", seed: int = 7
) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, shape).astype(dtype)
