"""The cluster as one cache: owners, peer reads, writes seen everywhere (issue 10).

Real `LocalCluster`s (worker processes), real local S3, one disk folder per worker
(``per_worker=True``: the multi-host case, where each worker is a cache host).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import xarray_zcache.distributed as zd
from xarray_zcache import CacheConfig
from xarray_zcache.distributed.membership import Membership
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import write_zarr

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]


def _write(url: str, opts: dict[str, Any]) -> xr.Dataset:
    rng = np.random.default_rng(7)
    ds = xr.Dataset(
        {"t": (("time", "lat", "lon"), rng.normal(280, 5, (16, 16, 32)).astype("f4"))},
        coords={"time": np.arange(16)},
    )
    write_zarr(ds, url, opts, zarr_format=3, encoding={"t": {"chunks": (2, 8, 16)}})
    return ds  # 8 x 2 x 2 = 32 chunks


def _config(tmp_path: Any, *, per_worker: bool = True) -> CacheConfig:
    cfg = CacheConfig().with_memory_size("64MB").with_disk_cache(tmp_path / "cache", "256MB")
    # exact request counts: a busy test machine must not turn slow peer answers into
    # fallbacks (the failure tests set their own, short timeouts)
    return cfg.with_name("one-cache")._replace(
        per_worker=per_worker, report_interval=0.5, peer_timeout=20.0
    )


def _cluster(n: int = 3) -> LocalCluster:
    return LocalCluster(n_workers=n, threads_per_worker=2, processes=True, dashboard_address=":0")


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Client, CacheConfig]]:
    """One process cluster with zcache installed, for the tests of this module that can
    share it (each with its own bucket): starting clusters is most of their cost."""
    folder = tempfile.mkdtemp(prefix="zcache-one-cache-")
    cfg = _config(pathlib.Path(folder))
    try:
        with _cluster() as cluster, Client(cluster) as c:
            zd.install(c, cfg)
            yield c, cfg
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclasses.dataclass
class Env:
    """The shared cluster, the local S3 server, a fresh bucket, and the workers' config."""

    client: Client
    server: LocalS3Server
    bucket: str
    opts: dict[str, Any]
    cfg: CacheConfig

    def config(self) -> CacheConfig:
        return self.cfg

    def install(self, cfg: CacheConfig) -> tuple[str, xr.Dataset]:
        """Write the dataset and install zcache with ``cfg``: ``(url, dataset)``."""
        url = f"s3://{self.bucket}/era5.zarr"
        expected = _write(url, self.opts)
        zd.install(self.client, cfg)  # idempotent: the cluster has it already
        return url, expected


@pytest.fixture
def env(
    shared: tuple[Client, CacheConfig],
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
) -> Env:
    client, cfg = shared
    # every test starts with the whole cluster: on a loaded machine a worker can miss its
    # heartbeats and be restarted by its nanny (scheduler_info then listed no workers)
    client.wait_for_workers(3, timeout=180)
    return Env(client, s3_server, s3_bucket, s3_options, cfg)


def _open(url: str, opts: dict[str, Any], cfg: CacheConfig) -> xr.Dataset:
    return xr.open_dataset(url, engine="zcache", chunks={}, storage_options=opts, cache_config=cfg)


def _worker_stats(dask_worker: Any) -> dict[str, Any]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None
    return state.cache.stats().to_dict()


def _fallback_reasons(dask_worker: Any) -> dict[str, int]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None
    return {} if state.peer is None else dict(state.peer.fallback_reasons)


def _disk_bytes(dask_worker: Any) -> int:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None and state.cache.disk_tier is not None
    state.cache.flush()
    return int(state.cache.disk_tier.used_bytes())


