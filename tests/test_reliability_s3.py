"""Issue 6, part 4: faults from S3, injected by a proxy on 127.0.0.1 (`faults.FaultProxy`).

HTTP 500, 503 SlowDown, connection resets, stalls past the client's read timeout, truncated
bodies; once or until cleared; on whole, ranged and metadata reads and on writes. The user
gets an error (or the retry of s3fs/botocore succeeds), nothing wrong or partial is cached,
and reads succeed once the faults stop.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
import s3fs
import xarray as xr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from xarray_zcache.backend import open_store
from xarray_zcache.testing import faults
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import write_zarr

P = default_buffer_prototype()


@pytest.fixture
def proxy(s3_server: LocalS3Server) -> Iterator[faults.FaultProxy]:
    with faults.FaultProxy(s3_server.endpoint_url) as p, faults.few_s3fs_retries(2):
        yield p


def test_every_fault_kind_on_every_path(s3_server: LocalS3Server, tmp_path: pathlib.Path) -> None:
    cases = faults.s3_cases_all()
    result = faults.run_s3_faults(s3_server, cases, tmp_path, seed=1)
    result.assert_clean(errors_allowed=True)
    assert result.runs == len(cases)
    persistent = sum(1 for c in cases if c.times is None)
    assert result.errors_to_user >= persistent  # a fault that does not stop reaches the user


def test_random_faults(s3_server: LocalS3Server, tmp_path: pathlib.Path) -> None:
    result = faults.run_s3_faults(s3_server, faults.s3_cases_random(12, seed=5), tmp_path, 5)
    result.assert_clean(errors_allowed=True)


def test_persistent_500_is_a_clear_error_and_nothing_is_cached(
    s3_server: LocalS3Server,
    s3_bucket: str,
    proxy: faults.FaultProxy,
    tmp_path: pathlib.Path,
    s3_fs: s3fs.S3FileSystem,
) -> None:
    direct = s3_fs  # (straight to the server, not through the proxy)
    direct.pipe_file(f"{s3_bucket}/ds/v/c/0", b"chunk bytes")
    direct.pipe_file(f"{s3_bucket}/ds/v/zarr.json", b"{}")
    cfg = faults.config(tmp_path / "cache", "s3-500")
    store = open_store(
        f"s3://{s3_bucket}/ds",
        storage_options=faults.s3_client_options(s3_server, proxy.url),
        cache_config=cfg,
    )
    proxy.add(faults.Fault("500", method="GET"))
    for key in ("v/c/0", "v/zarr.json"):
        with pytest.raises(OSError, match="internal error"):
            sync(store.get(key, P))
        assert faults.cached_entries(store, key) == []  # no value, no negative entry
    assert store.stats().inner_errors == 2
    proxy.clear()
    assert sync(store.get("v/c/0", P)).to_bytes() == b"chunk bytes"
    assert sync(store.get("v/zarr.json", P)).to_bytes() == b"{}"
    store.cache.close()


def test_xarray_reads_fail_clearly_then_succeed(
    s3_server: LocalS3Server, s3_bucket: str, proxy: faults.FaultProxy, tmp_path: pathlib.Path
) -> None:
    url = f"s3://{s3_bucket}/era5.zarr"
    expected = xr.Dataset(
        {"t2m": (("time", "x"), np.arange(64, dtype="float32").reshape(8, 8))},
        coords={"time": np.arange(8)},
    )
    write_zarr(
        expected,
        url,
        s3_server.storage_options(),
        zarr_format=3,
        encoding={"t2m": {"chunks": (2, 8)}},
    )
    opts = faults.s3_client_options(s3_server, proxy.url)
    cfg = faults.config(tmp_path / "cache", "s3-xarray")
    ds = xr.open_dataset(url, engine="zcache", chunks={}, storage_options=opts, cache_config=cfg)
    for kind in ("503", "truncate", "reset"):
        proxy.add(faults.Fault(kind, method="GET", path="/era5.zarr/t2m/c/"))
        with pytest.raises(Exception) as info:
            ds.t2m.compute()
        assert not isinstance(info.value, AssertionError)
        proxy.clear()
    xr.testing.assert_identical(ds.compute(), expected)
    again = xr.open_dataset(url, engine="zcache", chunks={}, storage_options=opts, cache_config=cfg)
    xr.testing.assert_identical(again.compute(), expected)


def test_write_acknowledged_by_s3_but_answered_with_an_error(
    s3_server: LocalS3Server,
    s3_bucket: str,
    proxy: faults.FaultProxy,
    tmp_path: pathlib.Path,
    s3_fs: s3fs.S3FileSystem,
) -> None:
    """The PUT reaches S3, the client sees a 500: the error reaches the user and the cache
    holds neither the old nor the new value; the next read returns what S3 holds."""
    direct = s3_fs  # (straight to the server, not through the proxy)
    direct.pipe_file(f"{s3_bucket}/ds/v/c/0", b"old")
    store = open_store(
        f"s3://{s3_bucket}/ds",
        storage_options=faults.s3_client_options(s3_server, proxy.url),
        cache_config=faults.config(tmp_path / "cache", "s3-put"),
        read_only=False,
    )
    assert sync(store.get("v/c/0", P)).to_bytes() == b"old"
    proxy.add(faults.Fault("500", method="PUT", after=True))
    with pytest.raises(OSError):
        sync(store.set("v/c/0", faults.buf(b"new")))
    assert faults.cached_entries(store, "v/c/0") == []
    proxy.clear()
    assert direct.cat_file(f"{s3_bucket}/ds/v/c/0") == b"new"
    assert sync(store.get("v/c/0", P)).to_bytes() == b"new"
    store.cache.close()
