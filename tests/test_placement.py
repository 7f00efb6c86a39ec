"""Cache-aware task placement (issue 10, item 5): chunk-reading tasks go to their owners.

A real in-process `LocalCluster` (three workers, one disk folder each: three cache
hosts), real local S3, real xarray/dask graphs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import Client, LocalCluster

import xarray_zcache.distributed as zd
from xarray_zcache import CacheConfig
from xarray_zcache.distributed.placement import region_bytes, zarr_source
from xarray_zcache.store import CachedStore
from xarray_zcache.testing.writers import write_zarr

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

N_CHUNKS = 32


def _write(url: str, opts: dict[str, Any]) -> xr.Dataset:
    rng = np.random.default_rng(11)
    ds = xr.Dataset(
        {"t": (("time", "lat", "lon"), rng.normal(280, 5, (16, 16, 32)).astype("f4"))},
        coords={"time": np.arange(16)},
    )
    write_zarr(ds, url, opts, zarr_format=3, encoding={"t": {"chunks": (2, 8, 16)}})
    return ds  # 8 x 2 x 2 = 32 chunks


def _config(folder: Any, placement: bool) -> CacheConfig:
    cfg = CacheConfig().with_memory_size("64MB").with_disk_cache(folder, "256MB")
    return dataclasses.replace(
        cfg.with_name("placed"),
        per_worker=True,
        report_interval=0.5,
        peer_timeout=20.0,
        placement=placement,
    )


@dataclasses.dataclass
class Env:
    client: Client
    cluster: LocalCluster
    cfg: CacheConfig
    url: str
    opts: dict[str, Any]
    expected: xr.Dataset

    def open(self, chunks: Any = None) -> xr.Dataset:
        return xr.open_dataset(
            self.url,
            engine="zcache",
            chunks={} if chunks is None else chunks,
            storage_options=self.opts,
            cache_config=self.cfg,
        )


@pytest.fixture(autouse=True)
def _close_caches() -> Iterator[None]:
    """Overrides conftest's: the workers' caches live in this process and outlive a test;
    `cluster` closes them when the module is done."""
    yield


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: Any) -> Iterator[tuple[Client, LocalCluster, CacheConfig]]:
    """One in-process cluster for the module (starting clusters is most of the cost)."""
    cfg = _config(tmp_path_factory.mktemp("placement") / "cache", placement=True)
    with (
        LocalCluster(
            n_workers=3, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        zd.install(client, cfg)
        yield client, cluster, cfg
    from xarray_zcache.registry import close_all

    close_all()


def _set_placement(dask_scheduler: Any, on: bool) -> None:
    dask_scheduler.plugins["zcache-scheduler"].placement = on


@pytest.fixture
def placed(
    cluster: tuple[Client, LocalCluster, CacheConfig],
    s3_bucket: str,
    s3_options: Any,
) -> Iterator[Env]:
    client, local, cfg = cluster
    url = f"s3://{s3_bucket}/data.zarr"
    expected = _write(url, s3_options)
    client.run_on_scheduler(_set_placement, on=True)
    yield Env(client, local, cfg, url, s3_options, expected)
    client.run_on_scheduler(_set_placement, on=True)


def _chunk_reads(dask_worker: Any) -> dict[str, int]:
    """Chunk reads of this worker's cache: local hits, peer hits, misses."""
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None
    s = state.cache.stats().to_dict()
    hits = s["hits"]
    return {
        "local": hits["memory"]["chunk"] + hits["disk"]["chunk"],
        "peer": hits["peer"]["chunk"],
        "asks": hits["peer"]["chunk"] + s["peer_loads"] + s["peer_fallbacks"],
    }


def _totals(client: Client) -> dict[str, int]:
    out: dict[str, int] = {"local": 0, "peer": 0, "asks": 0}
    for figures in client.run(_chunk_reads).values():
        for k, v in figures.items():
            out[k] += v
    return out


def _placement(dask_scheduler: Any) -> dict[str, float]:
    return dict(dask_scheduler.plugins["zcache-scheduler"].placer.stats.to_dict())