def test_repeated_and_reshaped_computations_send_no_chunk_gets(env: Env) -> None:
    cfg = env.config()
    url, expected = env.install(cfg)
    client, s3_server, s3_bucket, s3_options = env.client, env.server, env.bucket, env.opts
    log = s3_server.requests
    stored_before = sum(client.run(_disk_bytes).values())
    ds = _open(url, s3_options, cfg)
    passes = [
        lambda d: d.t.mean("time"),
        lambda d: d.t.mean("time"),
        lambda d: d.t.mean(["lat", "lon"]),
        lambda d: d.t.sum("lon").rolling(time=5).mean(),
        lambda d: d.t.max(),
    ]
    gets = []
    for i, work in enumerate(passes):
        before = log.chunk_gets(s3_bucket)
        got = work(ds).compute()
        xr.testing.assert_allclose(got, work(expected))
        gets.append(log.chunk_gets(s3_bucket) - before)
        if i == 0:
            stats = client.run(_worker_stats)
            fallbacks = client.run(_fallback_reasons)
            assert gets[0] == 32, (gets, fallbacks)  # one GET per distinct chunk, cluster-wide
    assert gets[1:] == [0, 0, 0, 0], gets
    stats = client.run(_worker_stats)
    assert sum(s["peer_served"] for s in stats.values()) > 0
    assert sum(s["hits"]["peer"]["chunk"] for s in stats.values()) > 0
    # cold data is stored once in the cluster
    stored = sum(client.run(_disk_bytes).values()) - stored_before
    with s3_server.closing_filesystem() as fs:
        distinct = sum(len(fs.cat_file(p)) for p in _chunk_paths(s3_server, url))
    assert stored <= 1.1 * distinct + 64 * 1024, (stored, distinct)


def _chunk_paths(server: LocalS3Server, url: str) -> list[str]:
    root = url.removeprefix("s3://")
    with server.closing_filesystem() as fs:
        return [p for p in fs.find(root) if "/c/" in p and p.split("/")[-3] == "t"]


def test_concurrent_misses_of_one_chunk_on_two_workers_send_one_get(env: Env) -> None:
    cfg = env.config()
    url, _ = env.install(cfg)
    client, s3_server, s3_bucket, s3_options = env.client, env.server, env.bucket, env.opts
    ds = _open(url, s3_options, cfg)
    workers = sorted(client.scheduler_info()["workers"])
    log = s3_server.requests
    before = log.count("GET", bucket=s3_bucket, key_suffix="t/c/3/1/0")

    def read_one(x: Any) -> float:
        return float(x.sum())

    chunk = ds.t[6:8, 8:16, 0:16]
    futures = [client.submit(read_one, chunk, workers=[w], pure=False) for w in workers]
    values = client.gather(futures)
    assert len(set(values)) == 1
    assert log.count("GET", bucket=s3_bucket, key_suffix="t/c/3/1/0") - before == 1


