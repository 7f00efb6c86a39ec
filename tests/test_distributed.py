"""zcache on real Dask clusters (LocalCluster with threads and with processes)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import xarray_zcache.distributed as zd
from xarray_zcache import CacheConfig
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import write_zarr

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _write(url: str, opts: dict[str, Any]) -> xr.Dataset:
    rng = np.random.default_rng(1)
    ds = xr.Dataset(
        {"t2m": (("time", "lat", "lon"), rng.normal(280, 5, (16, 32, 32)).astype("f4"))},
        coords={"time": np.arange(16)},
    )
    write_zarr(ds, url, opts, zarr_format=3, encoding={"t2m": {"chunks": (2, 16, 16)}})
    return ds  # 8 x 2 x 2 = 32 chunks


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


@pytest.fixture
def config(tmp_path: Any) -> CacheConfig:
    cfg = CacheConfig().with_memory_size("64MB").with_disk_cache(tmp_path / "cache", "256MB")
    return cfg.with_name("cluster-test")._replace(report_interval=0.2, top_n=1000)


@pytest.fixture(params=[False, True], ids=["threads", "processes"])
def client(request: Any) -> Iterator[Client]:
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=request.param,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _open(url: str, opts: dict[str, Any], cfg: CacheConfig) -> xr.Dataset:
    return xr.open_dataset(url, engine="zcache", chunks={}, storage_options=opts, cache_config=cfg)


def _worker_memory_keys(dask_worker: Any) -> list[str]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    return [] if state is None else state.cache.memory_tier.keys()


def _worker_stats(dask_worker: Any) -> dict[str, Any]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None
    return state.cache.stats().to_dict()


def test_second_compute_sends_no_chunk_gets(
    client: Client,
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    config: CacheConfig,
) -> None:
    url = f"s3://{s3_bucket}/era5.zarr"
    expected = _write(url, s3_options)
    zd.install(client, config)
    zd.install(client, config)  # idempotent
    ds = _open(url, s3_options, config)
    log = s3_server.requests

    before = log.chunk_gets(s3_bucket)
    first = ds.t2m.mean("time").compute()
    assert log.chunk_gets(s3_bucket) - before == 32
    before = log.chunk_gets(s3_bucket)
    second = ds.t2m.mean("time").compute()
    assert log.chunk_gets(s3_bucket) - before == 0
    xr.testing.assert_allclose(first, second)
    xr.testing.assert_allclose(first, expected.t2m.mean("time"))

    # each worker's memory holds only chunks it read itself (its own hot keys)
    mem = client.run(_worker_memory_keys)
    own = client.run(lambda dask_worker: [k for k, _ in _worker_stats(dask_worker)["hot_keys"]])
    for w in mem:
        assert set(mem[w]) <= set(own[w])
    assert sum(len(v) for v in mem.values()) >= 32

    # the aggregator's totals are the sum of the workers' own counters
    def settled() -> bool:
        workers = client.run(_worker_stats)
        stats = zd.cluster_stats(client)
        return len(stats.workers) == 2 and all(
            stats.workers[w].total_misses()
            == workers[w]["misses"]["chunk"] + workers[w]["misses"]["metadata"]
            and stats.workers[w].total_hits()
            == sum(sum(v.values()) for v in workers[w]["hits"].values())
            for w in workers
        )

    _wait(settled)
    stats = zd.cluster_stats(client)
    assert stats.total.total_misses("chunk") == sum(
        s.total_misses("chunk") for s in stats.workers.values()
    )
    assert stats.total.total_misses("chunk") == 32
    assert stats.total.total_hits("chunk") == 32
    assert stats.total.memory_used == sum(s.memory_used for s in stats.workers.values())
    # the workers share one disk folder on this host: it is counted once
    assert 0 < stats.total.disk_used <= max(s.disk_used for s in stats.workers.values())
    frame = stats.to_dataframe()
    assert list(frame.index)[-1] == "total" and frame.loc["total", "misses"] >= 32
    assert "xarray-zcache cluster" in stats._repr_html_()


def test_without_plugin_workers_still_cache(
    client: Client,
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    config: CacheConfig,
) -> None:
    url = f"s3://{s3_bucket}/era5.zarr"
    _write(url, s3_options)
    ds = _open(url, s3_options, config)
    ds.t2m.sum().compute()
    before = s3_server.requests.chunk_gets(s3_bucket)
    ds.t2m.sum().compute()
    # without the plugin each worker lazily creates a cache from the store's config;
    # the disk folder is shared, so a chunk read by one worker is a disk hit for another
    assert s3_server.requests.chunk_gets(s3_bucket) - before == 0
    with pytest.raises(RuntimeError, match="install"):
        zd.cluster_stats(client)


def test_worker_plugin_without_aggregator_logs_once(
    s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig, caplog: Any
) -> None:
    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as c,
        caplog.at_level(logging.WARNING, logger="xarray_zcache.distributed"),
    ):
        c.register_plugin(zd.ZCacheWorkerPlugin(config))
        time.sleep(1.5)  # several report intervals
        url = f"s3://{s3_bucket}/era5.zarr"
        _write(url, s3_options)
        assert float(_open(url, s3_options, config).t2m.mean().compute()) > 0
    warnings = [r for r in caplog.records if "no zcache aggregator" in r.getMessage()]
    assert len(warnings) == 1


def test_malformed_report_is_rejected(client: Client, config: CacheConfig) -> None:
    zd.install(client, config)
    _wait(lambda: len(zd.cluster_stats(client).workers) == 2)
    reply = client.sync(client.scheduler.zcache_report, report={"worker": 3, "stats": "nope"})
    assert "malformed" in reply["error"]
    reply = client.sync(client.scheduler.zcache_report, report={"stats": {}})
    assert "malformed" in reply["error"]
    stats = zd.cluster_stats(client)
    assert stats.rejected_reports == 2
    assert len(stats.workers) == 2
    assert len(client.scheduler_info()["workers"]) == 2


def test_workers_joining_and_leaving(
    s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as c,
    ):
        zd.install(c, config)
        _wait(lambda: len(zd.cluster_stats(c).workers) == 1)
        cluster.scale(3)
        c.wait_for_workers(3)
        _wait(lambda: len(zd.cluster_stats(c).workers) == 3)
        assert all(
            v == 1000
            for v in c.run(
                lambda dask_worker: len(_worker_memory_keys(dask_worker)) + 1000
            ).values()
        )
        cluster.scale(1)
        _wait(lambda: len(c.scheduler_info()["workers"]) == 1)
        _wait(lambda: len(zd.cluster_stats(c).workers) == 1)


def test_restarted_worker_reads_from_disk(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    url = f"s3://{s3_bucket}/era5.zarr"
    _write(url, s3_options)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        zd.install(c, config)
        ds = _open(url, s3_options, config)
        ds.t2m.sum().compute()
        c.restart_workers(list(c.scheduler_info()["workers"]))  # teardown flushes the disk tier
        before = s3_server.requests.chunk_gets(s3_bucket)
        ds.t2m.sum().compute()
        assert s3_server.requests.chunk_gets(s3_bucket) - before == 0
        _wait(lambda: zd.cluster_stats(c).total.total_hits("chunk", tier="disk") == 32)


def test_hot_keys_are_promoted_cold_keys_are_not(
    s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    url = f"s3://{s3_bucket}/era5.zarr"
    _write(url, s3_options)
    # worker-local promotion off (threshold far too high): only the aggregator promotes
    cfg = config.with_promotion_threshold(1e9)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        zd.install(c, cfg, promotion_threshold=2.0)
        ds = _open(url, s3_options, cfg)
        ds.t2m.sum().compute()  # every chunk fetched once: on disk and in memory
        c.run(lambda dask_worker: dask_worker._zcache.cache.flush())
        c.run(lambda dask_worker: dask_worker._zcache.cache.memory_tier.clear())  # now on disk only
        hot = ds.t2m.isel(time=slice(0, 2), lat=slice(0, 16), lon=slice(0, 16))  # one chunk
        deadline = time.monotonic() + 20
        promoted = False
        while time.monotonic() < deadline and not promoted:
            hot.compute()
            promoted = any(d["action"] == "promote" for d in zd.decisions(c))
        assert promoted
        decisions = zd.decisions(c)
        keys = {d["key"] for d in decisions if d["action"] == "promote"}
        assert len(keys) == 1 and next(iter(keys)).endswith("t2m/c/0/0/0")
        _wait(
            lambda: any(
                k.endswith("t2m/c/0/0/0") for v in c.run(_worker_memory_keys).values() for k in v
            )
        )
        mem = next(iter(c.run(_worker_memory_keys).values()))
        assert not any(k.endswith("t2m/c/7/1/1") for k in mem)  # cold: still only on disk


def test_worker_killed_mid_compute_gives_right_result(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    import os
    import threading

    url = f"s3://{s3_bucket}/era5.zarr"
    expected = _write(url, s3_options)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        zd.install(c, config)
        ds = _open(url, s3_options, config)
        victim = sorted(c.scheduler_info()["workers"])[0]

        def kill() -> None:
            time.sleep(0.3)
            with contextlib.suppress(Exception):
                c.run(os._exit, 1, workers=[victim], wait=False)

        s3_server.latency = 0.05  # keep the compute running while the worker dies
        try:
            killer = threading.Thread(target=kill)
            killer.start()
            result = ds.t2m.mean("time").compute()
            killer.join()
        finally:
            s3_server.latency = 0.0
        xr.testing.assert_allclose(result, expected.t2m.mean("time"))
        # and a clean second pass afterwards
        xr.testing.assert_allclose(ds.t2m.mean("time").compute(), expected.t2m.mean("time"))
