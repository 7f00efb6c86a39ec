"""Validation costs what it says, and claims are leases (issue 18, items 5 and 6).

* at most one validation of a unit in flight (per process: readers join it; per folder:
  a claim in ``versions.db``); the interval counts from the end of the last one, so a
  listing longer than the interval does not start another;
* every listing sent is counted in ``validation_requests``, one failure is one error;
* ``with_validation(0)``: each unit validated once per store object (per open);
* a claim is a lease: a cancelled validation releases it, a killed process's lapses.

Listing counts come from the S3 server's request log; the listing is slowed by a hook
(a wrapper of the real listing) or stalled by the fault proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from xarray_zcache import CacheConfig, open_store, store_versions
from xarray_zcache.cache import versions
from xarray_zcache.registry import close_all
from xarray_zcache.testing import faults
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import s3fs_store, write_zarr

P = default_buffer_prototype()


def _cfg(tmp_path: Path, name: str, validation: Any) -> CacheConfig:
    return (
        CacheConfig()
        .with_name(name)
        .with_memory_size("16MB")
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_prefetch(0)
        .with_validation(validation)
        # s3fs inside: these tests slow down or page `S3Versions`' listings (obstore's
        # validation is tested in test_store_identity.py and test_obstore_client.py)
        .with_client("s3fs")
    )


def _write(url: str, opts: dict[str, Any] | None, n: int, chunk: int, fmt: int = 3) -> None:
    ds = xr.Dataset({"v": ("x", np.arange(n, dtype="f8"))})
    write_zarr(
        ds,
        url,
        opts,
        encoding={"v": {"chunks": (chunk,)}},
        zarr_format=fmt,
        consolidated=True,
        mode="w",
    )


def _read(url: str, opts: dict[str, Any] | None, cfg: CacheConfig) -> list[float]:
    with xr.open_dataset(
        url, engine="zcache", storage_options=opts, cache_config=cfg, chunks=None
    ) as ds:
        return [float(x) for x in ds.v.values]


def _proxy_options(server: LocalS3Server, proxy: faults.FaultProxy) -> dict[str, Any]:
    """Through the proxy; one HTTP request per call (no client retries to hide)."""
    return server.storage_options(
        endpoint_url=proxy.url,
        config_kwargs={"s3": {"addressing_style": "path"}, "retries": {"total_max_attempts": 1}},
    )


# -- a listing longer than the interval -----------------------------------------------------------


def test_a_listing_longer_than_the_interval_starts_no_other_validation(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the flat-v2 case of issue 18 scaled down: pages of 10 keys, 101 chunks with flat
    # keys (v/0 ... v/100) + 2 documents: 11 pages; the listing (1.5 s) is longer than
    # the interval (1 s). Before: every chunk read after the first validation's start
    # found the unit stale again and validated it once more (31 validations, 341 listings
    # for 100 chunks at 1,000-key pages)
    monkeypatch.setattr(store_versions, "PAGE", 10)
    url = f"s3://{s3_bucket}/flat.zarr"
    _write(url, s3_options, n=101, chunk=1, fmt=2)
    cfg = _cfg(tmp_path, "flat", validation=1)
    assert _read(url, s3_options, cfg) == list(range(101))  # cold: nothing to validate
    real = store_versions.S3Versions.listing
    in_flight = 0
    most = 0
    lock = threading.Lock()

    async def slow(self: Any, folder: str, recursive: bool, starts: str = "") -> Any:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            await asyncio.sleep(1.5)
            return await real(self, folder, recursive, starts)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(store_versions.S3Versions, "listing", slow)
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    freshness = store.cache.freshness
    before, counts = store.stats(), dict(freshness.counts)
    lists = s3_server.requests.lists(s3_bucket)
    time.sleep(1.1)  # past the interval
    assert _read(url, s3_options, cfg) == list(range(101))  # 101 chunk reads at once
    delta = store.stats() - before
    # one validation per unit: the root's documents (1 page) and the array (11 pages)
    assert delta.validations == 2 and most == 1
    assert delta.validation_requests == 1 + 11
    assert s3_server.requests.lists(s3_bucket) - lists == delta.validation_requests
    assert freshness.counts["joined"] > counts.get("joined", 0)  # the others waited for it
    assert freshness.counts["claim_waits"] == counts.get("claim_waits", 0)


# -- failures -------------------------------------------------------------------------------------


def test_a_failed_listing_is_one_error_and_its_listing_is_counted(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_server.storage_options(), n=40, chunk=4)
    with faults.FaultProxy(s3_server.endpoint_url) as proxy, faults.few_s3fs_retries(1):
        opts = _proxy_options(s3_server, proxy)
        cfg = _cfg(tmp_path, "fail", validation=0.5)
        store = open_store(url, storage_options=opts, cache_config=cfg)
        arr = zarr.open_array(store, path="v", mode="r")
        assert arr[:].tolist() == list(range(40))  # cold: cached, no validation
        time.sleep(0.6)
        # the listing reaches S3 (counted in its log), its answer is a 500
        proxy.add(faults.Fault("500", method="GET", query="list-type", after=True))
        before = store.stats()
        lists = s3_server.requests.lists(s3_bucket)
        assert arr[:].tolist() == list(range(40))  # 10 chunk reads at once: stale-if-error
        delta = store.stats() - before
        # one unit (the array: its zarr.json and chunks), one failed validation
        assert delta.validation_errors == 1 and delta.validations == 0
        assert delta.validation_requests == 1 == proxy.injected["500"]
        assert s3_server.requests.lists(s3_bucket) - lists == delta.validation_requests
        assert store.cache.freshness.book.unit("R" + store._ck("v") + "/").holder == ""  # type: ignore[union-attr]


def test_the_pages_before_a_failing_page_are_counted(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing of two pages whose second page fails sent two requests: both are in
    ``validation_requests``, as in the server's log; still one error."""
    monkeypatch.setattr(store_versions, "PAGE", 10)  # the array's 11 objects: 2 pages
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_server.storage_options(), n=40, chunk=4)
    with faults.FaultProxy(s3_server.endpoint_url) as proxy, faults.few_s3fs_retries(1):
        opts = _proxy_options(s3_server, proxy)
        store = open_store(url, storage_options=opts, cache_config=_cfg(tmp_path, "page2", 0.5))
        arr = zarr.open_array(store, path="v", mode="r")
        assert arr[:].tolist() == list(range(40))
        time.sleep(0.6)
        # the first page is answered, the second (it carries a continuation token) fails
        proxy.add(faults.Fault("500", method="GET", query="continuation-token", after=True))
        before = store.stats()
        lists = s3_server.requests.lists(s3_bucket)
        assert arr[:].tolist() == list(range(40))  # stale-if-error
        delta = store.stats() - before
        assert delta.validation_errors == 1 and delta.validations == 0
        assert proxy.injected["500"] == 1
        assert delta.validation_requests == 2 == s3_server.requests.lists(s3_bucket) - lists


