"""Requests really sent to the (local, moto) S3 server when reading through zcache."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore

from xarray_zcache import CacheConfig, CachedStore, get_cache
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import async_s3fs_store, write_zarr


def _dataset() -> xr.Dataset:
    rng = np.random.default_rng(0)
    t2m = rng.normal(280, 10, size=(8, 16, 16)).astype("float32")
    tp = rng.gamma(1.0, 1.0, size=(8, 16, 16)).astype("float32")
    return xr.Dataset(
        {
            "t2m": (("time", "lat", "lon"), t2m, {"units": "K"}),
            "tp": (("time", "lat", "lon"), tp, {"units": "mm"}),
        },
        coords={"time": np.arange(8), "lat": np.linspace(-80, 80, 16), "lon": np.arange(16.0)},
    )


def _write(url: str, opts: dict[str, Any], **kwargs: Any) -> xr.Dataset:
    ds = _dataset()
    encoding = {v: {"chunks": (2, 8, 8)} for v in ds.data_vars}
    write_zarr(ds, url, opts, zarr_format=3, encoding=encoding, **kwargs)
    return ds


@pytest.fixture
def config(tmp_path: Any) -> CacheConfig:
    return CacheConfig().with_memory_size("64MB").with_disk_cache(tmp_path / "cache", "256MB")


def _read_all(url: str, opts: dict[str, Any], config: CacheConfig) -> xr.Dataset:
    ds = xr.open_dataset(url, engine="zcache", chunks={}, storage_options=opts, cache_config=config)
    return ds.compute()


def test_second_read_sends_no_chunk_gets(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    url = f"s3://{s3_bucket}/era5.zarr"
    expected = _write(url, s3_options)
    log = s3_server.requests

    before = log.chunk_gets(s3_bucket)
    first = _read_all(url, s3_options, config)
    cold_gets = log.chunk_gets(s3_bucket) - before
    # 2 variables x 4 x 2 x 2 chunks, plus 3 coordinate arrays (1 chunk each)
    assert cold_gets == 2 * 16 + 3
    xr.testing.assert_identical(first, expected)

    before = log.chunk_gets(s3_bucket)
    total_before = log.count(bucket=s3_bucket)
    second = _read_all(url, s3_options, config)
    assert log.chunk_gets(s3_bucket) - before == 0
    # metadata too comes from the cache within its TTL: the re-open is free
    assert log.count(bucket=s3_bucket) - total_before == 0
    xr.testing.assert_identical(second, expected)

    stats = get_cache(config).stats()
    assert stats.total_hits("chunk") >= cold_gets
    assert stats.total_misses("chunk") == cold_gets  # every request sent is a miss
    assert stats.hit_rate("chunk") >= 0.5
    assert stats.requests_saved >= cold_gets


def test_one_chunk_costs_one_request(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    url = f"s3://{s3_bucket}/era5.zarr"
    _write(url, s3_options)
    log = s3_server.requests
    before_heads = log.heads(s3_bucket)
    _read_all(url, s3_options, config)
    assert log.heads(s3_bucket) - before_heads == 0  # no HEAD before each GET


_CHILD = textwrap.dedent(
    """
    import json, sys
    import xarray as xr
    from xarray_zcache import CacheConfig, get_cache
    url, opts, path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    cfg = CacheConfig().with_memory_size("64MB").with_disk_cache(path, "256MB")
    ds = xr.open_dataset(url, engine="zcache", chunks={}, storage_options=opts, cache_config=cfg)
    total = float(ds.t2m.sum().compute()) + float(ds.tp.sum().compute())
    s = get_cache(cfg).stats()
    print(json.dumps({"total": total, "disk_hits": s.total_hits("chunk", "disk"),
                      "misses": s.total_misses("chunk")}))
    """
)


def test_fresh_process_reads_chunks_from_disk(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    config: CacheConfig,
    tmp_path: Any,
) -> None:
    url = f"s3://{s3_bucket}/era5.zarr"
    expected = _write(url, s3_options)
    _read_all(url, s3_options, config)
    get_cache(config).flush()  # what interpreter exit does for a short script

    log = s3_server.requests
    before = log.chunk_gets(s3_bucket)
    before_all = log.count(bucket=s3_bucket)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, url, json.dumps(s3_options), str(config.disk_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert log.chunk_gets(s3_bucket) - before == 0
    # metadata and "missing" answers (zarr's v2 probes) persist on disk too: no request at all
    assert log.count(bucket=s3_bucket) - before_all == 0
    assert result["misses"] == 0
    assert result["disk_hits"] == 2 * 16 + 3  # + the 3 coordinate arrays
    want = float(expected.t2m.sum()) + float(expected.tp.sum())
    assert result["total"] == pytest.approx(want, rel=1e-6)


def test_script_exit_flushes_disk_tier(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Any
) -> None:
    """A short script that never calls flush() still leaves its disk tier filled."""
    url = f"s3://{s3_bucket}/era5.zarr"
    _write(url, s3_options)
    path = str(tmp_path / "cache")
    args = [sys.executable, "-c", _CHILD, url, json.dumps(s3_options), path]
    first = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    assert first["misses"] == 2 * 16 + 3
    before = s3_server.requests.chunk_gets(s3_bucket)
    second = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    assert second["misses"] == 0
    assert s3_server.requests.chunk_gets(s3_bucket) - before == 0


async def test_concurrent_misses_send_one_request(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    with s3_server.closing_filesystem() as fs:
        fs.pipe(f"{s3_bucket}/data/c/0", b"x" * 100_000)
    s3_server.latency = 0.05  # keep the first request in flight while the others arrive
    try:
        # (its session, opened on this test's event loop, closed before the loop ends)
        async with async_s3fs_store(f"s3://{s3_bucket}/data", s3_options) as inner:
            store = CachedStore(inner, config)
            log = s3_server.requests
            before = log.count("GET", bucket=s3_bucket, key_suffix="c/0")
            proto = default_buffer_prototype()
            results = await asyncio.gather(*(store.get("c/0", proto) for _ in range(16)))
            assert log.count("GET", bucket=s3_bucket, key_suffix="c/0") - before == 1
            assert all(r is not None and r.to_bytes() == b"x" * 100_000 for r in results)
    finally:
        s3_server.latency = 0.0


def test_sharded_array_is_cached(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    inner = FsspecStore.from_url(f"s3://{s3_bucket}/sharded", storage_options=s3_options)
    data = np.arange(64 * 64, dtype="int32").reshape(64, 64)
    arr = zarr.create_array(inner, shape=(64, 64), chunks=(8, 8), shards=(32, 32), dtype="i4")
    arr[:] = data
    log = s3_server.requests

    store = CachedStore(inner.with_read_only(True), config)
    before = log.chunk_gets(s3_bucket)
    cached = zarr.open_array(store, mode="r")
    np.testing.assert_array_equal(cached[:], data)
    np.testing.assert_array_equal(cached[3:20, 40:60], data[3:20, 40:60])
    cold = log.chunk_gets(s3_bucket) - before
    assert cold > 0

    before = log.chunk_gets(s3_bucket)
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], data)
    np.testing.assert_array_equal(cached[3:20, 40:60], data[3:20, 40:60])
    assert log.chunk_gets(s3_bucket) - before == 0


def test_errors_from_s3_are_not_cached(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    """A bucket that does not exist yet: nothing is cached but the answer "missing".

    zarr's FsspecStore reads a missing bucket as a missing key (``None``), which the
    cache remembers for ``negative_ttl`` (0 here); errors proper (HTTP 500, resets,
    timeouts) are covered with a fault-injecting proxy in test_reliability_s3.py.
    """
    name = s3_bucket + "-later"
    inner = FsspecStore.from_url(f"s3://{name}/data", storage_options=s3_options)
    store = CachedStore(inner, config.with_ttl(negative=0))
    proto = default_buffer_prototype()
    from zarr.core.sync import sync

    first = sync(_get_or_error(store, "c/0", proto))
    s3_server.create_bucket(name)
    with s3_server.closing_filesystem() as fs:
        fs.pipe(f"{name}/data/c/0", b"now here")
    second = sync(store.get("c/0", proto))
    assert second is not None and second.to_bytes() == b"now here"
    # whatever the first call saw (an error, or None for a missing bucket), no data was cached
    assert first != "now here"


async def _get_or_error(store: CachedStore, key: str, proto: Any) -> str | None:
    try:
        buf = await store.get(key, proto)
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return None if buf is None else buf.to_bytes().decode()


def _long_dataset(url: str, opts: dict[str, Any]) -> None:
    ds = xr.Dataset({"v": (("time", "x"), np.arange(64 * 100, dtype="f4").reshape(64, 100))})
    write_zarr(ds, url, opts, zarr_format=3, encoding={"v": {"chunks": (1, 100)}})


def test_sequential_scan_reads_ahead_without_duplicate_requests(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    url = f"s3://{s3_bucket}/long.zarr"
    _long_dataset(url, s3_options)
    cfg = config.with_prefetch(16)
    log = s3_server.requests
    before = log.chunk_gets(s3_bucket)
    s3_server.latency = 0.01
    try:
        ds = xr.open_dataset(
            url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=cfg
        )
        assert float(ds.v.sum().compute()) == float(np.arange(64 * 100, dtype="f4").sum())
    finally:
        s3_server.latency = 0.0
    assert get_cache(cfg).stats().prefetches > 0
    assert log.chunk_gets(s3_bucket) - before == 64  # each chunk fetched exactly once


def _open_long(bucket: str, opts: dict[str, Any], cfg: CacheConfig) -> xr.Dataset:
    """`_long_dataset` written to ``bucket`` and opened through zcache with ``cfg``."""
    url = f"s3://{bucket}/long.zarr"
    _long_dataset(url, opts)
    return xr.open_dataset(url, engine="zcache", chunks={}, storage_options=opts, cache_config=cfg)


def _dask_like_order(n: int) -> list[int]:
    """The order Dask's threaded scheduler reads the chunks of a full array in: back to
    front in runs, interleaved (39..20, 191..160, 19..16, 159..120, ... for 192 chunks)."""
    low = list(range(n // 4 - 1, -1, -1))
    high = list(range(n - 1, n // 4 - 1, -1))
    order: list[int] = low[:20]
    low = low[20:]
    while high or low:
        order += high[:32]
        high = high[32:]
        order += low[:4]
        low = low[4:]
    return order


def test_read_ahead_follows_dask_runs_around_the_end(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    """Dask reads a full array back to front in interleaved runs: the read-ahead walks on
    around the end of the array, so the later runs are read ahead too; every chunk is
    fetched exactly once."""
    cfg = config.with_prefetch(16)
    ds = _open_long(s3_bucket, s3_options, cfg)
    log = s3_server.requests
    before = log.chunk_gets(s3_bucket)
    order = _dask_like_order(64)
    assert sorted(order) == list(range(64))
    for t in order:
        assert float(ds.v.isel(time=t).sum()) == float(np.arange(t * 100, t * 100 + 100).sum())
    get_cache(cfg).flush()
    assert log.chunk_gets(s3_bucket) - before == 64  # each chunk fetched exactly once
    # all but the first run of misses that made the scan came by read-ahead
    assert get_cache(cfg).stats().prefetches >= 64 - 8


def test_partial_scan_reads_at_most_depth_in_vain(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    """A scan of part of an array (time 39 down to 20) reads at most ``depth`` chunks
    past what it read, even though the read-ahead may walk around the array's end."""
    cfg = config.with_prefetch(8)
    ds = _open_long(s3_bucket, s3_options, cfg)
    log = s3_server.requests
    before = log.chunk_gets(s3_bucket)
    for t in range(39, 19, -1):
        ds.v.isel(time=t).compute()
    get_cache(cfg).flush()
    assert 20 <= log.chunk_gets(s3_bucket) - before <= 20 + 8


def test_scattered_reads_do_not_read_ahead(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    cfg = config.with_prefetch(16)
    ds = _open_long(s3_bucket, s3_options, cfg)
    log = s3_server.requests
    before = log.chunk_gets(s3_bucket)
    for t in (3, 40, 17, 60, 29, 8, 51):
        ds.v.isel(time=t).compute()
    assert get_cache(cfg).stats().prefetches == 0
    assert log.chunk_gets(s3_bucket) - before == 7
