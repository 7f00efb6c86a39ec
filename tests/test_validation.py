"""Never stale beyond a bound (issue 11): entries validated against the object's version.

Another writer (plain zarr/xarray/s3fs, never through zcache) changes the data; readers
through zcache see the change once the validation interval has passed (or at once after
`CachedStore.revalidate`), paying one listing per 1,000 objects of an array and one GET
per changed object — never a GET for an unchanged one. Counts come from the S3
server's own request log.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
from xarray_zcache.cache import freshness
from xarray_zcache.cache.freshness import ObjectChanged
from xarray_zcache.registry import close_all
from xarray_zcache.testing import faults
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import s3fs_store, write_zarr

P = default_buffer_prototype()


def _cfg(tmp_path: Path, name: str, validation: Any = "never") -> CacheConfig:
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


def _write(url: str, opts: dict[str, Any] | None, n: int = 40, chunk: int = 4) -> xr.Dataset:
    ds = xr.Dataset({"v": ("x", np.arange(n, dtype="f8"))})
    write_zarr(
        ds,
        url,
        opts,
        encoding={"v": {"chunks": (chunk,)}},
        zarr_format=3,
        consolidated=True,
        mode="w",
    )
    return ds


def _read(url: str, opts: dict[str, Any] | None, cfg: CacheConfig) -> np.ndarray:
    with xr.open_dataset(
        url, engine="zcache", storage_options=opts, cache_config=cfg, chunks=None
    ) as ds:
        return np.asarray(ds.v.values)


def _rewrite(url: str, opts: dict[str, Any] | None, where: slice, value: float) -> None:
    """Another writer (plain xarray) rewrites ``v[where]`` in place."""
    n = where.stop - where.start
    part = xr.Dataset({"v": ("x", np.full(n, value))})
    write_zarr(part, url, opts, region={"x": where}, consolidated=False)


def _counts(server: LocalS3Server, bucket: str) -> tuple[int, int]:
    return server.requests.chunk_gets(bucket), server.requests.lists(bucket)


# -- S3: rewrite in place, append, delete, create -------------------------------------------------


def test_rewrite_in_place_is_seen_after_the_interval_for_one_listing_and_one_get(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_options)
    cfg = _cfg(tmp_path, "rewrite", validation=1)
    assert _read(url, s3_options, cfg).tolist() == list(range(40))
    _rewrite(url, s3_options, slice(8, 12), -1.0)  # chunk 2 of 10
    expected = list(range(40))
    expected[8:12] = [-1.0] * 4
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    before = store.stats()
    gets, lists = _counts(s3_server, s3_bucket)
    got = _read(url, s3_options, cfg)  # within the interval (if the machine is quick): old
    assert got.tolist() in (list(range(40)), expected)
    time.sleep(1.2)
    assert _read(url, s3_options, cfg).tolist() == expected
    gets2, lists2 = _counts(s3_server, s3_bucket)
    delta = store.stats() - before
    assert gets2 - gets == 1  # the changed chunk, once; never an unchanged one
    assert delta.validation_changes >= 1
    # each validation: the root's documents and the array (11 objects): one listing each
    # (a loaded machine may cross the 1 s interval more than once, and each unit's interval
    # counts from the end of its own last validation, so the two need not pair up)
    assert delta.validation_requests >= 2
    assert lists2 - lists == delta.validation_requests  # figures match the server's log


@pytest.mark.parametrize("where", ["s3", "local"])
def test_append_and_delete_and_create_by_another_writer(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    where: str,
) -> None:
    url, opts = f"s3://{s3_bucket}/ds.zarr", s3_options
    if where == "local":
        url, opts = str(tmp_path / "ds.zarr"), None
    _write(url, opts, n=10)
    cfg = _cfg(tmp_path, f"append-{where}")
    store = open_store(url, storage_options=opts, cache_config=cfg)
    assert _read(url, opts, cfg).tolist() == list(range(10))
    # append 2 steps (the last, partial chunk is rewritten; a new chunk appears)
    write_zarr(xr.Dataset({"v": ("x", np.arange(10.0, 12.0))}), url, opts, append_dim="x")
    report = sync(store.revalidate())
    assert report.changed >= 2  # the partial chunk and the metadata documents
    lists = s3_server.requests.lists(s3_bucket)
    assert _read(url, opts, cfg).tolist() == list(range(12))  # not [..., 9, nan, nan]
    # the new metadata was seen by that validation: the read does not list again
    assert s3_server.requests.lists(s3_bucket) == lists
    # (whatever the order of its units: one revalidate counts them all as of its start)
    book = store.cache.freshness.book
    states = [book.unit(unit.name) for unit, _ in store._units.values()]
    assert len(states) >= 2 and len({s.validated for s in states if s is not None}) == 1
    # delete a chunk: zarr then reads the fill value
    if where == "s3":
        with s3_server.closing_filesystem() as fs:
            fs.rm(f"{s3_bucket}/ds.zarr/v/c/0")
    else:
        os.remove(tmp_path / "ds.zarr" / "v" / "c" / "0")
    assert _read(url, opts, cfg)[:4].tolist() == [0, 1, 2, 3]  # (not validated yet)
    sync(store.revalidate())
    assert np.isnan(_read(url, opts, cfg)[:4]).all()
    # create it again: the negative entry must not hide it
    _rewrite(url, opts, slice(0, 4), 7.0)
    assert np.isnan(_read(url, opts, cfg)[:4]).all()
    gets = s3_server.requests.chunk_gets(s3_bucket)
    report = sync(store.revalidate())
    assert report.changed == 1  # the negative entry of the created chunk
    assert _read(url, opts, cfg)[:4].tolist() == [7.0] * 4
    if where == "s3":
        assert s3_server.requests.chunk_gets(s3_bucket) - gets == 1


def test_unchanged_entries_are_never_downloaded_again(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_options)
    cfg = _cfg(tmp_path, "unchanged")
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    _read(url, s3_options, cfg)
    gets, lists = _counts(s3_server, s3_bucket)
    report = sync(store.revalidate())
    assert report.changed == 0 and report.objects >= 10
    assert _read(url, s3_options, cfg).tolist() == list(range(40))
    gets2, lists2 = _counts(s3_server, s3_bucket)
    assert gets2 == gets
    assert lists2 - lists == report.requests == report.units


def test_one_listing_per_page_of_objects(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pages of 10 keys instead of S3's 1,000 (the same paging code, 100 times fewer
    # objects to write; benchmarks/freshness.py shows 1,000-key pages on 10,000 chunks)
    monkeypatch.setattr(store_versions, "PAGE", 10)
    url = f"s3://{s3_bucket}/big.zarr"
    _write(url, s3_options, n=25, chunk=1)  # 25 chunks
    cfg = _cfg(tmp_path, "big")
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    _read(url, s3_options, cfg)
    lists = s3_server.requests.lists(s3_bucket)
    report = sync(store.revalidate())
    # the root's documents: 1; the array (25 chunks + zarr.json): 3 pages
    assert report.requests == 1 + 3
    assert s3_server.requests.lists(s3_bucket) - lists == report.requests
    assert report.changed == 0


def _write_grid(url: str, opts: dict[str, Any] | None) -> None:
    """A 6 x 10 array of 1 x 1 chunks: 60 chunk objects, in rows ``v/c/<i>/``."""
    ds = xr.Dataset({"v": (("y", "x"), np.arange(60.0).reshape(6, 10))})
    write_zarr(ds, url, opts, encoding={"v": {"chunks": (1, 1)}}, zarr_format=3)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_only_the_rows_of_the_grid_that_are_cached_are_listed(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    monkeypatch.setattr(store_versions, "PAGE", 10)  # a page of 10: the array is 7 pages
    url, opts = (f"s3://{s3_bucket}/grid.zarr", s3_options)
    if where == "local":
        url, opts = str(tmp_path / "grid.zarr"), None
    _write_grid(url, opts)
    cfg = _cfg(tmp_path, f"rows-{where}")
    store = open_store(url, storage_options=opts, cache_config=cfg)
    with xr.open_dataset(url, engine="zcache", storage_options=opts, cache_config=cfg) as ds:
        assert ds.v[2].values.tolist() == list(range(20, 30))  # rows 2 and 4 cached
        assert ds.v[4].values.tolist() == list(range(40, 50))
    # another writer changes a cached chunk and one that is not cached
    part = xr.Dataset({"v": (("y", "x"), np.array([[-1.0]]))})
    write_zarr(part, url, opts, region={"y": slice(2, 3), "x": slice(3, 4)})
    write_zarr(part, url, opts, region={"y": slice(5, 6), "x": slice(5, 6)})
    lists = s3_server.requests.lists(s3_bucket)
    report = sync(store.revalidate())
    assert report.changed == 1
    if where == "s3":
        # the root's documents: 1; the array: its rows 2 and 4 (a page each), not 7 pages
        assert report.requests == 1 + 2
        assert s3_server.requests.lists(s3_bucket) - lists == report.requests
    gets = s3_server.requests.chunk_gets(s3_bucket)
    with xr.open_dataset(url, engine="zcache", storage_options=opts, cache_config=cfg) as ds:
        row = ds.v[2].values.tolist()
        assert row[3] == -1.0 and row[:3] == [20.0, 21.0, 22.0]
        assert ds.v[4].values.tolist() == list(range(40, 50))
    if where == "s3":
        assert s3_server.requests.chunk_gets(s3_bucket) - gets == 1


# -- another process on the same folder -----------------------------------------------------------

_CHILD = """
import sys, numpy as np, xarray as xr
from xarray_zcache import CacheConfig, open_store, store_versions
from xarray_zcache.testing.s3server import LocalS3Server
url, endpoint, folder = sys.argv[1:4]
opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
cfg = (CacheConfig().with_name("two").with_memory_size("16MB").with_disk_cache(folder, "64MB")
       .with_prefetch(0).with_validation(600))
