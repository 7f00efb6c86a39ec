"""obstore as the client of s3:// URLs (``zcache.client``): the option mapping, the
fallback to s3fs, and the request counts the local S3 server sees."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from xarray_zcache import CacheConfig, open_store
from xarray_zcache.clients import Unmapped, map_s3_options
from xarray_zcache.identity import identify
from xarray_zcache.testing.s3server import LocalS3Server

pytest.importorskip("obstore")
from zarr.storage import ObjectStore

from xarray_zcache.testing.writers import write_zarr

P = default_buffer_prototype()


@pytest.fixture
def config(tmp_path: Any) -> CacheConfig:
    return CacheConfig(validation=None).with_disk_cache(tmp_path / "cache").with_client("obstore")


@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No AWS settings from the environment or a profile."""
    for name in (
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def _write(url: str, opts: dict[str, Any]) -> xr.Dataset:
    ds = xr.Dataset(
        {"t": (("z", "y"), np.arange(64.0, dtype="f4").reshape(8, 8))},
        coords={"z": np.arange(8)},
    )
    write_zarr(ds, url, opts, zarr_format=3, encoding={"t": {"chunks": (1, 8)}})
    return ds


# -- config ----------------------------------------------------------------------------------


def test_client_setting_is_validated_and_not_part_of_the_cache_identity() -> None:
    with pytest.raises(ValueError, match=r"client: invalid client 'boto'; expected one of "):
        CacheConfig(client="boto")  # type: ignore[arg-type]
    assert CacheConfig().client == "obstore"  # the default (zcache.yaml)
    a, b = CacheConfig().with_client("obstore"), CacheConfig().with_client("s3fs")
    assert (a.client, b.client) == ("obstore", "s3fs")
    assert a == b and hash(a) == hash(b)  # one cache for both clients
    assert CacheConfig.from_dict(a.to_dict()).client == "obstore"


def test_client_from_dask_config_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import dask.config

    with dask.config.set({"zcache.client": "obstore"}):
        assert CacheConfig().client == "obstore"
    with (
        dask.config.set({"zcache.client": "boto"}),
        pytest.raises(ValueError, match=r"'zcache.client'.*client: invalid client 'boto'"),
    ):
        CacheConfig()


# -- mapping ---------------------------------------------------------------------------------


def test_s3fs_options_map_exactly(no_aws_env: None) -> None:
    config, client = map_s3_options(
        {
            "key": "k",
            "secret": "s",
            "token": "t",
            "endpoint_url": "http://127.0.0.1:9000/",
            "client_kwargs": {"region_name": "eu-west-3"},
            "config_kwargs": {"s3": {"addressing_style": "path"}, "max_pool_connections": 64},
            "max_concurrency": 1,
            "skip_instance_cache": True,
            "use_ssl": False,
            "requester_pays": True,
        }
    )
    assert config == {
        "access_key_id": "k",
        "secret_access_key": "s",
        "session_token": "t",
        "endpoint": "http://127.0.0.1:9000",
        "region": "eu-west-3",
        "request_payer": True,
    }
    assert client == {"allow_http": True}
    config, client = map_s3_options(
        {
            "anon": True,
            "key": "ignored",
            "region": "us-west-2",
            "config_kwargs": {"s3": {"addressing_style": "virtual"}},
        }
    )
    assert config == {
        "skip_signature": True,
        "region": "us-west-2",
        "virtual_hosted_style_request": True,
    }
    assert client == {}
    config, _ = map_s3_options({"client_kwargs": {"endpoint_url": "https://minio.example"}})
    assert config == {"endpoint": "https://minio.example"}
    # botocore's user_agent_extra (a header: the same objects are read) -> obstore's user_agent
    _, client = map_s3_options(
        {"anon": True, "region": "x", "config_kwargs": {"user_agent_extra": "job-7"}}
    )
    assert client["user_agent"].endswith(" job-7")


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"anon": True, "version_aware": True}, "version_aware"),
        ({"anon": True, "profile": "p"}, "profile"),
        ({"anon": True, "region": "x", "client_kwargs": {"verify": False}}, "client_kwargs.verify"),
        ({"anon": True, "region": "x", "config_kwargs": {"retries": {}}}, "config_kwargs.retries"),
        (
            {
                "endpoint_url": "http://h:1",
                "config_kwargs": {"s3": {"addressing_style": "virtual"}},
            },
            "config_kwargs.s3.addressing_style",
        ),
        ({"endpoint_url": "http://u:p@h:1"}, "endpoint_url"),
        ({"anon": True}, "region"),  # AWS without a region: botocore follows the bucket's
        ({"anon": True, "region": "x", "use_ssl": False}, "use_ssl"),
    ],
)
def test_what_obstore_cannot_take_is_named(
    no_aws_env: None, options: dict[str, Any], option: str
) -> None:
    with pytest.raises(Unmapped) as info:
        map_s3_options(options)
    assert info.value.option == option