def test_garbage_from_a_peer_is_detected_and_values_stay_right(env: Env) -> None:
    cfg = env.config()
    url, expected = env.install(cfg)
    client, s3_options = env.client, env.opts

    def corrupt_answers(dask_worker: Any) -> None:
        real = dask_worker.handlers["zcache_get"]

        async def lying(**kw: Any) -> Any:
            reply = await real(**kw)
            raw = reply.get("data")
            raw = getattr(raw, "data", raw)  # (a frame of its own: `to_serialize`)
            if reply.get("status") == "ok" and raw:
                data = bytearray(raw)
                data[len(data) // 2] ^= 0xFF  # damaged in transit, checksum of the original
                reply["data"] = bytes(data)
            return reply

        dask_worker.handlers["zcache_get"] = lying
        dask_worker._zcache_honest = real

    def honest_answers(dask_worker: Any) -> None:
        dask_worker.handlers["zcache_get"] = dask_worker._zcache_honest

    client.run(corrupt_answers)
    before = client.run(_worker_stats)
    ds = _open(url, s3_options, cfg)
    xr.testing.assert_allclose(ds.t.mean("time").compute(), expected.t.mean("time"))
    xr.testing.assert_allclose(ds.t.mean("time").compute(), expected.t.mean("time"))
    after = client.run(_worker_stats)
    client.run(honest_answers)

    def delta(f: Callable[[dict[str, Any]], int]) -> int:
        return sum(f(after[w]) - f(before[w]) for w in after)

    assert delta(lambda s: s["peer_fallbacks"]) > 0
    assert delta(lambda s: s["hits"]["peer"]["chunk"]) == 0


def test_writes_on_the_client_and_on_a_worker_are_seen_by_every_worker(env: Env) -> None:
    cfg = env.config()
    url, expected = env.install(cfg)
    client, s3_options = env.client, env.opts
    ds = _open(url, s3_options, cfg)
    xr.testing.assert_allclose(ds.t.mean("time").compute(), expected.t.mean("time"))
    # a write through zcache on the client: a region of new values
    new = expected.copy(deep=True)
    new["t"][0:4] = -1.0
    new[["t"]].isel(time=slice(0, 4)).drop_vars("time").to_zarr(
        _cached_store(url, s3_options, cfg), region={"time": slice(0, 4)}, zarr_format=3
    )
    for _ in range(3):  # tasks land on different workers each time
        xr.testing.assert_allclose(_open(url, s3_options, cfg).t.compute(), new.t)

    # a write through zcache on a worker
    workers = sorted(client.scheduler_info()["workers"])

    def write_on_worker() -> None:
        import zarr

        store = _cached_store(url, s3_options, cfg)
        arr = zarr.open_array(store, path="t", mode="r+")
        arr[4:6] = -2.0

    client.submit(write_on_worker, workers=[workers[0]], pure=False).result()
    new["t"][4:6] = -2.0
    for _ in range(3):
        xr.testing.assert_allclose(_open(url, s3_options, cfg).t.compute(), new.t)


def test_revalidate_on_every_worker_sees_another_writers_change(env: Env) -> None:
    cfg = env.config()
    url, expected = env.install(cfg)
    xr.testing.assert_allclose(_open(url, env.opts, cfg).t.compute(), expected.t)
    # another writer (plain xarray, not through zcache) rewrites the first time chunk
    new = expected.copy(deep=True)
    new["t"][0:2] = -3.0
    write_zarr(
        new[["t"]].isel(time=slice(0, 2)).drop_vars("time"),
        url,
        env.opts,
        region={"time": slice(0, 2)},
    )
    reports = zd.revalidate(env.client, url, env.opts)
    assert len(reports) == len(env.client.scheduler_info()["workers"])
    # the 4 chunks of time 0-1, on their owners, and the replicas other workers kept of
    # them: replicas carry their owner's version, so they are found changed (compared),
    # never dropped as "unverified"
    assert sum(r.changed for r in reports.values()) >= 4
    assert sum(r.unverified for r in reports.values()) == 0
    gets = env.server.requests.chunk_gets(env.bucket)
    xr.testing.assert_allclose(_open(url, env.opts, cfg).t.compute(), new.t)
    assert env.server.requests.chunk_gets(env.bucket) - gets == 4  # once each, cluster-wide


def _cached_store(url: str, opts: dict[str, Any], cfg: CacheConfig) -> Any:
    from xarray_zcache import open_store

    return open_store(url, storage_options=opts, cache_config=cfg, read_only=False)


def test_one_host_with_a_shared_folder_sends_no_peer_requests(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Any
) -> None:
    cfg = _config(tmp_path, per_worker=False)
    url = f"s3://{s3_bucket}/era5.zarr"
    expected = _write(url, s3_options)
    with _cluster(2) as cluster, Client(cluster) as client:
        zd.install(client, cfg)
        _one_host_reads(client, url, expected, cfg, s3_server, s3_bucket, s3_options)


def _one_host_reads(
    client: Client,
    url: str,
    expected: xr.Dataset,
    cfg: CacheConfig,
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
) -> None:
    ds = _open(url, s3_options, cfg)
    log = s3_server.requests
    xr.testing.assert_allclose(ds.t.mean("time").compute(), expected.t.mean("time"))
    before = log.chunk_gets(s3_bucket)
    xr.testing.assert_allclose(ds.t.max().compute(), expected.t.max())
    assert log.chunk_gets(s3_bucket) - before == 0
    stats = client.run(_worker_stats)
    assert sum(s["peer_served"] for s in stats.values()) == 0
    assert sum(s["peer_fallbacks"] for s in stats.values()) == 0


def test_membership_moves_only_the_keys_of_who_came_or_went() -> None:
    keys = [f"ns/a/c/{i}/{j}" for i in range(50) for j in range(20)]
    m3 = Membership(1, {"h1": ("w1",), "h2": ("w2",), "h3": ("w3",)})
    m4 = m3.with_worker("h4", "w4")
    moved = m3.moved(m4, keys)
    assert moved and all(m4.owner(k) == "h4" for k in moved)  # only to the newcomer
    assert 0.1 < len(moved) / len(keys) < 0.4  # about a quarter
    gone = m4.without_worker("w2")
    moved = m4.moved(gone, keys)
    assert all(m4.owner(k) == "h2" for k in moved)  # only the leaver's keys
    assert Membership.from_msg(gone.to_msg()) == gone


def test_cluster_figures_match_the_server(env: Env) -> None:
    """Summed over the workers and the client, requests sent equal the server's GETs."""
    from xarray_zcache import get_cache
    from xarray_zcache.cache.stats import CacheStats

    cfg = env.config()
    url, expected = env.install(cfg)
    client, s3_server, s3_bucket, s3_options = env.client, env.server, env.bucket, env.opts

    def total() -> CacheStats:
        stats = [CacheStats.from_dict(s) for s in client.run(_worker_stats).values()]
        return sum(stats[1:], stats[0]) + get_cache(cfg).stats()

    log = s3_server.requests
    for work in (lambda d: d.t.mean("time"), lambda d: d.t.max(["lat", "lon"])):
        before, gets = total(), log.count("GET", bucket=s3_bucket, key_prefix="")
        ds = _open(url, s3_options, cfg)
        xr.testing.assert_allclose(work(ds).compute(), work(expected))
        d = total() - before
        assert d.requests_sent == log.count("GET", bucket=s3_bucket, key_prefix="") - gets


def test_cluster_stats_before_install_names_the_cause_without_dask_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as c,
    ):
        with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="install"):
            zd.cluster_stats(c)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_a_killed_owner_costs_only_its_share(env: Env) -> None:
    # last in the module: it kills a worker of the shared cluster (its nanny restarts it)
    cfg = env.config()
    url, expected = env.install(cfg)
    client, s3_options = env.client, env.opts
    ds = _open(url, s3_options, cfg)
    xr.testing.assert_allclose(ds.t.mean("time").compute(), expected.t.mean("time"))
    victim = sorted(client.scheduler_info()["workers"])[0]

    async def die() -> None:
        os._exit(1)

    client.run(die, workers=[victim], wait=False)
    # the computation goes on while the owner is gone and its nanny restarts it
    for _ in range(2):
        xr.testing.assert_allclose(ds.t.max("time").compute(), expected.t.max("time"))


