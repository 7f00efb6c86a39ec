"""Every store keyed by what it holds (issue 17): kerchunk references, VirtualiZarr
manifests, obstore endpoints, Icechunk sessions, private stores.

Each scenario of the issue's table failed on the code before `identity.py`: it returned
*other data* silently, or re-read everything, or raised. Request counts are the S3
server's own log.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore, ObjectStore

from xarray_zcache import CacheConfig, CachedStore
from xarray_zcache.identity import identify
from xarray_zcache.sessions import close_filesystem_session
from xarray_zcache.testing.s3server import LocalS3Server

obstore = pytest.importorskip("obstore")
from obstore.store import LocalStore as ObsLocalStore  # noqa: E402
from obstore.store import MemoryStore as ObsMemoryStore  # noqa: E402
from obstore.store import S3Store  # noqa: E402

KEY = {"key": "testing", "secret": "testing"}


def _disk_keys(store: CachedStore) -> list[str]:
    """Every key in the disk tier's index (the SQLite row is the authority)."""
    import sqlite3

    store.cache.flush()
    disk = store.cache.disk_tier
    assert disk is not None
    with sqlite3.connect(os.path.join(disk.path, "index.db")) as conn:
        return [k for (k,) in conn.execute("SELECT key FROM entries")]


def _config(path: Path, *, validation: float | None = 300) -> CacheConfig:
    cfg = CacheConfig().with_memory_size("64MB").with_disk_cache(path, "256MB")
    return cfg.with_validation(validation) if validation is not None else cfg


def _netcdf(path: Path, base: float) -> None:
    ds = xr.Dataset({"t": (("x",), np.arange(base, base + 10, dtype="f4"))})
    ds.to_netcdf(path, engine="h5netcdf")


def _put(s3_server: LocalS3Server, local: str, key: str) -> None:
    """Upload ``local`` to ``key`` (``bucket/path``), the filesystem's session closed after."""
    with s3_server.closing_filesystem() as fs:
        fs.put_file(local, key)