kw = dict(engine="zcache", storage_options=opts, cache_config=cfg, chunks=None)
with xr.open_dataset(url, **kw) as ds:
    values = ds.v.values.tolist()
    stats = open_store(url, storage_options=opts, cache_config=cfg).stats()
print(values[8], stats.validation_requests, stats.validations)
"""


def test_two_processes_one_validation(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_options)
    cfg = _cfg(tmp_path, "two", validation=600)
    _read(url, s3_options, cfg)
    _rewrite(url, s3_options, slice(8, 12), -1.0)
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    sync(store.revalidate())  # this process validates...
    close_all()
    lists = s3_server.requests.lists(s3_bucket)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, url, s3_server.endpoint_url, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    ).stdout.split()
    # ...and the other one reads the new data without validating again
    assert out == ["-1.0", "0", "0"]
    assert s3_server.requests.lists(s3_bucket) == lists


# -- versions that are not MD5s, clocks that disagree ---------------------------------------------


def test_multipart_etags_are_versions_too(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    with s3_server.closing_filesystem() as fs:
        big = 6 * 2**20  # two parts of >= 5 MiB / rest

        def put_multipart(path: str, fill: int) -> str:
            with fs.open(path, "wb", block_size=5 * 2**20) as f:
                f.write(bytes([fill]) * big)
            etag = str(fs.info(path, refresh=True)["ETag"])
            assert "-" in etag, etag  # a multipart ETag: no MD5 of the bytes
            return etag

        path = f"{s3_bucket}/raw/blob"
        put_multipart(path, 1)
        store = open_store(
            f"s3://{s3_bucket}/raw", storage_options=s3_options, cache_config=_cfg(tmp_path, "mp")
        )
        buf = sync(store.get("blob", P))
        assert buf is not None and buf.to_bytes()[:1] == b"\x01"
        gets = s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="raw/blob")
        assert sync(store.revalidate()).changed == 0
        put_multipart(path, 2)
        assert sync(store.revalidate()).changed == 1
        buf = sync(store.get("blob", P))
        assert buf is not None and buf.to_bytes()[:1] == b"\x02"
        assert s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="raw/blob") == gets + 1


def test_a_skewed_clock_cannot_make_a_change_look_old(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_options)
    cfg = _cfg(tmp_path, "skew")
    real = time.time
    for skew in (-86400.0, 86400.0):  # the cache host's clock a day behind, then ahead
        monkeypatch.setattr(freshness.time, "time", lambda skew=skew: real() + skew)
        with open_store(url, storage_options=s3_options, cache_config=cfg) as store:
            before = _read(url, s3_options, cfg)
            _rewrite(url, s3_options, slice(0, 4), skew)
            sync(store.revalidate())
            assert _read(url, s3_options, cfg)[:4].tolist() == [skew] * 4, before[:4]
        monkeypatch.undo()


# -- validation that fails -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "stall"])
def test_failed_validation_serves_the_cache_and_tries_again(
    s3_server: LocalS3Server,
    s3_bucket: str,
    tmp_path: Path,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(freshness, "RETRY_AFTER", 0.5)
    monkeypatch.setattr(freshness, "TIMEOUT", 1.0)
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_server.storage_options())
    with faults.FaultProxy(s3_server.endpoint_url) as proxy, faults.few_s3fs_retries(1):
        # (generous client timeouts: only the validation's own TIMEOUT may fire)
        opts = s3_server.storage_options(
            endpoint_url=proxy.url, config_kwargs={"s3": {"addressing_style": "path"}}
        )
        cfg = _cfg(tmp_path, f"fail-{kind}", validation=0.5)
        assert _read(url, opts, cfg).tolist() == list(range(40))
        _rewrite(url, s3_server.storage_options(), slice(0, 4), -1.0)
        time.sleep(0.6)
        proxy.add(faults.Fault(kind, method="GET", query="list-type", stall=3.0))  # type: ignore[arg-type]
        got = _read(url, opts, cfg)  # stale-if-error: the cached data, no exception
        assert got.tolist() == list(range(40))
        stats = open_store(url, storage_options=opts, cache_config=cfg).stats()
        assert stats.validation_errors >= 1
        proxy.clear()
        # tried again once RETRY_AFTER has passed since the failure; under load the failed
        # validation (a stall: up to TIMEOUT) may end later than the sleep above assumed
        deadline = time.monotonic() + 20
        time.sleep(0.6)
        got = _read(url, opts, cfg)
        while got[:4].tolist() != [-1.0] * 4 and time.monotonic() < deadline:
            assert got[:4].tolist() == list(range(4))  # the cached data until then, never mixed
            time.sleep(0.3)
            got = _read(url, opts, cfg)
        assert got[:4].tolist() == [-1.0] * 4


# -- one version per object: a shard rewritten in place ------------------------------------------


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_a_rewritten_shard_is_never_mixed_with_its_old_index(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, compressor: str | None
) -> None:
    url = f"s3://{s3_bucket}/sharded.zarr"
    with s3fs_store(url, s3_options) as plain:  # (another writer: plain zarr)
        root = zarr.open_group(plain, mode="w", zarr_format=3)
        codecs: Any = "auto" if compressor else None
        arr = root.create_array(
            "a", shape=(64,), chunks=(8,), shards=(64,), dtype="i4", compressors=codecs
        )
        arr[:] = np.arange(64)
        cfg = _cfg(tmp_path, f"shard-{compressor}")
        store = open_store(url, storage_options=s3_options, cache_config=cfg)
        cached = zarr.open_array(store, path="a", mode="r")
        assert cached[0:8].tolist() == list(range(8))  # caches the index and inner chunk 0
        arr[:] = np.arange(64) + 100  # another writer rewrites the shard (same metadata)
        got = None
        try:  # noqa: SIM105 (an except* clause)
            got = cached[8:16].tolist()  # a chunk of the new shard, with the old index?
        except* ObjectChanged:
            pass  # detected (zarr raises it in an ExceptionGroup): the old parts were dropped
        assert got in (None, list(range(8, 16)), list(range(108, 116)))
        assert cached[8:16].tolist() == list(range(108, 116))
        assert cached[0:8].tolist() == list(range(100, 108))


# -- local files, the command line ----------------------------------------------------------------


def test_local_files_are_validated_by_their_times(tmp_path: Path) -> None:
    path = str(tmp_path / "local.zarr")
    _write(path, None)
    cfg = _cfg(tmp_path, "local", validation=600)
    store = open_store(path, cache_config=cfg)
    assert _read(path, None, cfg).tolist() == list(range(40))
    _rewrite(path, None, slice(4, 8), 3.5)
    assert _read(path, None, cfg)[4:8].tolist() == [4, 5, 6, 7]
    report = sync(store.revalidate())
    assert report.changed >= 1 and report.requests == 0
    assert _read(path, None, cfg)[4:8].tolist() == [3.5] * 4


def test_a_write_through_zcache_is_validated_again(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_options)
    cfg = _cfg(tmp_path, "written")
    store = open_store(url, storage_options=s3_options, cache_config=cfg, read_only=False)
    sync(store.set("v/c/0", P.buffer.from_bytes(b"x" * 32)))
    # the written bytes carry no version: the next validation re-reads them once
    report = sync(store.revalidate())
    assert report.unverified == 1 and report.changed == 0  # (it did not change at the source)
    buf = sync(store.get("v/c/0", P))
    assert buf is not None and buf.to_bytes() == b"x" * 32


def test_validation_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="validation: invalid interval 'often'"):
        CacheConfig().with_validation("often")
    assert CacheConfig().with_validation("2 minutes").validation == 120
    assert CacheConfig().validation is not None and CacheConfig().validation <= 600


def test_zcache_validate_command(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from xarray_zcache.cli import main

    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_options)
    cfg = _cfg(tmp_path, "cli", validation=600)
    _read(url, s3_options, cfg)
    close_all()
    _rewrite(url, s3_options, slice(0, 4), -2.0)
    opts = [f"endpoint_url={s3_server.endpoint_url}", "key=testing", "secret=testing"]
    argv = ["validate", url, "--cache", str(tmp_path / "cache"), "--json"]
    for opt in opts:
        argv += ["--storage-option", opt]
    capsys.readouterr()
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["changed"] >= 1 and report["arrays"] >= 2
    assert report["requests"] == report["arrays"]
    close_all()
    assert _read(url, s3_options, cfg)[:4].tolist() == [-2.0] * 4
    # without --json: a sentence, and the progress bar on stderr
    assert main([a for a in argv if a != "--json"]) == 0
    out = capsys.readouterr()
    assert "changed at the source" in out.out and "arrays" in out.err