# -- with_validation(0): once per open ------------------------------------------------------------


def test_validation_zero_validates_each_unit_once_per_open(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_options, n=64, chunk=1)  # 64 chunks
    cfg = _cfg(tmp_path, "zero", validation=0)
    lists = s3_server.requests.lists(s3_bucket)
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    arr = zarr.open_array(store, path="v", mode="r")
    assert arr[:].tolist() == list(range(64))  # cold: nothing cached from before
    assert s3_server.requests.lists(s3_bucket) == lists
    for _ in range(3):  # warm reads through one open: no listing (before: 72 for one read)
        assert arr[:].tolist() == list(range(64))
    assert s3_server.requests.lists(s3_bucket) == lists
    before = store.stats()
    with contextlib.ExitStack() as opened:  # (each open closed after, its session too)
        for opens in (1, 2):  # each open: one listing of the array's unit, once
            again = opened.enter_context(
                open_store(url, storage_options=s3_options, cache_config=cfg)
            )
            other = zarr.open_array(again, path="v", mode="r")
            for _ in range(3):
                assert other[:].tolist() == list(range(64))
            delta = store.stats() - before
            assert delta.validations == opens and delta.validation_requests == opens
            assert s3_server.requests.lists(s3_bucket) - lists == opens
        # a change by another writer is seen by the next open, not by the older one
        with s3fs_store(url, s3_options) as plain:
            zarr.open_array(plain, path="v", mode="r+")[0:1] = -1.0
        assert other[0:1].tolist() == [0.0]
        newest = zarr.open_array(
            opened.enter_context(open_store(url, storage_options=s3_options, cache_config=cfg)),
            path="v",
            mode="r",
        )
        assert newest[0:1].tolist() == [-1.0]