def test_profile_credentials_stay_with_s3fs(
    no_aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "work")
    with pytest.raises(Unmapped) as info:
        map_s3_options({"endpoint_url": "http://h:1"})
    assert info.value.option == "credentials"


def test_the_environment_endpoint_is_passed_on(
    no_aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:7")
    config, client = map_s3_options({"anon": True})
    assert config == {"skip_signature": True, "endpoint": "http://127.0.0.1:7"}
    assert client == {"allow_http": True}


# -- through the local S3 server -------------------------------------------------------------


def test_obstore_reads_the_url_with_the_s3fs_namespace(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    url = f"s3://{s3_bucket}/x.zarr"
    _write(url, s3_options)
    store = open_store(url, storage_options=s3_options, cache_config=config)
    assert isinstance(store.inner, ObjectStore)
    fs_store = FsspecStore.from_url(url, storage_options=s3_options)
    assert store.namespace == identify(fs_store).namespace
    s3fs_store = open_store(
        url, storage_options=s3_options, cache_config=config.with_client("s3fs")
    )
    assert isinstance(s3fs_store.inner, FsspecStore)


def test_obstore_request_counts(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    url = f"s3://{s3_bucket}/x.zarr"
    expected = _write(url, s3_options)
    s3_server.requests.reset()
    ds = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=config
    )
    xr.testing.assert_identical(ds.load(), expected)
    ds.close()
    assert s3_server.requests.chunk_gets(bucket=s3_bucket) == 8 + 1  # t chunks + coordinate z
    assert s3_server.requests.heads(bucket=s3_bucket) == 0
    # a second read: no chunk request at all
    s3_server.requests.reset()
    again = xr.open_dataset(
        url, engine="zcache", chunks={}, storage_options=s3_options, cache_config=config
    )
    xr.testing.assert_identical(again.load(), expected)
    assert s3_server.requests.chunk_gets(bucket=s3_bucket) == 0
    # one whole-chunk read is one GET, a missing key one GET 404, and nothing else
    fresh = open_store(
        url,
        storage_options=s3_options,
        cache_config=config.with_name("other").without_disk_cache(),
    )
    s3_server.requests.reset()
    got = sync(fresh.get("t/c/3/0", P))
    assert got is not None and len(got.to_bytes()) > 0
    records = [r for r in s3_server.requests.records() if r.bucket == s3_bucket]
    assert [(r.method, r.key, r.status, r.range) for r in records] == [
        ("GET", "x.zarr/t/c/3/0", 200, None)
    ]
    s3_server.requests.reset()
    assert sync(fresh.get("t/c/99/0", P)) is None
    records = [r for r in s3_server.requests.records() if r.bucket == s3_bucket]
    assert [(r.method, r.key, r.status) for r in records] == [("GET", "x.zarr/t/c/99/0", 404)]


def test_unmappable_option_falls_back_with_one_info_line(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    config: CacheConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"s3://{s3_bucket}/x.zarr"
    _write(url, s3_options)
    opts = {**s3_options, "version_aware": False}
    with caplog.at_level(logging.DEBUG, logger="xarray_zcache"):
        store = open_store(url, storage_options=opts, cache_config=config)
    assert isinstance(store.inner, FsspecStore)
    lines = [r for r in caplog.records if "obstore" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "'version_aware'" in lines[0].getMessage()
    assert "testing" not in lines[0].getMessage()  # the credentials are never logged
    assert zarr.open_group(store, mode="r")["t"][:].shape == (8, 8)


def test_chains_and_references_stay_on_fsspec(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    config: CacheConfig,
    tmp_path: Any,
) -> None:
    url = f"s3://{s3_bucket}/x.zarr"
    _write(url, s3_options)
    chained = open_store(
        "simplecache::" + url,
        storage_options={"s3": s3_options, "simplecache": {"cache_storage": str(tmp_path / "sc")}},
        cache_config=config,
    )
    assert isinstance(chained.inner, FsspecStore)
    assert zarr.open_group(chained, mode="r")["t"][:].shape == (8, 8)


def test_without_obstore_s3fs_reads_with_one_info_line(
    s3_bucket: str,
    s3_options: dict[str, Any],
    config: CacheConfig,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from xarray_zcache import clients

    monkeypatch.setattr(clients, "available", lambda: False)
    with caplog.at_level(logging.INFO, logger="xarray_zcache"):
        store = open_store(
            f"s3://{s3_bucket}/x.zarr", storage_options=s3_options, cache_config=config
        )
    assert isinstance(store.inner, FsspecStore)
    lines = [r.getMessage() for r in caplog.records if "obstore" in r.getMessage()]
    assert len(lines) == 1 and "not installed" in lines[0]


def test_gs_and_az_urls_through_obstore(config: CacheConfig) -> None:
    gs = open_store("gs://bkt/x.zarr", storage_options={"token": "anon"}, cache_config=config)
    assert isinstance(gs.inner, ObjectStore)
    assert gs.namespace == "gs://bkt/x.zarr"
    az = open_store(
        "az://cont/x.zarr", storage_options={"account_name": "acct"}, cache_config=config
    )
    assert isinstance(az.inner, ObjectStore)
    assert az.namespace == "abfs+https://acct.blob.core.windows.net/cont/x.zarr"


# -- built stores reused ---------------------------------------------------------------------


def _gets(s3_server: LocalS3Server, bucket: str) -> list[tuple[str, str, int]]:
    return [(r.method, r.key, r.status) for r in s3_server.requests.records() if r.bucket == bucket]


def test_the_same_url_and_options_reuse_one_s3store(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], config: CacheConfig
) -> None:
    from obstore.store import S3Store

    from xarray_zcache import clients

    url = f"s3://{s3_bucket}/x.zarr"
    expected = _write(url, s3_options)
    clients.clear_built_stores()
    first = open_store(url, storage_options=s3_options, cache_config=config.with_name("a"))
    again = open_store(url, storage_options=dict(s3_options), cache_config=config.with_name("b"))
    assert isinstance(first.inner, ObjectStore) and isinstance(again.inner, ObjectStore)
    obs = first.inner.store
    assert isinstance(obs, S3Store)
    assert again.inner.store is obs  # one S3Store for the same URL and options
    assert again.inner is not first.inner  # (zarr's ObjectStore around it: one per open)
    assert clients.obstore_store(url, s3_options, True).store is obs  # type: ignore[union-attr]
    assert clients.obstore_store(f"s3a://{s3_bucket}/x.zarr/", s3_options, False).store is obs  # type: ignore[union-attr]

    # other options, credentials, endpoint or prefix: stores of their own
    endpoint = str(s3_options["endpoint_url"])
    others = {
        "region": {**s3_options, "region": "us-west-2"},
        "secret": {**s3_options, "secret": "another-secret"},
        "endpoint": {**s3_options, "endpoint_url": endpoint.replace("127.0.0.1", "localhost")},
    }
    built = {name: clients.obstore_store(url, o, True) for name, o in others.items()}
    built["prefix"] = clients.obstore_store(f"s3://{s3_bucket}/x.zarr/t", s3_options, True)
    stores = [obs] + [b.store for b in built.values()]  # type: ignore[union-attr]
    assert len({id(s) for s in stores}) == len(stores)
    # the credentials are in no key, not even the ones only one store uses
    for key in clients._built:
        assert "another-secret" not in repr(key) and "testing" not in repr(key)

    # each reads the right bytes, with exactly one GET per chunk
    with s3_server.closing_filesystem() as fs:
        want = fs.cat_file(f"{s3_bucket}/x.zarr/t/c/3/0")
    for name, store in [("reused", again.inner), *built.items()]:
        key = "c/3/0" if name == "prefix" else "t/c/3/0"
        s3_server.requests.reset()
        got = sync(store.get(key, P))
        assert got is not None and got.to_bytes() == want, name
        gets = [g for g in _gets(s3_server, s3_bucket) if g[0] == "GET"]
        assert gets == [("GET", "x.zarr/t/c/3/0", 200)], name
    # and through xarray, twice, the request log is what one open always sent
    clients.clear_built_stores()
    counts = []
    for _ in range(2):
        s3_server.requests.reset()
        ds = xr.open_dataset(
            url,
            engine="zcache",
            chunks={},
            storage_options=s3_options,
            cache_config=config.with_name(f"x{len(counts)}").without_disk_cache(),
        )
        xr.testing.assert_identical(ds.load(), expected)
        ds.close()
        counts.append(
            (s3_server.requests.chunk_gets(bucket=s3_bucket), s3_server.requests.heads(s3_bucket))
        )
    assert counts == [(9, 0), (9, 0)]  # two fresh caches: 8 t chunks + coordinate z each


def test_built_stores_are_bounded_thread_safe_and_picklable(
    s3_bucket: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from xarray_zcache import clients

    url = f"s3://{s3_bucket}/x.zarr"
    _write(url, s3_options)
    clients.clear_built_stores()
    with ThreadPoolExecutor(8) as pool:
        opened = list(pool.map(lambda _: clients.obstore_store(url, s3_options, True), range(32)))
    assert len({id(s.store) for s in opened}) == 1  # type: ignore[union-attr]
    # Dask pickles stores to its workers: the same reads on the other side
    copy = pickle.loads(pickle.dumps(opened[0]))
    assert copy == opened[0]
    got, want = sync(copy.get("t/c/1/0", P)), sync(opened[0].get("t/c/1/0", P))
    assert got is not None and want is not None and got.to_bytes() == want.to_bytes()
    # bounded: the least recently used goes first
    monkeypatch.setattr(clients, "MAX_BUILT_STORES", 2)
    a = clients.obstore_store(f"s3://{s3_bucket}/a", s3_options, True)
    b = clients.obstore_store(f"s3://{s3_bucket}/b", s3_options, True)
    assert clients.obstore_store(f"s3://{s3_bucket}/a", s3_options, True).store is a.store  # type: ignore[union-attr]
    clients.obstore_store(f"s3://{s3_bucket}/c", s3_options, True)
    assert len(clients._built) == 2
    assert clients.obstore_store(f"s3://{s3_bucket}/a", s3_options, True).store is a.store  # type: ignore[union-attr]
    assert clients.obstore_store(f"s3://{s3_bucket}/b", s3_options, True).store is not b.store  # type: ignore[union-attr]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_builds_its_own_s3store(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    import os

    from xarray_zcache import clients

    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    url = f"s3://{s3_bucket}/x.zarr"
    _write(url, s3_options)
    parent = clients.obstore_store(url, s3_options, True)
    assert parent is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only build a store (no I/O), say whether it is the parent's
        try:
            os.close(read)
            child = clients.obstore_store(url, s3_options, True)
            again = clients.obstore_store(url, s3_options, True)
            ok = child is not None and again is not None
            answer = b"new" if ok and child.store is not parent.store else b"parent's"
            answer += b" reused" if ok and again.store is child.store else b" rebuilt"  # type: ignore[union-attr]
            os.write(write, answer)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == b"new reused"
    # the parent's is still the parent's
    assert clients.obstore_store(url, s3_options, True).store is parent.store  # type: ignore[union-attr]
