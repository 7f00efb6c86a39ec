"""Versions belong to the bytes (issue 18, items 1 and 3).

Every process of a cache folder serves data at most one validation interval plus one
listing older than the source: a validation compares the listing with the versions of
the bytes *this* process holds (and of the objects the folder's processes recorded),
and a change found or written by one process reaches the memory of every other one
through the folder's change log. On a Dask cluster, the client's confirmation time of
each unit travels with the pickled store, and workers confirm older units first.

"Another process" is a real subprocess sharing the folder; the cluster is a real
`LocalCluster` of worker processes; S3 is the moto server of ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from zarr.core.sync import sync

from xarray_zcache import CacheConfig, open_store
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import write_zarr

INTERVAL = 2.0
#: a listing of these small arrays on the local server, plus a loaded machine's slack
MARGIN = 4.0

# the other process: its config is the test's (same name, same folder)
_CHILD = r"""
import json, sys, time
import numpy as np, xarray as xr, zarr
from zarr.core.sync import sync
from xarray_zcache import CacheConfig, open_store

a = json.loads(sys.argv[1])
cfg = (CacheConfig().with_name(a["name"]).with_memory_size("16MB")
       .with_disk_cache(a["folder"], "64MB").with_prefetch(0)
       .with_validation(a["interval"]))
store = open_store(a["url"], storage_options=a["opts"], cache_config=cfg, read_only=False)
mode = a["mode"]
if mode == "write":  # write chunk 2 through zcache, then read it back (fills the new version)
    store.close()
    cfg = cfg.with_cache_on_write(False)  # (read back from the source: the book says it)
    store = open_store(a["url"], storage_options=a["opts"], cache_config=cfg, read_only=False)
    arr = zarr.open_array(store, path="v", mode="r+")
    arr[8:12] = a["value"]
    print(json.dumps(arr[:].tolist()), flush=True)
    store.cache.flush()
elif mode == "read-loop":  # hold the data in memory, read until told the new value
    arr = zarr.open_array(store, path="v", mode="r")
    t0 = time.time()
    while time.time() - t0 < a["seconds"]:
        print(json.dumps([time.time(), arr[:].tolist()]), flush=True)
        time.sleep(0.1)
elif mode == "revalidate-loop":  # read all but chunk 2, then validate again and again
    arr = zarr.open_array(store, path="v", mode="r")
    arr[:8]; arr[12:]
    print("ready", flush=True)
    t0 = time.time()
    while time.time() - t0 < a["seconds"]:
        sync(store.revalidate())
        time.sleep(0.2)