def test_validation_zero_once_per_open_for_every_copy_of_the_open(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """Dask unpickles a store once per task: copies of one open are that open. Ten
    copies (of a store opened before the cache held the data) validate the array once
    between them; a new open validates once more."""
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_options, n=16, chunk=1)
    cfg = _cfg(tmp_path, "zero-copies", validation=0)
    warm = open_store(url, storage_options=s3_options, cache_config=cfg)
    assert zarr.open_array(warm, path="v", mode="r")[:].tolist() == list(range(16))
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    lists = s3_server.requests.lists(s3_bucket)
    before = store.stats()
    for _ in range(10):
        copy = pickle.loads(pickle.dumps(store))
        assert zarr.open_array(copy, path="v", mode="r")[:].tolist() == list(range(16))
    delta = store.stats() - before
    # the array's unit once, and the root's documents once (its open read them)
    assert 1 <= delta.validations == delta.validation_requests <= 2
    assert s3_server.requests.lists(s3_bucket) - lists == delta.validation_requests
    again = pickle.loads(
        pickle.dumps(open_store(url, storage_options=s3_options, cache_config=cfg))
    )
    assert zarr.open_array(again, path="v", mode="r")[:].tolist() == list(range(16))
    assert (store.stats() - before).validations > delta.validations  # a new open


# -- claims are leases ----------------------------------------------------------------------------


