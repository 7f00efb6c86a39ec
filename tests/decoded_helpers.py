"""Helpers shared by the decoded-tier tests (`test_decoded_tier.py`,
`test_decoded_adversary.py`, `test_decoded_array_api.py`): a cache config, opening
through ``engine="zcache"`` and through plain zarr, writing a variable, comparing.

Plain zarr reaches S3 through `xarray_zcache.testing.writers.s3fs_store`, which closes the
aiohttp session of the s3fs filesystem zarr builds (otherwise reported as "Unclosed client
session" when it is collected)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from xarray_zcache import CacheConfig
from xarray_zcache.testing.writers import s3fs_store, write_zarr


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


@contextlib.contextmanager
def plain_dataset(url: str, opts: dict[str, Any], **kw: Any) -> Iterator[xr.Dataset]:
    """``url`` opened with xarray's own zarr backend (no zcache; ``chunks=None`` unless
    given), its s3fs session closed after."""
    kw.setdefault("chunks", None)
    with (
        s3fs_store(url, opts, read_only=True) as store,
        xr.open_dataset(store, engine="zarr", **kw) as ds,
    ):
        yield ds


def zarr_values(url: str, opts: dict[str, Any], var: str = "t") -> np.ndarray:
    """What xarray's own zarr backend reads for ``var``."""
    with plain_dataset(url, opts) as ds:
        return np.asarray(ds[var].values)


def write_at_source(url: str, opts: dict[str, Any], where: Any, values: Any) -> None:
    """``values`` written at ``where`` of array ``t`` by plain zarr (another writer)."""
    with s3fs_store(url, opts) as store:
        zarr.open_array(store, path="t", mode="r+")[where] = values


def write_var(
    url: str, opts: dict[str, Any], data: np.ndarray, *, compressors: Any, **enc: Any
) -> None:
    """``data`` as variable ``t`` of a new dataset (``zarr_format`` in ``enc``: 3)."""
    zarr_format = enc.pop("zarr_format", 3)
    if zarr_format == 3:
        enc["compressors"] = compressors
    ds = xr.Dataset({"t": (("time", "y", "x")[: data.ndim], data)})
    write_zarr(ds, url, opts, zarr_format=zarr_format, encoding={"t": enc}, mode="w")


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