store.close()
"""


def _cfg(tmp_path: Path, name: str, interval: float = INTERVAL) -> CacheConfig:
    return (
        CacheConfig()
        .with_name(name)
        .with_memory_size("16MB")
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_prefetch(0)
        .with_validation(interval)
    )


def _child_args(
    url: str, opts: dict[str, Any], tmp_path: Path, name: str, mode: str, **extra: Any
) -> list[str]:
    args = {
        "url": url,
        "opts": opts,
        "folder": str(tmp_path / "cache"),
        "name": name,
        "interval": extra.pop("interval", INTERVAL),
        "mode": mode,
        **extra,
    }
    return [sys.executable, "-c", _CHILD, json.dumps(args)]


def _env() -> dict[str, str]:
    return dict(os.environ)


def _write(url: str, opts: dict[str, Any], n: int = 20) -> None:
    ds = xr.Dataset({"v": ("x", np.arange(n, dtype="f8"))})
    write_zarr(
        ds, url, opts, encoding={"v": {"chunks": (4,)}}, zarr_format=3, consolidated=False, mode="w"
    )


def _values(store: Any) -> list[float]:
    import zarr

    return list(zarr.open_array(store, path="v", mode="r")[:].tolist())


def _until_equal(store: Any, expected: list[float], limit: float) -> float:
    """Seconds until reads through ``store`` return ``expected`` (fails past ``limit``)."""
    t0 = time.monotonic()
    while True:
        got = _values(store)
        took = time.monotonic() - t0
        if got == expected:
            return took
        assert took < limit, f"still stale after {took:.1f} s: {got}"
        time.sleep(0.1)


def test_a_write_and_read_back_by_another_process_reaches_this_memory(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """(a) P1 writes a chunk through zcache and reads it back (the book then says the
    new version); P2 holds the old chunk in memory: P2 sees the new one in time."""
    url = f"s3://{s3_bucket}/a.zarr"
    _write(url, s3_options)
    cfg = _cfg(tmp_path, "bytes-a")
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    assert _values(store) == list(range(20))  # P2: every chunk in memory
    out = subprocess.run(
        _child_args(url, s3_options, tmp_path, "bytes-a", "write", value=-1.0),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    expected = [float(x) for x in range(20)]
    expected[8:12] = [-1.0] * 4
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected  # P1 reads it back
    took = _until_equal(store, expected, INTERVAL + MARGIN)
    assert took <= INTERVAL + MARGIN
    assert store.cache.freshness.counts["log_rows"] >= 1  # learnt from the folder's log


def test_b_a_write_through_this_process_reaches_another_process(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """(b) a process reading the data again and again (holding it in memory) sees a
    write through zcache by another process of the folder within the bound."""
    url = f"s3://{s3_bucket}/b.zarr"
    _write(url, s3_options)
    cfg = _cfg(tmp_path, "bytes-b")
    reader = subprocess.Popen(
        _child_args(url, s3_options, tmp_path, "bytes-b", "read-loop", seconds=25),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        first = json.loads(reader.stdout.readline())
        assert first[1] == list(range(20))
        import zarr

        wcfg = cfg.with_cache_on_write(False)  # (read back from the source: the book says it)
        store = open_store(url, storage_options=s3_options, cache_config=wcfg, read_only=False)
        arr = zarr.open_array(store, path="v", mode="r+")
        arr[8:12] = -2.0
        assert arr[:].tolist()[8:12] == [-2.0] * 4  # this process reads it back
        written = time.time()
        seen = None
        for line in reader.stdout:
            at, values = json.loads(line)
            if at > written and values[8:12] == [-2.0] * 4:
                seen = at
                break
        assert seen is not None, "the other process never saw the write"
        assert seen - written <= INTERVAL + MARGIN
    finally:
        reader.kill()
        reader.wait()


def test_c_a_change_of_an_object_held_only_in_memory_is_seen(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """(c) another writer changes a chunk this process holds in memory only (evicted
    from the folder), while another process of the folder keeps validating the array
    (so this process adopts its validations): the change is seen within the bound."""
    url = f"s3://{s3_bucket}/c.zarr"
    _write(url, s3_options)
    cfg = _cfg(tmp_path, "bytes-c")
    validator = subprocess.Popen(
        _child_args(url, s3_options, tmp_path, "bytes-c", "revalidate-loop", seconds=30),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert validator.stdout is not None
        assert validator.stdout.readline().strip() == "ready"
        store = open_store(url, storage_options=s3_options, cache_config=cfg)
        assert _values(store) == list(range(20))
        cache = store.cache
        cache.flush()
        disk = cache.disk_tier
        assert disk is not None
        disk.delete(store._ck("v/c/2"))  # evicted from the folder: in this memory only
        part = xr.Dataset({"v": ("x", np.full(4, -3.0))})  # another writer, plain xarray
        write_zarr(part, url, s3_options, region={"x": slice(8, 12)})
        expected = [float(x) for x in range(20)]
        expected[8:12] = [-3.0] * 4
        took = _until_equal(store, expected, INTERVAL + MARGIN)
        assert took <= INTERVAL + MARGIN
    finally:
        validator.kill()
        validator.wait()


def test_one_version_per_array_read_on_a_cluster(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """Item 3: another writer appends; the client validates and re-opens; the workers
    (inside their own validation window, the old last chunk in memory) confirm the
    array first: the values equal the source, no NaN."""
    from distributed import Client, LocalCluster

    url = f"s3://{s3_bucket}/ts.zarr"
    _write(url, s3_options, n=10)
    # a long interval: the workers' own window and their change-log reads do not help
    cfg = _cfg(tmp_path, "bytes-cluster", interval=60)
    kw: dict[str, Any] = {"engine": "zcache", "storage_options": s3_options, "cache_config": cfg}
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster),
    ):
        ds = xr.open_dataset(url, chunks={}, **kw)
        assert ds.v.compute().values.tolist() == list(range(10))  # workers cache it
        more = xr.Dataset({"v": ("x", np.arange(10, 12, dtype="f8"))})
        write_zarr(more, url, s3_options, append_dim="x")
        store = open_store(url, storage_options=s3_options, cache_config=cfg)
        report = sync(store.revalidate())  # the client validates: it sees the new shape
        assert report.changed >= 1
        ds = xr.open_dataset(url, chunks={}, **kw)  # the client re-opens
        assert ds.sizes["x"] == 12
        # the new metadata reaches the folder: the workers read it from disk, not from
        # the source (where its change would make them validate the array themselves)
        store.cache.flush()
        got = ds.v.compute().values
        ds.close()
        assert not np.isnan(got).any(), got.tolist()
        assert got.tolist() == list(range(12))


@pytest.fixture(autouse=True)
def _server(s3_server: LocalS3Server) -> None:
    """(the moto server of conftest.py, started once)"""