def test_a_cancelled_validation_releases_its_claim(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_server.storage_options(), n=40, chunk=4)
    with faults.FaultProxy(s3_server.endpoint_url) as proxy, faults.few_s3fs_retries(1):
        opts = _proxy_options(s3_server, proxy)
        cfg = _cfg(tmp_path, "cancel", validation=0.5)
        store = open_store(url, storage_options=opts, cache_config=cfg)
        assert sync(store.get("v/c/0", P)) is not None  # cached (cold: no validation)
        time.sleep(0.6)
        # the listing reaches S3, its answer stalls: the read is cancelled meanwhile
        proxy.add(faults.Fault("stall", query="list-type", after=True, stall=10.0, times=1))
        before, counts = store.stats(), dict(store.cache.freshness.counts)
        lists = s3_server.requests.lists(s3_bucket)

        async def start() -> asyncio.Task[Any]:
            return asyncio.ensure_future(store.get("v/c/0", P))

        read = sync(start())  # a read on zarr's event loop
        deadline = time.monotonic() + 30
        while not proxy.injected["stall"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proxy.injected["stall"] == 1  # its listing is in flight

        async def cancel() -> None:  # (as asyncio.wait_for does when it times out)
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await read

        sync(cancel())
        assert read.cancelled()
        # the next read validates at once: no wait on a claim, no flight to join
        buf = sync(store.get("v/c/0", P))
        assert buf is not None
        freshness = store.cache.freshness
        delta = store.stats() - before
        assert delta.validations == 1 and delta.validation_errors == 0
        assert freshness.counts["claim_waits"] == counts.get("claim_waits", 0)
        assert freshness.counts["joined"] == counts.get("joined", 0)
        assert freshness.counts["lapsed"] == counts.get("lapsed", 0)
        # both listings reached S3; both are counted (the cancelled one too)
        assert s3_server.requests.lists(s3_bucket) - lists == 2 == delta.validation_requests


_KILLED = """
import sys
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from xarray_zcache import CacheConfig, open_store
from xarray_zcache.cache import versions
url, endpoint, folder = sys.argv[1:4]
versions.LEASE = 2.0  # (renewed every 2/3 s while it lists)
opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
        "config_kwargs": {"s3": {"addressing_style": "path"}}}
cfg = (CacheConfig().with_name("killed").with_memory_size("16MB")
       .with_disk_cache(folder, "64MB").with_prefetch(0).with_validation(0.5))
store = open_store(url, storage_options=opts, cache_config=cfg)
sync(store.get("v/c/0", default_buffer_prototype()))  # its listing stalls: killed meanwhile
"""


@pytest.mark.parametrize("where", ["same-host", "other-host"])
def test_a_killed_processs_claim_lapses_for_the_next_process(
    s3_server: LocalS3Server,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_server.storage_options(), n=40, chunk=4)
    folder = tmp_path / "cache"
    cfg = _cfg(tmp_path, "killed", validation=0.5)
    with faults.FaultProxy(s3_server.endpoint_url) as proxy:
        opts = _proxy_options(s3_server, proxy)
        store = open_store(url, storage_options=opts, cache_config=cfg)
        assert sync(store.get("v/c/0", P)) is not None
        unit = "R" + store._ck("v") + "/"
        close_all()
        time.sleep(0.6)
        proxy.add(faults.Fault("stall", query="list-type", after=True, stall=60.0))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        child = subprocess.Popen(
            [sys.executable, "-c", _KILLED, url, proxy.url, str(folder)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            book = versions.VersionBook(str(folder))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and child.poll() is None:
                state = book.unit(unit)
                if proxy.injected["stall"] and state is not None and state.holder:
                    break
                time.sleep(0.05)
            state = book.unit(unit)
            assert state is not None and state.holder.split("/")[1] == str(child.pid)
            book.close()
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        proxy.clear()
        if where == "other-host":  # its process id means nothing here: the lease must lapse
            monkeypatch.setattr(versions, "_HOST", "elsewhere")
        lists = s3_server.requests.lists(s3_bucket)
        store = open_store(url, storage_options=opts, cache_config=cfg)  # the next process
        before = store.stats()
        assert sync(store.get("v/c/0", P)) is not None
        freshness = store.cache.freshness
        delta = store.stats() - before
        assert delta.validations == 1 and delta.validation_errors == 0
        assert s3_server.requests.lists(s3_bucket) - lists == 1 == delta.validation_requests
        if where == "same-host":  # taken over at once: no wait
            assert freshness.counts["dead"] == 1 and freshness.counts["claim_waits"] == 0
        else:  # the lease (2 s, no longer renewed) lapsed (waited for, if not yet), then
            # this process validated
            assert freshness.counts["lapsed"] == 1 and freshness.counts["dead"] == 0


def test_a_live_claim_is_renewed_past_its_lease(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listing longer than the lease keeps its claim: another book of the folder (as
    another process would) finds it held all along, and cannot take it."""
    monkeypatch.setattr(versions, "LEASE", 0.3)
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_options, n=40, chunk=4)
    cfg = _cfg(tmp_path, "renewed", validation=0.5)
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    assert sync(store.get("v/c/0", P)) is not None
    unit = "R" + store._ck("v") + "/"
    other = versions.VersionBook(str(tmp_path / "cache"))
    real = store_versions.S3Versions.listing
    taken: list[str | None] = []

    async def slow(self: Any, folder: str, recursive: bool, starts: str = "") -> Any:
        for _ in range(6):  # 1.2 s: four leases
            await asyncio.sleep(0.2)
            taken.append(other.claim(unit, time.time()))
        return await real(self, folder, recursive, starts)

    monkeypatch.setattr(store_versions.S3Versions, "listing", slow)
    time.sleep(0.6)
    assert sync(store.get("v/c/0", P)) is not None
    assert taken == [None] * 6
    state = other.unit(unit)
    assert state is not None and state.holder == ""  # released when done
    assert other.claim(unit, time.time()) == "free"
    other.close()


# -- local files: ctime ---------------------------------------------------------------------------


def test_a_local_file_rewritten_with_its_size_and_mtime_restored_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "local.zarr"
    arr = zarr.create_array(str(path), shape=(8,), chunks=(4,), dtype="<f8", compressors=None)
    arr[:] = np.arange(8.0)
    cfg = _cfg(tmp_path, "ctime", validation=600)
    store = open_store(str(path), cache_config=cfg)
    assert zarr.open_array(store, mode="r")[:4].tolist() == [0, 1, 2, 3]
    chunk = path / "c" / "0"
    st = os.stat(chunk)
    with open(chunk, "r+b") as f:  # rewritten in place: same inode, same size...
        f.write(np.full(4, 9.0, dtype="<f8").tobytes())
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the mtime restored
    after = os.stat(chunk)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )
    report = sync(store.revalidate())  # the ctime tells
    assert report.changed == 1
    assert zarr.open_array(store, mode="r")[:4].tolist() == [9.0] * 4


def test_flat_keys_list_only_the_cached_rows(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_versions, "PAGE", 10)  # a page of 10: the array is 7 pages
    url = f"s3://{s3_bucket}/flat2d.zarr"
    ds = xr.Dataset({"v": (("y", "x"), np.arange(60.0).reshape(6, 10))})
    write_zarr(
        ds, url, s3_options, encoding={"v": {"chunks": (1, 1)}}, zarr_format=2
    )  # keys v/0.0 ... v/5.9
    cfg = _cfg(tmp_path, "flat2d", validation="never")
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    with xr.open_dataset(url, engine="zcache", storage_options=s3_options, cache_config=cfg) as f:
        assert f.v[2].values.tolist() == list(range(20, 30))  # rows 2 and 4 cached
        assert f.v[4].values.tolist() == list(range(40, 50))
    part = xr.Dataset({"v": (("y", "x"), np.array([[-1.0]]))})
    write_zarr(part, url, s3_options, region={"y": slice(2, 3), "x": slice(3, 4)})
    lists = s3_server.requests.lists(s3_bucket)
    report = sync(store.revalidate())
    assert report.changed == 1
    # the root's documents: 1; the array: the names starting with "2." and "4.", not 7 pages
    assert report.requests == 1 + 2
    assert s3_server.requests.lists(s3_bucket) - lists == report.requests
