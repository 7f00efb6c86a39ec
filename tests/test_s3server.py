"""Tests for the embedded request-counting S3 server (xarray_zcache.testing.s3server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore

from xarray_zcache.sessions import aclose_filesystem_session
from xarray_zcache.testing.s3server import (
    LocalS3Server,
    RequestLog,
    RequestRecord,
    start_local_s3,
)
from xarray_zcache.testing.writers import async_s3fs_store

PROTO = default_buffer_prototype()


@pytest.fixture
async def stores() -> AsyncIterator[Callable[..., Awaitable[FsspecStore]]]:
    """``await stores(bucket, options, prefix="arr")``: zarr's ``FsspecStore.from_url`` of
    ``s3://bucket/prefix``, its aiohttp session closed before the test's event loop ends
    (`async_s3fs_store`)."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(bucket: str, options: dict[str, Any], prefix: str = "arr") -> FsspecStore:
            url = f"s3://{bucket}/{prefix}"
            return await stack.enter_async_context(async_s3fs_store(url, options))

        yield make


# -- counting through zarr's FsspecStore ------------------------------------------------------


async def test_zarr_get_of_chunk_costs_exactly_one_get(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    stores: Callable[..., Awaitable[FsspecStore]],
) -> None:
    with s3_server.closing_filesystem() as fs:
        fs.pipe_file(f"{s3_bucket}/arr/c/0/0", b"x" * 1000)
        fs.pipe_file(f"{s3_bucket}/arr/zarr.json", b"{}")
    log = s3_server.requests
    assert log.count("PUT", bucket=s3_bucket, key_prefix="arr/") == 2

    store = await stores(s3_bucket, s3_options)
    buf = await store.get("c/0/0", PROTO)
    assert buf is not None and buf.to_bytes() == b"x" * 1000

    assert log.count("GET", bucket=s3_bucket, key_prefix="arr/c/") == 1
    assert log.count("GET", bucket=s3_bucket, key_suffix="c/0/0", status=200) == 1
    assert log.heads(s3_bucket) == 0
    assert log.lists(s3_bucket) == 0
    assert log.chunk_gets(s3_bucket) == 1

    meta = await store.get("zarr.json", PROTO)
    assert meta is not None
    assert log.chunk_gets(s3_bucket) == 1  # metadata documents are not chunk reads
    assert log.count("GET", bucket=s3_bucket) == 2


async def test_whole_object_read_is_head_free_with_storage_options(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    payload = os.urandom(256 * 1024)
    with s3_server.closing_filesystem() as fs:
        fs.pipe_file(f"{s3_bucket}/blob", payload)
    log = s3_server.requests

    fs = s3_server.filesystem(asynchronous=True)
    try:
        assert fs.max_concurrency == 1
        assert await fs._cat_file(f"{s3_bucket}/blob") == payload
    finally:
        await aclose_filesystem_session(fs)  # (before this test's event loop ends)
    assert log.count("GET", bucket=s3_bucket, key_prefix="blob") == 1
    assert log.count("HEAD", bucket=s3_bucket) == 0


async def test_default_s3fs_options_send_head_before_get(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    stores: Callable[..., Awaitable[FsspecStore]],
) -> None:
    """Pins the s3fs behaviour that storage_options() works around."""
    with s3_server.closing_filesystem() as fs:
        fs.pipe_file(f"{s3_bucket}/arr/c/0", b"abc")
    opts = {k: v for k, v in s3_options.items() if k != "max_concurrency"}
    store = await stores(s3_bucket, opts)
    assert store.fs.max_concurrency > 1
    buf = await store.get("c/0", PROTO)
    assert buf is not None and buf.to_bytes() == b"abc"
    assert s3_server.requests.count("HEAD", bucket=s3_bucket, key_prefix="arr/c/0") == 1
    assert s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="arr/c/0") == 1


async def test_missing_key_costs(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    stores: Callable[..., Awaitable[FsspecStore]],
) -> None:
    log = s3_server.requests
    store = await stores(s3_bucket, s3_options)

    assert await store.get("c/9/9", PROTO) is None
    assert log.count(bucket=s3_bucket, key_prefix="arr/c/9/9") == 1
    assert log.count("GET", bucket=s3_bucket, key_prefix="arr/c/9/9", status=404) == 1
    assert log.heads(s3_bucket) == 0
    assert log.lists(s3_bucket) == 0
    assert log.chunk_gets(s3_bucket) == 1  # a 404 GET is still a round trip

    # Without max_concurrency=1 a missing key costs a HEAD (404) plus a LIST probe.
    opts = {k: v for k, v in s3_options.items() if k != "max_concurrency"}
    assert await (await stores(s3_bucket, opts)).get("c/8/8", PROTO) is None
    assert log.count("HEAD", bucket=s3_bucket, key_prefix="arr/c/8/8", status=404) == 1
    assert log.count("GET", bucket=s3_bucket, key_prefix="arr/c/8/8") == 0
    assert log.lists(s3_bucket) == 1

    # exists() always goes through HEAD (+ LIST when missing), whatever the options.
    assert await store.exists("c/7/7") is False
    assert log.count("HEAD", bucket=s3_bucket, key_prefix="arr/c/7/7") == 1
    assert log.lists(s3_bucket) == 2


async def test_ranged_read_records_range_header(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    stores: Callable[..., Awaitable[FsspecStore]],
) -> None:
    with s3_server.closing_filesystem() as fs:
        fs.pipe_file(f"{s3_bucket}/arr/shard", bytes(range(100)))
    store = await stores(s3_bucket, s3_options)
    buf = await store.get("shard", PROTO, RangeByteRequest(10, 20))
    assert buf is not None and buf.to_bytes() == bytes(range(10, 20))
    (rec,) = [
        r for r in s3_server.requests.records() if r.bucket == s3_bucket and r.method == "GET"
    ]
    assert rec.key == "arr/shard"
    assert rec.range == "bytes=10-19"
    assert rec.status == 206