def test_kerchunk_references_are_one_cache_on_the_cluster(env: Env, tmp_path: Any) -> None:
    """A reference set's chunks are cached under their target file's byte ranges: on the
    cluster too (pickled to the workers, owned, asked of peers), and re-runs read nothing."""
    from kerchunk.hdf import SingleHdf5ToZarr

    cfg = env.config()
    zd.install(env.client, cfg)
    rng = np.random.default_rng(3)
    expected = xr.Dataset(
        {"t": (("time", "lat", "lon"), rng.normal(280, 5, (16, 16, 32)).astype("f4"))}
    )
    path = tmp_path / "t.nc"
    expected.to_netcdf(path, engine="h5netcdf", encoding={"t": {"chunksizes": (2, 8, 16)}})
    url = f"s3://{env.bucket}/nc/t.nc"
    with env.server.closing_filesystem() as fs:  # (its session closed after)
        fs.put_file(str(path), url.removeprefix("s3://"))
        with fs.open(url) as f:
            refs = SingleHdf5ToZarr(f, url, inline_threshold=0).translate()
    so = {"fo": refs, "remote_protocol": "s3", "remote_options": env.opts}
    ds = xr.open_dataset(
        "reference://", engine="zcache", chunks={}, storage_options=so, cache_config=cfg,
        consolidated=False, zarr_format=2,
    )  # fmt: skip
    log = env.server.requests
    gets = []
    for _ in range(2):
        before = log.count("GET", bucket=env.bucket, key_prefix="nc/")
        got = ds.t.mean("time").compute()
        xr.testing.assert_allclose(got, expected.t.mean("time"))
        gets.append(log.count("GET", bucket=env.bucket, key_prefix="nc/") - before)
    assert gets == [32, 0], gets  # one ranged GET per chunk of t.nc, cluster-wide; then none