def test_reruns_read_locally_with_placement(placed: Env) -> None:
    client = placed.client
    ds = placed.open()
    work = lambda d: d.t.mean("time")  # noqa: E731
    placed_before, asks_before = client.run_on_scheduler(_placement)["placed"], _totals(client)
    xr.testing.assert_allclose(work(ds).compute(), work(placed.expected))
    # every chunk-reading task got its owner
    assert client.run_on_scheduler(_placement)["placed"] - placed_before == N_CHUNKS
    # pass 1 already reads on the owners: (almost) no peer asks
    assert _totals(client)["asks"] - asks_before["asks"] <= N_CHUNKS // 4
    before = _totals(client)
    xr.testing.assert_allclose(work(ds).compute(), work(placed.expected))
    after = _totals(client)
    local = after["local"] - before["local"]
    peer = after["peer"] - before["peer"]
    assert local + peer >= N_CHUNKS
    assert local >= 0.5 * (local + peer), (local, peer)  # the target


def test_dask_chunks_spanning_several_zarr_chunks(placed: Env) -> None:
    before = placed.client.run_on_scheduler(_placement)["placed"]
    ds = placed.open(chunks={"time": 3, "lat": 16, "lon": 20})  # neither aligned nor equal
    got = ds.t.sum(["lat", "lon"]).compute()
    xr.testing.assert_allclose(got, placed.expected.t.sum(["lat", "lon"]), rtol=1e-5)
    n_tasks = 6 * 1 * 2  # ceil(16/3) x 1 x ceil(32/20)
    assert placed.client.run_on_scheduler(_placement)["placed"] - before == n_tasks


def test_placement_off_leaves_tasks_alone(placed: Env) -> None:
    client = placed.client
    client.run_on_scheduler(_set_placement, on=False)
    before = client.run_on_scheduler(_placement)["placed"]
    ds = placed.open()
    xr.testing.assert_allclose(ds.t.mean().compute(), placed.expected.t.mean())
    assert client.run_on_scheduler(_placement)["placed"] == before


def test_region_bytes_maps_slices_to_objects(tmp_path: Any) -> None:
    path = tmp_path / "a.zarr"
    z = zarr.create_array(str(path), shape=(10, 8), chunks=(4, 4), dtype="f8", zarr_format=3)
    store = CachedStore(zarr.storage.LocalStore(str(path)))
    arr = zarr.open_array(store, mode="r")
    source = zarr_source(type("W", (), {"_array": arr, "shape": z.shape})())
    assert source is not None
    assert source.grid == (4, 4)
    aligned = region_bytes(source, (slice(4, 8), slice(0, 4)))
    assert aligned == {store._ck("c/1/0"): 4 * 4 * 8}
    spanning = region_bytes(source, (slice(3, 5), slice(2, 8)))
    assert spanning == {
        store._ck("c/0/0"): 1 * 2 * 8,
        store._ck("c/0/1"): 1 * 4 * 8,
        store._ck("c/1/0"): 1 * 2 * 8,
        store._ck("c/1/1"): 1 * 4 * 8,
    }
    assert region_bytes(source, (slice(0, 4, 2), slice(0, 4))) is None  # strided: not placed
    assert region_bytes(source, (slice(0, 4),)) is None  # wrong rank


def test_a_member_gone_still_computes_right(placed: Env) -> None:
    # last in the module: it retires a worker of the shared cluster
    client = placed.client
    ds = placed.open()
    xr.testing.assert_allclose(ds.t.max("time").compute(), placed.expected.t.max("time"))
    gone = sorted(client.scheduler_info()["workers"])[0]
    client.retire_workers([gone])
    xr.testing.assert_allclose(ds.t.mean("lat").compute(), placed.expected.t.mean("lat"))

    def stale(dask_scheduler: Any, gone: str) -> None:
        # the directory still names the gone worker: its tasks must run elsewhere
        from xarray_zcache.distributed.membership import Membership

        directory = dask_scheduler.plugins["zcache-scheduler"].directory
        hosts = dict(directory.membership.hosts)
        hosts[f"worker:{gone}"] = (gone,)
        directory.membership = Membership(directory.membership.version, hosts)

    client.run_on_scheduler(stale, gone=gone)
    xr.testing.assert_allclose(ds.t.min("lon").compute(), placed.expected.t.min("lon"))
