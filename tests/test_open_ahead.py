"""Index coordinates read at open, all at once (`xarray_zcache.open_ahead`), against the
real S3 server: the same requests as without (each chunk once, the figures exact), sent
together instead of one coordinate after the other."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import xarray as xr

from xarray_zcache import CacheConfig, get_cache, open_ahead
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import write_zarr

# time: 4 chunks, y: 3, x: 2 -> 9 coordinate chunks
NT, NY, NX = 8, 6, 4
ENCODING = {
    "t": {"chunks": (2, 2, 2)},
    "time": {"chunks": (2,)},
    "y": {"chunks": (2,)},
    "x": {"chunks": (2,)},
}
COORD_CHUNKS = 4 + 3 + 2


def _dataset() -> xr.Dataset:
    t = np.arange(NT * NY * NX, dtype="f4").reshape(NT, NY, NX)
    return xr.Dataset(
        {"t": (("time", "y", "x"), t)},
        coords={"time": np.arange(NT) * 10, "y": np.arange(NY) * 0.5, "x": np.arange(NX) - 2},
    )


@pytest.fixture
def url(s3_bucket: str, s3_options: dict[str, Any]) -> str:
    url = f"s3://{s3_bucket}/d.zarr"
    write_zarr(_dataset(), url, s3_options, zarr_format=3, encoding=ENCODING)
    return url


@pytest.fixture
def slow(s3_server: LocalS3Server) -> Iterator[LocalS3Server]:
    """The server with 300 ms per request (requests sent together overlap even on a
    loaded machine) and its concurrency gauge reset."""
    s3_server.latency = 0.3
    s3_server.most_delayed = 0
    try:
        yield s3_server
    finally:
        s3_server.latency = 0.0


def _config(tmp_path: Any, depth: int = 16) -> CacheConfig:
    return (
        CacheConfig()
        .with_memory_size("64MB")
        .with_disk_cache(tmp_path / "cache", "256MB")
        .with_prefetch(depth)
    )


def _coordinate_gets(server: LocalS3Server, bucket: str) -> int:
    return sum(
        server.requests.count("GET", bucket=bucket, key_prefix=f"d.zarr/{name}/c/")
        for name in ("time", "y", "x")
    )


def test_index_coordinates_are_read_together_at_open(
    url: str, slow: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Any
) -> None:
    cfg = _config(tmp_path)
    ds = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=cfg
    )
    # xarray reads each coordinate's chunks together (at most 4 here), one coordinate
    # after the other; read at open, the 9 are sent together
    stats = get_cache(cfg).stats()
    assert stats.prefetches == COORD_CHUNKS  # all of them read ahead, before xarray asked
    assert slow.most_delayed > 4
    assert _coordinate_gets(slow, s3_bucket) == COORD_CHUNKS  # each once
    assert ds.time.values.tolist() == (np.arange(NT) * 10).tolist()
    assert ds.x.values.tolist() == (np.arange(NX) - 2).tolist()
    # xarray's own reads of them were hits on the read-ahead entries: nothing sent twice
    assert _coordinate_gets(slow, s3_bucket) == COORD_CHUNKS
    xr.testing.assert_identical(ds.compute(), _dataset())


def test_figures_match_the_server_log(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], url: str, tmp_path: Any
) -> None:
    cfg = _config(tmp_path)
    before = len([r for r in s3_server.requests.records() if r.bucket == s3_bucket])
    ds = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=cfg
    )
    ds.compute()
    get_cache(cfg).flush()
    sent = len([r for r in s3_server.requests.records() if r.bucket == s3_bucket]) - before
    stats = get_cache(cfg).stats()
    assert stats.total_misses() + stats.validation_requests == sent
    # a second open and read sends nothing
    ds2 = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=cfg
    )
    ds2.compute()
    assert len([r for r in s3_server.requests.records() if r.bucket == s3_bucket]) - before == sent


def test_a_dropped_coordinate_is_not_read(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], url: str, tmp_path: Any
) -> None:
    cfg = _config(tmp_path)
    before = s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="d.zarr/time/c/")
    ds = xr.open_dataset(
        url,
        engine="zcache",
        chunks={},
        storage_options=s3_options,
        cache_config=cfg,
        drop_variables=["time"],
    )
    assert "time" not in ds.variables
    after = s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="d.zarr/time/c/")
    assert after == before
    assert s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="d.zarr/y/c/") == 3


def test_read_ahead_off_reads_coordinates_as_xarray_does(
    url: str, slow: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Any
) -> None:
    cfg = _config(tmp_path, depth=0)
    slow.most_delayed = 0
    ds = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=cfg
    )
    assert slow.most_delayed <= 4  # one coordinate's chunks at a time
    assert get_cache(cfg).stats().prefetches == 0
    assert _coordinate_gets(slow, s3_bucket) == COORD_CHUNKS
    assert ds.y.values.tolist() == (np.arange(NY) * 0.5).tolist()


def test_bounded_and_without_consolidated_metadata_nothing(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"s3://{s3_bucket}/plain.zarr"
    write_zarr(_dataset(), url, s3_options, zarr_format=3, encoding=ENCODING, consolidated=False)
    cfg = _config(tmp_path)
    with pytest.warns(RuntimeWarning):
        ds = xr.open_dataset(
            url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=cfg
        )
    assert get_cache(cfg).stats().prefetches == 0
    xr.testing.assert_identical(ds.compute(), _dataset())
    # beyond the bound: only the coordinates that fit in it
    url2 = f"s3://{s3_bucket}/d2.zarr"
    write_zarr(_dataset(), url2, s3_options, zarr_format=3, encoding=ENCODING)
    monkeypatch.setattr(open_ahead, "MAX_CHUNKS", 5)
    cfg2 = _config(tmp_path / "2")
    ds2 = xr.open_dataset(
        url2, engine="zcache", chunks={}, storage_options=s3_options, cache_config=cfg2
    )
    assert get_cache(cfg2).stats().prefetches <= 5
    xr.testing.assert_identical(ds2.compute(), _dataset())