def _refs(url: str, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    from kerchunk.hdf import SingleHdf5ToZarr

    fs, path = fsspec.core.url_to_fs(url, **(opts or {}))
    try:
        with fs.open(path) as f:
            return dict(SingleHdf5ToZarr(f, url, inline_threshold=0).translate())
    finally:
        close_filesystem_session(fs)  # (s3fs: its session; any other: nothing)


def _ref_store(refs: dict[str, Any], opts: dict[str, Any] | None) -> FsspecStore:
    so: dict[str, Any] = {"fo": refs}
    if opts is not None:
        so.update(remote_protocol="s3", remote_options={**opts, "asynchronous": True})
    return FsspecStore.from_url("reference://", storage_options=so, read_only=True)


def _values(store: Any) -> list[float]:
    ds = xr.open_dataset(store, engine="zarr", consolidated=False, zarr_format=2)
    return ds.t.values.tolist()  # type: ignore[no-any-return]


@pytest.fixture
def nc_on_s3(s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path) -> dict[str, Any]:
    urls = {}
    for name, base in (("a", 0.0), ("b", 100.0)):
        _netcdf(tmp_path / f"{name}.nc", base)
        _put(s3_server, str(tmp_path / f"{name}.nc"), f"{s3_bucket}/nc/{name}.nc")
        urls[name] = f"s3://{s3_bucket}/nc/{name}.nc"
    opts = s3_server.storage_options()
    return {"refs": {n: _refs(u, opts) for n, u in urls.items()}, "opts": opts}


# -- kerchunk -----------------------------------------------------------------------------------


def test_two_reference_sets_into_two_files_never_mix(
    nc_on_s3: dict[str, Any], s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "cache")
    refs, opts = nc_on_s3["refs"], nc_on_s3["opts"]
    a = CachedStore(_ref_store(refs["a"], opts), cfg)
    b = CachedStore(_ref_store(refs["b"], opts), cfg)
    assert a.namespace != b.namespace
    assert _values(a) == list(range(10))
    assert _values(b) == [100.0 + i for i in range(10)]  # was a's values, 0 requests
    # two caches on one folder: a second config object naming the same folder
    other = CachedStore(_ref_store(refs["b"], opts), _config(tmp_path / "cache"))
    assert _values(other) == [100.0 + i for i in range(10)]


def test_reference_sets_into_one_file_share_bytes(
    nc_on_s3: dict[str, Any], s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "cache")
    refs, opts = nc_on_s3["refs"], nc_on_s3["opts"]
    copy = json.loads(json.dumps(refs["a"]))
    copy["refs"][".zattrs"] = json.dumps({"title": "another reference set"})
    s3_server.requests.reset()
    assert _values(CachedStore(_ref_store(refs["a"], opts), cfg)) == list(range(10))
    first = s3_server.requests.count("GET", bucket=s3_bucket)
    assert first == 1  # the one chunk, a byte range of a.nc
    assert _values(CachedStore(_ref_store(copy, opts), cfg)) == list(range(10))
    assert s3_server.requests.count("GET", bucket=s3_bucket) == first  # shared: 0 more


def test_reference_url_through_the_backend(
    nc_on_s3: dict[str, Any], s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "cache")
    refs, opts = nc_on_s3["refs"], nc_on_s3["opts"]
    got = {}
    for name in ("a", "b"):
        so = {"fo": refs[name], "remote_protocol": "s3", "remote_options": opts}
        with xr.open_dataset(
            "reference://", engine="zcache", storage_options=so, cache_config=cfg,
            consolidated=False, zarr_format=2,
        ) as ds:  # fmt: skip
            got[name] = ds.t.values.tolist()
    assert got["a"] == list(range(10)) and got["b"] == [100.0 + i for i in range(10)]


_REOPEN = textwrap.dedent(
    """
    import json, sys
    import xarray as xr
    from zarr.storage import FsspecStore
    from xarray_zcache import CacheConfig, CachedStore
    refs, opts, cache = json.loads(sys.stdin.read())
    so = {"fo": refs, "remote_protocol": "s3", "remote_options": {**opts, "asynchronous": True}}
    inner = FsspecStore.from_url("reference://", storage_options=so, read_only=True)
    store = CachedStore(inner, CacheConfig().with_disk_cache(cache, "256MB"))
    ds = xr.open_dataset(store, engine="zarr", consolidated=False, zarr_format=2)
    print(json.dumps(ds.t.values.tolist()))
    store.cache.flush()
    """
)


def _in_new_process(script: str, payload: object) -> Any:
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reference_sets_in_new_processes(
    nc_on_s3: dict[str, Any], s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    refs, opts = nc_on_s3["refs"], nc_on_s3["opts"]
    cache = str(tmp_path / "cache")
    s3_server.requests.reset()
    assert _in_new_process(_REOPEN, [refs["a"], opts, cache]) == list(range(10))
    assert s3_server.requests.count("GET", bucket=s3_bucket) == 1
    # another process, another file, the same folder: its own values
    b = _in_new_process(_REOPEN, [refs["b"], opts, cache])
    assert b == [100.0 + i for i in range(10)]
    assert s3_server.requests.count("GET", bucket=s3_bucket) == 2
    # the same reference set re-opened in a new process: 0 requests
    s3_server.requests.reset()
    assert _in_new_process(_REOPEN, [refs["a"], opts, cache]) == list(range(10))
    assert len(s3_server.requests.records()) == 0


def test_a_rewritten_target_file_is_seen_after_the_interval(
    nc_on_s3: dict[str, Any], s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    refs, opts = nc_on_s3["refs"], nc_on_s3["opts"]
    store = CachedStore(_ref_store(refs["a"], opts), _config(tmp_path / "cache", validation=1))
    assert _values(store) == list(range(10))
    # another writer rewrites a.nc in place with the same layout, other values
    _netcdf(tmp_path / "a2.nc", 50.0)
    _put(s3_server, str(tmp_path / "a2.nc"), f"{s3_bucket}/nc/a.nc")
    s3_server.requests.reset()
    report = sync(store.revalidate())
    assert report.changed >= 1 and report.requests == 1  # one listing for the one target
    assert s3_server.requests.lists(bucket=s3_bucket) == 1
    assert _values(store) == [50.0 + i for i in range(10)]
    assert s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="nc/") == 1


def test_local_reference_targets(tmp_path: Path) -> None:
    _netcdf(tmp_path / "a.nc", 0.0)
    _netcdf(tmp_path / "b.nc", 7.0)
    cfg = _config(tmp_path / "cache")
    a = CachedStore(_ref_store(_refs(str(tmp_path / "a.nc")), None), cfg)
    b = CachedStore(_ref_store(_refs(str(tmp_path / "b.nc")), None), cfg)
    assert _values(a) == list(range(10))
    assert _values(b) == [7.0 + i for i in range(10)]
    targets = {t.namespace for t in [*a._targets.values(), *b._targets.values()]}
    assert len(targets) == 1 and next(iter(targets)).startswith("file://")


# -- VirtualiZarr ---------------------------------------------------------------------------------


def _manifest_store(path: Path, registry_url: str, obs: Any) -> Any:
    from obspec_utils.registry import ObjectStoreRegistry
    from virtualizarr.parsers import HDFParser

    registry = ObjectStoreRegistry({registry_url: obs})
    return HDFParser()(url=f"{registry_url.rstrip('/')}/{path.name}", registry=registry)


def _s3_obs(
    server: LocalS3Server, bucket: str, *, endpoint: str | None = None, prefix: str | None = None
) -> Any:
    return S3Store(
        bucket,
        prefix=prefix,
        endpoint=endpoint or server.endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
        region="us-east-1",
        client_options={"allow_http": True},
    )


def test_manifest_store_reopened_sends_nothing(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    _netcdf(tmp_path / "a.nc", 3.0)
    _put(s3_server, str(tmp_path / "a.nc"), f"{s3_bucket}/a.nc")
    cfg = _config(tmp_path / "cache")
    url = f"s3://{s3_bucket}/"
    first = CachedStore(_manifest_store(tmp_path / "a.nc", url, _s3_obs(s3_server, s3_bucket)), cfg)
    assert "0x" not in first.namespace
    ds = xr.open_dataset(first, engine="zarr", consolidated=False, zarr_format=3)
    assert ds.t.values.tolist() == [3.0 + i for i in range(10)]
    first.cache.flush()
    # the same file parsed again (a new ManifestStore, a new registry): nothing re-read
    again = _manifest_store(tmp_path / "a.nc", url, _s3_obs(s3_server, s3_bucket))
    s3_server.requests.reset()
    store = CachedStore(again, cfg)
    assert store.namespace == first.namespace
    ds = xr.open_dataset(store, engine="zarr", consolidated=False, zarr_format=3)
    assert ds.t.values.tolist() == [3.0 + i for i in range(10)]
    assert s3_server.requests.count("GET", bucket=s3_bucket) == 0


# -- obstore --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_s3() -> Iterator[str]:
    """Another S3 service in another process (moto's state is per process): its own data."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from moto.server import ThreadedMotoServer; import time; "
        f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}); s.start(); "
        "print('up', flush=True); time.sleep(3600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) and line.strip() != "up":
            pass
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def _write_array(store: Any, values: np.ndarray) -> None:
    arr = zarr.create_array(store, name="v", shape=values.shape, chunks=(5,), dtype="f8")
    arr[:] = values


def test_two_obstore_endpoints_with_the_same_bucket_never_mix(
    s3_server: LocalS3Server, second_s3: str, tmp_path: Path
) -> None:
    bucket = "same-name-both-places"
    for endpoint in (s3_server.endpoint_url, second_s3):
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, **KEY, skip_instance_cache=True)
        fs.mkdir(bucket)
        close_filesystem_session(fs)
    a_obs = _s3_obs(s3_server, bucket)
    b_obs = _s3_obs(s3_server, bucket, endpoint=second_s3)
    _write_array(ObjectStore(a_obs), np.arange(10.0))
    _write_array(ObjectStore(b_obs), np.arange(10.0) + 1000)
    cfg = _config(tmp_path / "cache")
    a = CachedStore(ObjectStore(a_obs, read_only=True), cfg)
    b = CachedStore(ObjectStore(b_obs, read_only=True), cfg)
    assert a.namespace != b.namespace
    assert zarr.open_array(a, path="v", mode="r")[:].tolist() == list(range(10))
    assert zarr.open_array(b, path="v", mode="r")[:].tolist() == [1000.0 + i for i in range(10)]


def test_obstore_and_s3fs_over_the_same_objects_share_a_namespace(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    fs_store = FsspecStore.from_url(f"s3://{s3_bucket}/data", storage_options=s3_options)
    obs = S3Store(
        s3_bucket,
        prefix="data",
        endpoint=s3_server.endpoint_url,
        access_key_id="x",
        secret_access_key="y",
        region="us-east-1",
    )
    assert identify(fs_store).namespace == identify(ObjectStore(obs)).namespace


def test_obstore_validation_sees_another_writer(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    obs = _s3_obs(s3_server, s3_bucket)
    _write_array(ObjectStore(obs), np.arange(20.0))
    store = CachedStore(ObjectStore(obs, read_only=True), _config(tmp_path / "cache", validation=1))
    assert zarr.open_array(store, path="v", mode="r")[:].tolist() == list(range(20))
    # another writer rewrites one chunk
    zarr.open_array(ObjectStore(obs), path="v", mode="r+")[5:10] = -1
    report = sync(store.revalidate())
    assert report.changed == 1
    assert report.requests == s3_server.requests.lists(bucket=s3_bucket)
    s3_server.requests.reset()
    got = zarr.open_array(store, path="v", mode="r")[:].tolist()
    assert got == [*range(5), *[-1.0] * 5, *range(10, 20)]
    assert s3_server.requests.chunk_gets(bucket=s3_bucket) == 1  # only the changed chunk
    # the interval runs out: the next read validates by itself, listings counted exactly
    zarr.open_array(ObjectStore(obs), path="v", mode="r+")[0:5] = 7
    time.sleep(1.2)
    s3_server.requests.reset()
    before = store.stats().validation_requests
    got = zarr.open_array(store, path="v", mode="r")[:].tolist()
    assert got[:5] == [7.0] * 5
    assert store.stats().validation_requests - before == s3_server.requests.lists(bucket=s3_bucket)


def test_private_stores_never_reach_the_disk(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "cache")
    for inner in (ObjectStore(ObsMemoryStore()), MemoryStore()):
        store = CachedStore(inner, cfg)
        assert store.identity.private and "0x" not in store.namespace
        _write_array(store, np.arange(10.0))
        assert zarr.open_array(store, path="v", mode="r")[:].tolist() == list(range(10))
        assert not [k for k in _disk_keys(store) if k.startswith(store.namespace)]


def test_a_named_private_store_persists(tmp_path: Path) -> None:
    store = CachedStore(
        ObjectStore(ObsMemoryStore()), _config(tmp_path / "cache"), namespace="mine"
    )
    assert not store.identity.private
    _write_array(store, np.arange(10.0))
    zarr.open_array(store, path="v", mode="r")[:]
    assert any(k.startswith("mine/") for k in _disk_keys(store))


def test_obstore_local_store_is_named_like_zarr_local_store(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    a = identify(ObjectStore(ObsLocalStore(str(tmp_path / "d"))))
    b = identify(LocalStore(tmp_path / "d"))
    assert a.namespace == b.namespace


def test_a_folder_replaced_by_another_is_other_data(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    before = identify(LocalStore(tmp_path / "d")).namespace
    os.rename(tmp_path / "d", tmp_path / "old")
    (tmp_path / "d").mkdir()
    assert identify(LocalStore(tmp_path / "d")).namespace != before


# -- Icechunk -------------------------------------------------------------------------------------

icechunk = pytest.importorskip("icechunk")


@pytest.fixture
def repo(s3_server: LocalS3Server, s3_bucket: str) -> Any:
    storage = icechunk.s3_storage(
        bucket=s3_bucket,
        prefix="repo",
        endpoint_url=s3_server.endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
        region="us-east-1",
        allow_http=True,
        force_path_style=True,
    )
    return icechunk.Repository.create(storage)


def _random(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def test_writable_sessions_never_see_each_others_writes(repo: Any, tmp_path: Path) -> None:
    base = repo.writable_session("main")
    zarr.create_array(base.store, name="v", shape=(40,), chunks=(10,), dtype="f8")[:] = 0.0
    base.commit("base")
    cfg = _config(tmp_path / "cache")
    one = CachedStore(repo.writable_session("main").store, cfg)
    two = CachedStore(repo.writable_session("main").store, cfg)
    assert one.identity.private and two.identity.private and one.namespace != two.namespace
    assert zarr.open_array(two, path="v", mode="r")[:].tolist() == [0.0] * 40
    zarr.open_array(one, path="v", mode="r+")[:10] = 5.0
    assert zarr.open_array(one, path="v", mode="r")[:10].tolist() == [5.0] * 10
    assert zarr.open_array(two, path="v", mode="r")[:].tolist() == [0.0] * 40
    assert not [k for k in _disk_keys(one) if k.startswith("private:")]


def test_readonly_sessions_commits_and_time_travel(
    repo: Any, s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    session = repo.writable_session("main")
    first = _random(10_000, 1)  # 100 chunks of 800 bytes (above Icechunk's inline threshold)
    zarr.create_array(session.store, name="v", shape=(10_000,), chunks=(100,), dtype="f8")[:] = (
        first
    )
    snap1 = session.commit("one")
    cfg = _config(tmp_path / "cache")
    ro1 = CachedStore(repo.readonly_session(snapshot_id=snap1).store, cfg)
    assert ro1.identity.freshness == "immutable" and snap1 in ro1.namespace
    assert "testing" not in ro1.namespace  # never credentials
    s3_server.requests.reset()
    np.testing.assert_array_equal(zarr.open_array(ro1, path="v", mode="r")[:], first)
    assert s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="repo/chunks/") == 100
    s3_server.requests.reset()
    np.testing.assert_array_equal(zarr.open_array(ro1, path="v", mode="r")[:], first)
    assert s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="repo/chunks/") == 0
    # a commit changing 1% of the chunks (1 of 100)
    session = repo.writable_session("main")
    second = first.copy()
    second[:100] = _random(100, 2)
    zarr.open_array(session.store, path="v", mode="r+")[:100] = second[:100]
    snap2 = session.commit("two")
    s3_server.requests.reset()
    ro2 = CachedStore(repo.readonly_session(branch="main").store, cfg)
    np.testing.assert_array_equal(zarr.open_array(ro2, path="v", mode="r")[:], second)
    # a new snapshot is other data for the cache: every chunk is read again (see
    # docs/stores.md: Icechunk sessions do not expose chunk identity)
    resent = s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="repo/chunks/")
    assert resent == 100
    # time travel: the old snapshot is still served, from the cache, right
    s3_server.requests.reset()
    old = CachedStore(repo.readonly_session(snapshot_id=snap1).store, cfg)
    np.testing.assert_array_equal(zarr.open_array(old, path="v", mode="r")[:], first)
    assert s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="repo/chunks/") == 0
    assert snap2 != snap1
    report = sync(old.revalidate())
    assert report.units == 0 and "never changes" in report.note


# -- the rule, for every kind -------------------------------------------------------------------


def test_no_namespace_holds_an_address_or_credentials(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path, nc_on_s3: dict[str, Any]
) -> None:
    (tmp_path / "d").mkdir()
    secret = "SECRETVALUE123"
    stores = [
        ObjectStore(ObsMemoryStore()),
        ObjectStore(
            S3Store("b", endpoint="http://u:pw@h:1", access_key_id=secret, secret_access_key=secret)
        ),
        ObjectStore(ObsLocalStore(str(tmp_path / "d"))),
        MemoryStore(),
        LocalStore(tmp_path / "d"),
        FsspecStore.from_url(
            f"s3://{s3_bucket}/x", storage_options={**s3_server.storage_options(), "secret": secret}
        ),
        _ref_store(nc_on_s3["refs"]["a"], nc_on_s3["opts"]),
    ]
    for store in stores:
        ns = CachedStore(store, _config(tmp_path / "cache")).namespace
        assert not re.search(r"0x[0-9a-f]{6,}", ns), ns
        assert secret not in ns and "pw@" not in ns, ns


class _Custom(zarr.abc.store.Store):  # type: ignore[misc]
    """A user's own store: the cache cannot know what it holds."""

    def __init__(self) -> None:
        super().__init__(read_only=True)

    def __eq__(self, other: object) -> bool:
        return self is other

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return None

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        return []

    async def exists(self, key: str) -> bool:
        return False

    supports_writes = False
    supports_deletes = False
    supports_listing = False
    supports_partial_writes = False

    async def set(self, key: str, value: Any) -> None:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        raise NotImplementedError

    def list(self) -> Any:
        raise NotImplementedError

    def list_prefix(self, prefix: str) -> Any:
        raise NotImplementedError

    def list_dir(self, prefix: str) -> Any:
        raise NotImplementedError


def test_a_custom_store_is_private_and_says_how_to_name_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="xarray_zcache.store"):
        ident = identify(_Custom())
    assert ident.private
    assert 'namespace="..."' in caplog.text


# -- property: equal namespaces if and only if the same objects --------------------------------


_ENDPOINTS = ("http://127.0.0.1:1", "http://127.0.0.1:2")


def _described(kind: str, endpoint: int, bucket: str, path: str, root: Path) -> tuple[Any, Any]:
    """A store of ``kind`` and what it reads (``None``: data private to the object)."""
    if kind == "fsspec-s3":
        opts = {"endpoint_url": _ENDPOINTS[endpoint], **KEY, "skip_instance_cache": True}
        store = FsspecStore.from_url(f"s3://{bucket}/{path}", storage_options=opts)
        return store, ("s3", endpoint, bucket, path)
    if kind == "obstore-s3":
        obs = S3Store(bucket, prefix=path, endpoint=_ENDPOINTS[endpoint], skip_signature=True)
        return ObjectStore(obs), ("s3", endpoint, bucket, path)
    folder = root / bucket / path
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "local":
        return LocalStore(folder), ("file", bucket, path)
    if kind == "obstore-local":
        return ObjectStore(ObsLocalStore(str(folder))), ("file", bucket, path)
    if kind == "fsspec-local":
        return FsspecStore.from_url(f"file://{folder}"), ("file", bucket, path)
    return (MemoryStore() if kind == "memory" else ObjectStore(ObsMemoryStore())), None


_KINDS = ("fsspec-s3", "obstore-s3", "local", "obstore-local", "fsspec-local", "memory", "obs-mem")
_store = st.tuples(
    st.sampled_from(_KINDS),
    st.integers(0, 1),
    st.sampled_from(["b1", "b2"]),
    st.sampled_from(["p", "q", "p/q"]),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(one=_store, two=_store)
def test_equal_namespaces_if_and_only_if_the_same_objects(
    one: tuple[str, int, str, str], two: tuple[str, int, str, str], tmp_path: Path
) -> None:
    a, what_a = _described(*one, root=tmp_path)
    b, what_b = _described(*two, root=tmp_path)
    same = what_a is not None and what_a == what_b
    assert (identify(a).namespace == identify(b).namespace) == same, (one, two)


_ICECHUNK_READ = textwrap.dedent(
    """
    import json, sys
    import icechunk, zarr
    from xarray_zcache import CacheConfig, CachedStore
    storage_kw, snap, cache = json.loads(sys.stdin.read())
    repo = icechunk.Repository.open(icechunk.s3_storage(**storage_kw))
    store = CachedStore(
        repo.readonly_session(snapshot_id=snap).store,
        CacheConfig().with_disk_cache(cache, "256MB"),
    )
    print(json.dumps(float(zarr.open_array(store, path="v", mode="r")[:].sum())))
    store.cache.flush()
    """
)


def test_icechunk_snapshot_in_a_fresh_process_sends_no_chunk_requests(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    storage_kw = {
        "bucket": s3_bucket,
        "prefix": "repo",
        "endpoint_url": s3_server.endpoint_url,
        "access_key_id": "testing",
        "secret_access_key": "testing",
        "region": "us-east-1",
        "allow_http": True,
        "force_path_style": True,
    }
    repo = icechunk.Repository.create(icechunk.s3_storage(**storage_kw))
    session = repo.writable_session("main")
    values = _random(2_000, 3)
    zarr.create_array(session.store, name="v", shape=(2_000,), chunks=(100,), dtype="f8")[:] = (
        values
    )
    snap = session.commit("one")
    payload = [storage_kw, snap, str(tmp_path / "cache")]
    s3_server.requests.reset()
    assert _in_new_process(_ICECHUNK_READ, payload) == pytest.approx(values.sum())
    assert s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="repo/chunks/") == 20
    s3_server.requests.reset()
    assert _in_new_process(_ICECHUNK_READ, payload) == pytest.approx(values.sum())
    assert s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="repo/chunks/") == 0


def test_the_backend_opens_the_stores_users_hold(
    s3_server: LocalS3Server, s3_bucket: str, repo: Any, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "cache")
    obs = _s3_obs(s3_server, s3_bucket, prefix="plain.zarr")
    xr.Dataset({"t": (("x",), np.arange(6.0))}).to_zarr(
        ObjectStore(obs), mode="w", consolidated=False
    )
    ds = xr.open_dataset(
        ObjectStore(obs, read_only=True), engine="zcache", cache_config=cfg, consolidated=False
    )
    assert ds.t.values.tolist() == list(range(6))
    session = repo.writable_session("main")
    xr.Dataset({"t": (("x",), np.arange(4.0) + 9)}).to_zarr(
        session.store, mode="w", consolidated=False
    )
    snap = session.commit("one")
    ro = repo.readonly_session(snapshot_id=snap)
    ds = xr.open_dataset(ro.store, engine="zcache", cache_config=cfg, consolidated=False)
    assert ds.t.values.tolist() == [9.0, 10.0, 11.0, 12.0]


# -- references answer exactly as the reference store itself -------------------------------------


@pytest.fixture
def ref_kinds(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> Iterator[tuple[Any, Any]]:
    """A reference set with a ranged reference, a whole-file reference, inline data and a
    missing key, into files on S3 and on disk; and the bare reference store."""
    payload = bytes(range(256)) * 4
    with s3_server.closing_filesystem() as fs:
        fs.pipe_file(f"{s3_bucket}/raw.bin", payload)
    refs = {
        "version": 1,
        "refs": {
            "ranged": [f"s3://{s3_bucket}/raw.bin", 100, 300],
            "whole": [f"s3://{s3_bucket}/raw.bin"],
            "inline": "base64:" + __import__("base64").b64encode(payload[:50]).decode(),
            "text": "plain inline text",
        },
    }
    opts = s3_server.storage_options()

    def build() -> FsspecStore:
        return _ref_store(refs, opts)

    bare = build()
    yield bare, CachedStore(build(), _config(tmp_path / "cache"))
    for fs in bare.fs.fss.values():  # (the bare store's own: no one closes it)
        close_filesystem_session(fs)


_ranges = st.one_of(
    st.none(),
    st.tuples(st.integers(0, 1100), st.integers(1, 1100)).map(
        lambda t: zarr.abc.store.RangeByteRequest(min(t), max(t) + 1)
    ),
    st.integers(0, 1100).map(zarr.abc.store.OffsetByteRequest),
    st.integers(1, 1100).map(zarr.abc.store.SuffixByteRequest),
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=st.sampled_from(["ranged", "whole", "inline", "text", "missing"]),
    byte_range=_ranges,
    twice=st.booleans(),
)
def test_referenced_reads_answer_the_referenced_bytes(
    ref_kinds: tuple[Any, Any], key: str, byte_range: Any, twice: bool
) -> None:
    from zarr.core.buffer import default_buffer_prototype

    bare, cached = ref_kinds
    proto = default_buffer_prototype()

    async def both() -> tuple[Any, Any]:
        try:
            want = await bare.get(key, proto, byte_range)
        except Exception as exc:
            want = type(exc)
        for _ in range(2 if twice else 1):  # (the second from the cache)
            try:
                got = await cached.get(key, proto, byte_range)
            except Exception as exc:
                got = type(exc)
        return want, got

    want, got = sync(both())
    # the model: the referenced object's bytes, sliced as Python slices them
    payload = bytes(range(256)) * 4
    obj = {
        "ranged": payload[100:400],
        "whole": payload,
        "inline": payload[:50],
        "text": b"plain inline text",
    }.get(key)
    if obj is None:
        assert got is None and want is None
        return
    if byte_range is None:
        model = obj
    elif hasattr(byte_range, "end"):
        model = obj[byte_range.start : byte_range.end]
    elif hasattr(byte_range, "offset"):
        model = obj[byte_range.offset :]
    else:
        model = obj[-byte_range.suffix :]
    assert got is not None and not isinstance(got, type), (want, got)
    assert got.to_bytes() == model
    if model and not isinstance(want, type) and want is not None:
        assert want.to_bytes() == model  # (fsspec answers an empty range with the whole file)


def test_manifest_store_sees_a_rewritten_target(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    _netcdf(tmp_path / "a.nc", 3.0)
    _put(s3_server, str(tmp_path / "a.nc"), f"{s3_bucket}/a.nc")
    url = f"s3://{s3_bucket}/"
    cfg = _config(tmp_path / "cache", validation=1)
    store = CachedStore(_manifest_store(tmp_path / "a.nc", url, _s3_obs(s3_server, s3_bucket)), cfg)
    ds = xr.open_dataset(store, engine="zarr", consolidated=False, zarr_format=3)
    assert ds.t.values.tolist() == [3.0 + i for i in range(10)]
    _netcdf(tmp_path / "a.nc", 40.0)  # same layout, other values
    _put(s3_server, str(tmp_path / "a.nc"), f"{s3_bucket}/a.nc")
    s3_server.requests.reset()
    report = sync(store.revalidate())
    assert report.changed == 1 and report.requests == s3_server.requests.lists(bucket=s3_bucket)
    ds = xr.open_dataset(store, engine="zarr", consolidated=False, zarr_format=3)
    assert ds.t.values.tolist() == [40.0 + i for i in range(10)]


_MANIFEST_READ = textwrap.dedent(
    """
    import json, sys
    import xarray as xr
    from obspec_utils.registry import ObjectStoreRegistry
    from obstore.store import S3Store
    from virtualizarr.parsers import HDFParser
    from xarray_zcache import CacheConfig, CachedStore
    endpoint, bucket, cache = json.loads(sys.stdin.read())
    obs = S3Store(bucket, endpoint=endpoint, access_key_id="testing",
                  secret_access_key="testing", region="us-east-1",
                  client_options={"allow_http": True})
    registry = ObjectStoreRegistry({f"s3://{bucket}/": obs})
    manifest = HDFParser()(url=f"s3://{bucket}/a.nc", registry=registry)
    store = CachedStore(manifest, CacheConfig().with_disk_cache(cache, "256MB"))
    ds = xr.open_dataset(store, engine="zarr", consolidated=False, zarr_format=3)
    print(json.dumps(ds.t.values.tolist()))
    store.cache.flush()
    """
)


def test_manifest_store_in_a_new_process_sends_no_chunk_requests(
    s3_server: LocalS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    _netcdf(tmp_path / "a.nc", 5.0)
    _put(s3_server, str(tmp_path / "a.nc"), f"{s3_bucket}/a.nc")
    payload = [s3_server.endpoint_url, s3_bucket, str(tmp_path / "cache")]
    counts = []
    for _ in range(2):
        s3_server.requests.reset()
        assert _in_new_process(_MANIFEST_READ, payload) == [5.0 + i for i in range(10)]
        counts.append(s3_server.requests.count("GET", bucket=s3_bucket))
    # each new process parses the file again (VirtualiZarr reads its HDF5 metadata: the
    # parser's requests, the same each time); the chunk itself is read once, by the first
    assert counts[0] - counts[1] == 1, counts
