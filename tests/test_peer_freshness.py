"""Peers carry versions; writes that did not reach every worker (issue 18 items 2, 8).

A real two-worker `LocalCluster` (worker processes, one disk folder each: two cache
hosts), real local S3 whose request log counts what the server saw, real zarr.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster
from zarr.storage import FsspecStore

import xarray_zcache.distributed as zd
from xarray_zcache import CacheConfig
from xarray_zcache.distributed.membership import Membership
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import s3fs_store

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]

INTERVAL = 8.0  # the validation interval of the workers' caches (seconds)
SHAPE, CHUNKS = (8, 16), (2, 16)  # 4 chunks: t/c/<i>/0


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Client, CacheConfig]]:
    folder = tempfile.mkdtemp(prefix="zcache-peer-freshness-")
    cfg = (
        CacheConfig()
        .with_memory_size("64MB")
        .with_disk_cache(pathlib.Path(folder) / "cache", "256MB")
        .with_validation(INTERVAL)
        .with_name("peer-freshness")
        ._replace(per_worker=True, report_interval=0.5, peer_timeout=20.0)
    )
    try:
        with (
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as lc,
            Client(lc) as client,
        ):
            zd.install(client, cfg)
            yield client, cfg
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def plain() -> Iterator[Callable[[str, dict[str, Any]], FsspecStore]]:
    """``plain(url, options)``: another writer's zarr store (plain zarr, not through
    zcache), its aiohttp session closed when the test ends (`s3fs_store`)."""
    with contextlib.ExitStack() as stack:
        yield lambda url, opts: stack.enter_context(s3fs_store(url, opts))


def _create(store: FsspecStore, value: float) -> zarr.Array[Any]:
    """Arrays ``t`` and ``u`` of ``value`` in ``store``, by another writer; returns ``t``
    opened for writing."""
    for name in ("u", "t"):
        arr = zarr.create_array(
            store, name=name, shape=SHAPE, chunks=CHUNKS, dtype="f4", zarr_format=3
        )
        arr[:] = value
    return arr


def _store(url: str, opts: dict[str, Any], cfg: CacheConfig, read_only: bool = True) -> Any:
    from xarray_zcache import open_store

    return open_store(url, storage_options=opts, cache_config=cfg, read_only=read_only)


def _read_rows(url: str, opts: dict[str, Any], cfg: CacheConfig, i: int, name: str = "t") -> float:
    """Chunk ``<name>/c/<i>/0`` read through zcache (on the worker this runs on)."""
    arr = zarr.open_array(_store(url, opts, cfg), path=name, mode="r")
    values = np.asarray(arr[2 * i : 2 * i + 2])
    assert len(set(values.ravel().tolist())) == 1
    return float(values.ravel()[0])


def _membership(client: Client) -> Membership:
    def get(dask_scheduler: Any) -> dict[str, Any]:
        return dict(dask_scheduler.plugins["zcache-scheduler"].directory.membership.to_msg())

    return Membership.from_msg(client.run_on_scheduler(get))


def _owner_and_other(
    client: Client, url: str, opts: dict[str, Any], cfg: CacheConfig, i: int
) -> tuple[str, str]:
    """The worker owning chunk ``t/c/<i>/0``, and the other worker."""
    m = _membership(client)
    owner = m.owner(_store(url, opts, cfg)._ck(f"t/c/{i}/0"))
    assert owner is not None
    (a,) = m.workers_of(owner)
    (b,) = set(client.scheduler_info()["workers"]) - {a}
    return a, b


def _on(client: Client, worker: str, fn: Any, *args: Any) -> Any:
    return client.submit(fn, *args, workers=[worker], pure=False).result()


def _until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def test_a_replica_is_served_no_longer_than_its_owners_confirmation_allows(
    cluster: tuple[Client, CacheConfig],
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    plain: Callable[[str, dict[str, Any]], FsspecStore],
) -> None:
    client, cfg = cluster
    url = f"s3://{s3_bucket}/peers.zarr"
    writer = _create(plain(url, s3_options), 1.0)
    i = 1
    a, b = _owner_and_other(client, url, s3_options, cfg, i)
    gets = lambda: s3_server.requests.count("GET", bucket=s3_bucket, key_suffix=f"t/c/{i}/0")  # noqa: E731
    for w in (a, b):  # sessions and stores set up, every chunk but i cached
        for j in range(SHAPE[0] // CHUNKS[0]):
            for name in ("u", "t"):
                if (name, j) != ("t", i):
                    assert _on(client, w, _read_rows, url, s3_options, cfg, j, name) == 1.0

    assert _on(client, a, _read_rows, url, s3_options, cfg, i) == 1.0  # the owner caches it
    assert gets() == 1
    _on(client, a, zd._revalidate_task, url, s3_options)  # A confirms the array now
    confirmed = time.time()
    writer[2 * i : 2 * i + 2] = 2.0  # another writer rewrites the chunk
    changed = time.time()
    # B validates its own entries of the array now, then asks A while A's confirmation is
    # recent: it may get the old bytes (within the bound) and keeps a replica
    _until(confirmed + INTERVAL - 2.5)
    _on(client, b, zd._revalidate_task, url, s3_options)
    first = _on(client, b, _read_rows, url, s3_options, cfg, i)
    assert first in (1.0, 2.0)
    # past the interval (and one listing) after the change: never the old bytes, although
    # B's own validation of the array is recent (the bound counts from A's confirmation)
    _until(changed + INTERVAL + 1.5)
    assert _on(client, b, _read_rows, url, s3_options, cfg, i) == 2.0
    # the owner read the chunk twice (before and after the change), B never did
    assert gets() == 2

    # B's replica was recorded with the owner's version: a validation on B compares it
    # (unchanged) and keeps it, instead of dropping it as unverified
    reports = zd.revalidate(client, url, s3_options)
    assert reports[b].unverified == 0, reports[b]
    assert reports[b].changed == 0, reports[b]
    assert _on(client, b, _read_rows, url, s3_options, cfg, i) == 2.0
    assert gets() == 2


def _deafen(dask_worker: Any) -> None:
    dask_worker._zcache_ears = dask_worker.handlers.pop("zcache_invalidate_local")


def _hear_again(dask_worker: Any) -> None:
    dask_worker.handlers["zcache_invalidate_local"] = dask_worker._zcache_ears


def test_a_worker_that_missed_a_write_leaves_the_ring_until_it_acknowledges(
    cluster: tuple[Client, CacheConfig],
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    plain: Callable[[str, dict[str, Any]], FsspecStore],
) -> None:
    client, cfg = cluster
    url = f"s3://{s3_bucket}/deaf.zarr"
    _create(plain(url, s3_options), 1.0)
    i = 1
    a, b = _owner_and_other(client, url, s3_options, cfg, i)
    gets = lambda: s3_server.requests.count("GET", bucket=s3_bucket, key_suffix=f"t/c/{i}/0")  # noqa: E731
    assert _on(client, b, _read_rows, url, s3_options, cfg, i) == 1.0  # via its owner, A
    assert gets() == 1

    client.run(_deafen, workers=[a])
    try:
        caplog.set_level(logging.WARNING, logger="xarray_zcache.distributed")
        # a write through zcache on the client: A cannot hear of it
        arr = zarr.open_array(_store(url, s3_options, cfg, read_only=False), path="t", mode="r+")
        arr[2 * i : 2 * i + 2] = 3.0
        warned = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "did not acknowledge" in r.getMessage()
        ]
        assert warned and all(a in w and b not in w for w in warned), warned
        m = _membership(client)
        assert m.host_of(a) is None and m.host_of(b) is not None
        # the healthy worker no longer asks the deaf owner: it reads the source itself
        assert _on(client, b, _read_rows, url, s3_options, cfg, i) == 3.0
        assert gets() == 2
    finally:
        client.run(_hear_again, workers=[a])
    # A acknowledges what it missed (sent again when it reports) and is back in the ring
    deadline = time.monotonic() + 30
    while _membership(client).host_of(a) is None:
        assert time.monotonic() < deadline, "the worker did not come back into the ring"
        time.sleep(0.1)
    # and it dropped the old bytes it held
    assert _on(client, a, _read_rows, url, s3_options, cfg, i) == 3.0
