"""Figures are exact: `stats()` deltas against the S3 server's own request log.

For every pass, with U the object GETs the same work sends without a cache:

* ``requests_sent`` equals the object GETs the server saw during the pass;
* every read the reader made is either sent or saved:
  ``requests_saved + prefetch_hits + (requests_sent - prefetches) == U``
  (a read served from a read-ahead fill saved no request: the read-ahead sent it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from xarray_zcache import CacheConfig, CachedStore, get_cache
from xarray_zcache.cache.stats import CacheStats
from xarray_zcache.registry import close_all
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import write_zarr

P = default_buffer_prototype()


def _object_gets(server: LocalS3Server, bucket: str) -> int:
    return server.requests.count("GET", bucket=bucket, key_prefix="")


def _check_pass(
    server: LocalS3Server,
    bucket: str,
    config: CacheConfig,
    work: Callable[[], Any],
    uncached_gets: int,
) -> CacheStats:
    before_stats = get_cache(config).stats()
    before = _object_gets(server, bucket)
    work()
    sent_by_server = _object_gets(server, bucket) - before
    d = get_cache(config).stats() - before_stats
    assert d.requests_sent == sent_by_server
    reader_reads = d.requests_saved + d.prefetch_hits + d.requests_sent - d.prefetches
    assert reader_reads == uncached_gets, d
    return d


def _write_dataset(url: str, opts: dict[str, Any]) -> None:
    rng = np.random.default_rng(1)
    ds = xr.Dataset(
        {"t": (("time", "y", "x"), rng.normal(size=(16, 8, 8)).astype("f4"))},
        coords={"time": np.arange(16)},
    )
    write_zarr(ds, url, opts, zarr_format=3, encoding={"t": {"chunks": (1, 8, 8)}})


def _uncached_gets(server: LocalS3Server, bucket: str, work: Callable[[], Any]) -> int:
    before = _object_gets(server, bucket)
    work()
    return _object_gets(server, bucket) - before


@pytest.mark.parametrize("prefetch", [0, 16])
def test_cold_warm_restart_passes_match_the_server(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Any,
    prefetch: int,
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write_dataset(url, s3_options)
    cfg = (
        CacheConfig()
        .with_name(f"acct-{prefetch}")
        .with_memory_size("64MB")
        .with_disk_cache(tmp_path / "cache", "256MB")
        .with_prefetch(prefetch)
    )

    # the same code path with a cache that keeps nothing: every read is sent
    nothing = (
        CacheConfig()
        .with_name("acct-nothing")
        .with_memory_size(0)
        .without_disk_cache()
        .with_prefetch(0)
        .with_ttl(listing=0, negative=0)
    )

    def read(config: CacheConfig) -> Callable[[], Any]:
        def run() -> Any:
            with xr.open_dataset(
                url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=config
            ) as ds:
                # one chunk after the other, as a scan reads them
                return [float(ds.t[i].sum()) for i in range(16)]

        return run

    uncached = _uncached_gets(s3_server, s3_bucket, read(nothing))
    assert get_cache(nothing).stats().requests_saved == 0
    cold = _check_pass(s3_server, s3_bucket, cfg, read(cfg), uncached)
    assert cold.requests_sent >= 16  # every chunk came from S3 once
    if prefetch:
        assert cold.prefetches > 0 and cold.prefetch_hits > 0
    warm = _check_pass(s3_server, s3_bucket, cfg, read(cfg), uncached)
    assert warm.requests_sent == 0 and warm.requests_saved == uncached
    get_cache(cfg).flush()
    close_all()  # a restart: the memory tier is gone, the disk tier stays
    restart = _check_pass(s3_server, s3_bucket, cfg, read(cfg), uncached)
    assert restart.requests_sent == 0 and restart.total_hits(tier="disk") > 0


def test_ranged_and_odd_range_reads_match_the_server(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Any
) -> None:
    inner = FsspecStore.from_url(f"s3://{s3_bucket}/r", storage_options=s3_options)
    sync(inner.set("obj", P.buffer.from_bytes(bytes(range(100)))))
    cfg = CacheConfig().with_name("acct-ranges").without_disk_cache().with_prefetch(0)
    store = CachedStore(inner, cfg)
    ranges = [
        RangeByteRequest(0, 10),
        OffsetByteRequest(90),
        SuffixByteRequest(5),
        RangeByteRequest(5, 5),  # odd: passed through uncached, counted as sent
        RangeByteRequest(10, 20),
    ]

    def work() -> None:
        for r in ranges:
            with contextlib.suppress(Exception):
                sync(store.get("obj", P, r))

    def uncached_work() -> None:
        for r in ranges:
            with contextlib.suppress(Exception):
                sync(inner.get("obj", P, r))

    uncached = _uncached_gets(s3_server, s3_bucket, uncached_work)
    first = _check_pass(s3_server, s3_bucket, cfg, work, uncached)
    assert first.requests_sent == len(ranges)
    again = _check_pass(s3_server, s3_bucket, cfg, work, uncached)
    assert again.requests_sent == 1  # only the odd range goes out again
    # the whole object cached: every in-bounds range is cut from it
    sync(store.get("obj", P))
    last = _check_pass(s3_server, s3_bucket, cfg, work, uncached)
    assert last.requests_sent == 1


def test_sharded_array_passes_match_the_server(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Any
) -> None:
    inner = FsspecStore.from_url(f"s3://{s3_bucket}/s.zarr", storage_options=s3_options)
    arr = zarr.create_array(inner, shape=(64,), chunks=(8,), shards=(32,), dtype="i4")
    arr[:] = np.arange(64)
    cfg = (
        CacheConfig()
        .with_name("acct-shards")
        .with_memory_size("16MB")
        .with_disk_cache(tmp_path / "c", "64MB")
        .with_prefetch(0)
    )
    store = CachedStore(inner, cfg)

    def work() -> None:
        a = zarr.open_array(store, mode="r")
        assert a[4:20].tolist() == list(range(4, 20))
        assert a[40:48].tolist() == list(range(40, 48))

    def uncached_work() -> None:
        a = zarr.open_array(inner, mode="r")
        a[4:20]
        a[40:48]

    uncached = _uncached_gets(s3_server, s3_bucket, uncached_work)
    cold = _check_pass(s3_server, s3_bucket, cfg, work, uncached)
    assert cold.requests_sent > 0
    warm = _check_pass(s3_server, s3_bucket, cfg, work, uncached)
    assert warm.requests_sent == 0