def test_keys_are_recorded_unquoted(s3_server: LocalS3Server, s3_bucket: str) -> None:
    key = "dir with space/ü+%x/c.0"
    with s3_server.closing_filesystem() as fs:
        fs.pipe_file(f"{s3_bucket}/{key}", b"1")
        assert fs.cat_file(f"{s3_bucket}/{key}") == b"1"
    keys = {r.key for r in s3_server.requests.records() if r.bucket == s3_bucket}
    assert key in keys
    assert s3_server.requests.count("GET", bucket=s3_bucket, key_prefix="dir with space/") == 1


def test_bucket_level_requests_have_no_key(s3_server: LocalS3Server, s3_bucket: str) -> None:
    with s3_server.closing_filesystem() as fs:
        fs.pipe_file(f"{s3_bucket}/a/b", b"1")
        assert fs.ls(f"{s3_bucket}/a") == [f"{s3_bucket}/a/b"]
    creates = [
        r
        for r in s3_server.requests.records()
        if r.bucket == s3_bucket and r.method == "PUT" and r.key is None
    ]
    assert len(creates) == 1
    assert s3_server.requests.lists(s3_bucket) == 1


# -- latency --------------------------------------------------------------------------------


def test_latency_delays_each_request() -> None:
    latency = 0.3
    with start_local_s3(latency=latency) as server, server.closing_filesystem() as fs:
        assert server.latency == latency
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError):
            fs.cat_file("no-such-bucket-latency/key")
        elapsed = time.perf_counter() - start
        assert server.requests.count() >= 1
        assert elapsed >= 0.9 * latency * server.requests.count()

        server.latency = 0.0  # settable at runtime; only the log is checked here
        server.requests.reset()
        with pytest.raises(FileNotFoundError):
            fs.cat_file("no-such-bucket-latency/key")
        assert server.requests.count() == 1


async def test_latency_overlaps_for_concurrent_requests(s3_bucket: str) -> None:
    latency = 0.5
    n = 4
    # moto state is process-global, so s3_bucket (created via the session server) exists here too.
    with start_local_s3(latency=latency) as server:
        fs = server.filesystem(asynchronous=True)
        await fs.set_session()
        start = time.perf_counter()
        try:
            results = await asyncio.gather(
                *(fs._cat_file(f"{s3_bucket}/missing-{i}") for i in range(n)),
                return_exceptions=True,
            )
        finally:
            await aclose_filesystem_session(fs)  # (before this test's event loop ends)
        elapsed = time.perf_counter() - start
        assert all(isinstance(r, FileNotFoundError) for r in results)
        assert server.requests.count("GET", bucket=s3_bucket) == n
        assert elapsed >= 0.9 * latency  # (a lower bound: the sleep happened)
        # concurrent requests sleep at once (a threaded server), as against real S3: seen
        # by the server itself, not by a wall-clock threshold a loaded machine can miss
        assert server.most_delayed >= 2


# -- lifecycle and options ------------------------------------------------------------------


def test_storage_options_do_not_touch_environment(s3_server: LocalS3Server) -> None:
    before = dict(os.environ)
    opts = s3_server.storage_options(use_listings_cache=False, max_concurrency=2)
    assert dict(os.environ) == before
    assert opts["endpoint_url"] == s3_server.endpoint_url
    assert opts["key"] == "testing" and opts["secret"] == "testing"
    assert opts["max_concurrency"] == 2  # extras override defaults
    assert opts["use_listings_cache"] is False
    assert "region_name" not in opts.get("client_kwargs", {})
    assert s3_server.storage_options()["max_concurrency"] == 1


def test_start_stop_context_manager() -> None:
    server = LocalS3Server()
    assert not server.running
    with pytest.raises(RuntimeError):
        _ = server.endpoint_url
    with server as s:
        assert s is server and s.running
        assert s.endpoint_url.startswith("http://127.0.0.1:")
        assert s.start() is s  # idempotent
    assert not server.running
    server.stop()  # idempotent
    with pytest.raises(ValueError):
        LocalS3Server(latency=-1)


def test_request_log_filters() -> None:
    log = RequestLog()
    recs = [
        RequestRecord("GET", "b", "arr/zarr.json", "", 200, None),
        RequestRecord("GET", "b", "arr/c/0/0", "", 200, None),
        RequestRecord("GET", "b", "arr/.zarray", "", 200, None),
        RequestRecord("GET", "b2", "x/c/1", "", 404, "bytes=0-9"),
        RequestRecord("HEAD", "b", "arr/c/0/0", "", 200, None),
        RequestRecord("GET", "b", None, "list-type=2&prefix=arr%2F", 200, None),
        RequestRecord("GET", "b", None, "location", 200, None),
        RequestRecord("GET", None, None, "", 200, None),
        RequestRecord("PUT", "b", None, "", 200, None),
    ]
    for r in recs:
        log.add(r)
    assert len(log) == len(recs)
    assert log.count() == len(recs)
    assert log.count("get") == 7
    assert log.count("GET", bucket="b") == 5
    assert log.count(key_prefix="arr/") == 4
    assert log.count("GET", key_suffix="0/0") == 1
    assert log.count(status=404) == 1
    assert log.chunk_gets() == 2
    assert log.chunk_gets("b") == 1
    assert log.heads() == 1
    assert log.lists() == 1
    assert log.lists("b2") == 0
    snapshot = log.records()
    log.reset()
    assert log.count() == 0 and len(snapshot) == len(recs)