def _read_owned(url: str, opts: dict[str, Any], cfg_dict: dict[str, Any]) -> list[str]:
    """On a worker: read (misses: one GET each) the first two chunks it owns; their keys."""
    from distributed import get_worker
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from xarray_zcache import open_store
    from xarray_zcache.distributed.worker import worker_cache_state

    store = open_store(url, storage_options=opts, cache_config=CacheConfig.from_dict(cfg_dict))
    state = worker_cache_state(get_worker())
    assert state is not None and state.peer is not None
    proto = default_buffer_prototype()
    keys = []
    for key in (f"t/c/{i}/{j}/{k}" for i in range(8) for j in range(2) for k in range(2)):
        if len(keys) < 2 and state.peer._pick(store._ck(key)) is None:
            assert sync(store.get(key, proto)) is not None
            keys.append(key)
    owners = {state.peer.membership.owner(store._ck(f"t/c/{i}/0/0")) for i in range(8)}
    assert len(keys) == 2, f"this worker ({state.peer.host}) owns too few chunks: {owners}"
    return keys


def _read_key(url: str, opts: dict[str, Any], cfg_dict: dict[str, Any], key: str) -> int:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from xarray_zcache import open_store

    store = open_store(url, storage_options=opts, cache_config=CacheConfig.from_dict(cfg_dict))
    got = sync(store.get(key, default_buffer_prototype()))
    assert got is not None
    return len(got)


def _peer_counts(dask_worker: Any) -> dict[str, int]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None and state.server is not None and state.peer is not None
    s = state.cache.stats()
    return {
        "asks": state.server.asks,
        "hops": state.server.hops,
        "sent": state.peer.asks_sent,
        "peer_hits": s.hits["peer"]["chunk"],
        "fallbacks": s.peer_fallbacks,
    }


def test_a_peer_hit_is_one_ask_answered_from_the_owners_memory_with_no_get(env: Env) -> None:
    cfg = env.config()
    url, _ = env.install(cfg)
    client, log = env.client, env.server.requests
    a, *others = sorted(client.scheduler_info()["workers"])
    first, key = client.submit(
        _read_owned, url, env.opts, cfg.to_dict(), workers=[a], pure=False
    ).result()
    b = others[0]
    gets = {k: log.count("GET", bucket=env.bucket, key_suffix=k) for k in (first, key)}
    # the first ask may find the owner's confirmation older than the asker's (the store the
    # asker sends carries its confirmations): the owner then confirms first, off the fast path
    client.submit(_read_key, url, env.opts, cfg.to_dict(), first, workers=[b], pure=False).result()
    before = client.run(_peer_counts)
    n = client.submit(_read_key, url, env.opts, cfg.to_dict(), key, workers=[b], pure=False)
    assert n.result() > 0
    after = client.run(_peer_counts)
    for k in (first, key):  # no GET for either
        assert log.count("GET", bucket=env.bucket, key_suffix=k) == gets[k]
    d = {w: {k: after[w][k] - before[w][k] for k in after[w]} for w in after}
    assert d[b]["sent"] == 1 and d[b]["peer_hits"] == 1 and d[b]["fallbacks"] == 0
    assert d[a]["asks"] == 1  # one request to the owner ...
    assert d[a]["hops"] == 0  # ... answered from its memory, on its comm loop
    assert sum(d[w]["asks"] for w in d) == 1
