"""Regression tests of the read path's known faults (issue 9), through the public API only.

Each test names its fault number from the issue. The oracle is always the wrapped store:
whatever `CachedStore` answers (bytes, ``None`` or an exception type) must be what the
wrapped store answers at that moment, cached or not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import pathlib
import subprocess
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import uuid4

import dask.base
import numpy as np
import pytest
import xarray as xr
import zarr
from adversary_helpers import GatedStore, S3ServerProcess
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from xarray_zcache import CacheConfig, CachedStore
from xarray_zcache.registry import close_all
from xarray_zcache.sessions import close_filesystem_session
from xarray_zcache.testing.writers import async_s3fs_store

P = default_buffer_prototype()


def B(data: bytes) -> cpu.Buffer:
    return cpu.Buffer.from_bytes(data)


def _config(tmp_path: pathlib.Path, name: str = "cache", memory: int | str = "16MB") -> CacheConfig:
    return CacheConfig().with_memory_size(memory).with_disk_cache(tmp_path / name, "1GB")


async def _answer(store: Store, key: str, byte_range: ByteRequest | None = None) -> object:
    """What ``store.get`` answers: bytes, None, or the exception type's name."""
    try:
        buf = await store.get(key, P, byte_range)
    except Exception as exc:  # the answer *is* the exception
        return f"raises {type(exc).__name__}"
    return None if buf is None else buf.to_bytes()


def _answer_sync(store: Any, key: str, byte_range: ByteRequest | None = None) -> object:
    try:
        buf = store.get_sync(key, prototype=P, byte_range=byte_range)
    except Exception as exc:
        return f"raises {type(exc).__name__}"
    return None if buf is None else buf.to_bytes()


# --------------------------------------------------------------------- (3) single flight


@pytest.mark.parametrize("write", ["delete", "set-without-cache-on-write"])
async def test_3_get_after_write_does_not_join_fetch_started_before_it(
    write: str, tmp_path: pathlib.Path
) -> None:
    """A get issued after a write returned must not be answered by a fetch begun before it."""
    gated = GatedStore(MemoryStore())
    await gated.set("a/c/0", B(b"old"))
    cfg = _config(tmp_path).with_cache_on_write(False)
    store = CachedStore(gated, cfg)

    gated.arm()
    first = asyncio.ensure_future(store.get("a/c/0", P))
    await gated.served.wait()  # get #1 read b"old" and is held in the inner store

    if write == "delete":
        await store.delete("a/c/0")
        expected: bytes | None = None
    else:
        await store.set("a/c/0", B(b"new"))
        expected = b"new"
    assert await _answer(gated, "a/c/0") == expected

    second = asyncio.ensure_future(store.get("a/c/0", P))
    # a correct get #2 sends its own request and completes while get #1 is still held;
    # one that joined get #1 waits for it: give it a bound, then release get #1 anyway
    await asyncio.wait({second}, timeout=5)
    gated.release.set()
    r1, r2 = await asyncio.wait_for(asyncio.gather(first, second), timeout=30)

    assert r1 is not None and r1.to_bytes() == b"old"  # began before the write: may be old
    got2 = None if r2 is None else r2.to_bytes()
    assert got2 == expected, f"get issued after {write} returned {got2!r}, store holds {expected!r}"
    # and the held fetch must not have left the old value in the cache
    assert await _answer(store, "a/c/0") == expected


# ------------------------------------------------------- (5) keys colliding with entries


@pytest.fixture(params=["memory-only", "disk"])
def nul_config(request: Any, tmp_path: pathlib.Path) -> CacheConfig:
    cfg = CacheConfig().with_memory_size("16MB")
    return cfg.without_disk_cache() if request.param == "memory-only" else _config(tmp_path)


async def test_5_key_with_nul_is_not_a_byte_range_of_another_key(
    nul_config: CacheConfig,
) -> None:
    inner = MemoryStore()
    await inner.set("k", B(b"0123456789"))
    store = CachedStore(inner, nul_config)
    await store.set("k\x00r0-4", B(b"EVIL"))  # a real key of its own
    rng = RangeByteRequest(0, 4)
    assert await _answer(store, "k", rng) == await _answer(inner, "k", rng) == b"0123"


async def test_5_byte_range_entry_is_not_served_as_a_key_with_nul(
    nul_config: CacheConfig,
) -> None:
    inner = MemoryStore()
    await inner.set("k", B(b"0123456789"))
    store = CachedStore(inner, nul_config)
    assert await _answer(store, "k", RangeByteRequest(0, 4)) == b"0123"  # a cached range
    assert await _answer(store, "k\x00r0-4") == await _answer(inner, "k\x00r0-4")
    assert not await store.exists("k\x00r0-4")


async def test_5_key_named_like_a_negative_entry_does_not_hide_a_key(
    tmp_path: pathlib.Path,
) -> None:
    """Writing (and reading) ``m\\x00missing`` must not make an existing ``m`` read as missing."""
    inner = MemoryStore()
    cfg = _config(tmp_path, memory=1)  # every value lives on disk only
    store = CachedStore(inner, cfg)
    await store.set("m", B(b"present"))
    await store.set("m\x00missing", B(b""))
    assert await _answer(store, "m\x00missing") == b""
    assert await _answer(store, "m") == b"present"
    close_all()  # flushes the disk tier; the next cache starts from disk only
    store = CachedStore(inner, cfg)
    assert await _answer(store, "m") == await _answer(inner, "m") == b"present"
    assert await store.exists("m")


HOSTILE_KEYS = [
    "b",
    "a/b",
    "a/../b",
    "a/./b",
    "a/b/..",
    "%2e%2e/b",
    "a%2Fb",
    "a%00b",
    "%",
    "\x01list\x01",
    "\x01prefix\x01",
    "x\x01dir\x01y",
    "c\x00o5",
    "c\x00s3",
]


@pytest.mark.parametrize("inner_kind", ["memory", "local"])
async def test_5_hostile_keys_answer_as_the_wrapped_store(
    inner_kind: str, tmp_path: pathlib.Path
) -> None:
    """Set, read, overwrite and delete odd keys; every answer must match the wrapped store's."""
    if inner_kind == "memory":
        inner: Store = MemoryStore()
        keys = HOSTILE_KEYS
    else:
        (tmp_path / "data").mkdir()
        inner = LocalStore(tmp_path / "data")
        keys = [k for k in HOSTILE_KEYS if "\x00" not in k]  # no NUL in file names
    store = CachedStore(inner, _config(tmp_path, memory="4KB"))
    probes: list[tuple[str, ByteRequest | None]] = [
        (k, r) for k in [*keys, "c"] for r in (None, RangeByteRequest(0, 2), SuffixByteRequest(3))
    ]
    await inner.set("c", B(b"0123456789"))

    async def check(step: str) -> None:
        for key, rng in probes:
            want = await _answer(inner, key, rng)
            got = await _answer(store, key, rng)
            assert got == want, (
                f"after {step}: get({key!r}, {rng}) gave {got!r}, store has {want!r}"
            )

    async def write(key: str, value: bytes) -> None:
        with contextlib.suppress(OSError):  # refused by the wrapped store ("a/b/.." over "a/b")
            await store.set(key, B(value))

    for n, key in enumerate(keys):
        await write(key, f"first-{n}".encode())
    await check("first writes")
    await check("first writes (cached)")
    for n, key in reversed(list(enumerate(keys))):
        await write(key, f"second-{n}".encode())
    await check("second writes")
    for key in keys[::2]:
        with contextlib.suppress(OSError):
            await store.delete(key)
    await check("deletes")


# ---------------------------------------------------- (7) delete_dir of an object's name


async def test_7_delete_dir_drops_the_object_named_like_the_prefix(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    # (its session, opened on this test's event loop, closed before the loop ends)
    async with async_s3fs_store(f"s3://{s3_bucket}/data", s3_options) as inner:
        store = CachedStore(inner, _config(tmp_path))
        await store.set("a", B(b"object named a"))
        await store.set("a/b", B(b"object under a/"))
        assert await _answer(store, "a") == b"object named a"  # cached
        await store.delete_dir("a")
        want = await _answer(inner, "a")
        assert want is None, "precondition: FsspecStore.delete_dir('a') deletes 'a' too"
        assert await _answer(store, "a") == want
        assert await store.exists("a") == await inner.exists("a")


# ------------------------------------------------------------------- (8) odd byte ranges

ODD_RANGES = [
    RangeByteRequest(20, 10),
    RangeByteRequest(5, 5),
    OffsetByteRequest(-5),
    SuffixByteRequest(0),
    RangeByteRequest(90, 200),
    OffsetByteRequest(100),
    SuffixByteRequest(200),
]


@pytest.fixture(params=["local", "s3"])
async def odd_inner(request: Any, tmp_path: pathlib.Path) -> AsyncIterator[Store]:
    if request.param == "local":
        (tmp_path / "data").mkdir()
        yield LocalStore(tmp_path / "data")
        return
    bucket = request.getfixturevalue("s3_bucket")
    options = request.getfixturevalue("s3_options")
    # (its session, opened on the test's event loop, closed before the loop ends)
    async with async_s3fs_store(f"s3://{bucket}/data", options) as store:
        yield store


@pytest.mark.parametrize("rng", ODD_RANGES, ids=str)
async def test_8_odd_byte_ranges_answer_as_the_wrapped_store(
    rng: ByteRequest, odd_inner: Store, tmp_path: pathlib.Path
) -> None:
    await odd_inner.set("obj", B(bytes(range(100))))
    want = await _answer(odd_inner, "obj", rng)
    store = CachedStore(odd_inner, _config(tmp_path))
    assert await _answer(store, "obj", rng) == want, "nothing cached"
    assert await _answer(store, "obj", rng) == want, "after the same ranged read"
    assert await _answer(store, "obj") == bytes(range(100))  # now the whole object is cached
    assert await _answer(store, "obj", rng) == want, "whole object cached"
    if hasattr(store, "get_sync"):
        assert _answer_sync(store, "obj", rng) == _answer_sync(odd_inner, "obj", rng), "get_sync"


# ------------------------------------------------------------ (9) two configs, one store


@pytest.mark.parametrize("disks", ["memory-only", "separate-disks", "shared-disk"])
async def test_9_write_through_one_config_is_seen_through_another(
    disks: str, tmp_path: pathlib.Path
) -> None:
    (tmp_path / "data").mkdir()
    base = CacheConfig()
    if disks == "memory-only":
        cfg_a = base.with_memory_size("8MB").without_disk_cache()
        cfg_b = base.with_memory_size("16MB").without_disk_cache()
    elif disks == "separate-disks":
        cfg_a = _config(tmp_path, "cache-a", "8MB")
        cfg_b = _config(tmp_path, "cache-b", "16MB")
    else:
        cfg_a = _config(tmp_path, "cache", "8MB")
        cfg_b = _config(tmp_path, "cache", "16MB")
    assert cfg_a != cfg_b
    a = CachedStore(LocalStore(tmp_path / "data"), cfg_a)
    b = CachedStore(LocalStore(tmp_path / "data"), cfg_b)

    await a.set("x/c/0", B(b"old"))
    assert await _answer(b, "x/c/0") == b"old"  # cached in B
    await a.set("x/c/0", B(b"new"))
    assert await _answer(b, "x/c/0") == b"new"
    await a.delete("x/c/0")
    assert await _answer(b, "x/c/0") is None


# ----------------------------------------------------------------------------- (11) leaks


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_11_many_configs_do_not_leak_threads_or_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "data").mkdir()
    LocalStore(tmp_path / "data").set_sync("a/c/0", B(b"x" * 100))  # type: ignore[attr-defined]

    def one(i: int) -> None:
        store = CachedStore(LocalStore(tmp_path / "data"), _config(tmp_path, f"c{i}", 1000 + i))
        assert sync(store.get("a/c/0", P)) is not None
        store.close()
        del store

    one(-1)  # warm up what any first use creates once (zarr's event loop...)
    gc.collect()
    threads0, fds0 = threading.active_count(), _fds()
    for i in range(40):
        one(i)
    gc.collect()
    threads, fds = threading.active_count(), _fds()
    assert threads - threads0 <= 8, f"40 closed stores left {threads - threads0} more threads"
    # up to registry.MAX_IDLE idle caches stay open, each with two SQLite files (the disk
    # index and the versions book, 3 descriptors each with WAL): 4 x 6, plus slack
    assert fds - fds0 <= 28, f"40 closed stores left {fds - fds0} more open files"


def test_11_a_closed_cache_releases_its_memory(tmp_path: pathlib.Path) -> None:
    """Closing a cache drops what its memory and decoded tiers hold, and the registry lets
    it go: a process that opens and closes caches does not keep their bytes (before, up to
    `MAX_IDLE` closed caches kept their full memory tiers, 4 x 256 MiB by default)."""
    from xarray_zcache.registry import get_cache

    inner = LocalStore(tmp_path / "data")
    arr = zarr.create_array(
        inner, name="a", shape=(64, 64), chunks=(8, 64), dtype="f8", dimension_names=("y", "x")
    )
    arr[:] = np.arange(64 * 64, dtype="f8").reshape(64, 64)
    refs: list[weakref.ref[Any]] = []
    for i in range(6):
        cfg = _config(tmp_path, f"c{i}")
        store = CachedStore(inner, cfg)
        ds = xr.open_dataset(store, engine="zarr", consolidated=False, chunks=None)
        assert float(ds["a"].values.sum()) == float(np.arange(64 * 64).sum())
        cache = get_cache(cfg)
        assert cache.memory_tier.used_bytes() > 0
        ds.close()
        store.close()
        cache.close()
        assert cache.memory_tier.used_bytes() == 0 and cache.decoded_tier.used_bytes() == 0
        refs.append(weakref.ref(cache))
        del ds, store, cache
    gc.collect()
    alive = [i for i, r in enumerate(refs[:-1]) if r() is not None]
    assert not alive, f"closed caches {alive} are still referenced"


def _zcache_and_asyncio_objects() -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        mod = getattr(type(obj), "__module__", "")
        if isinstance(mod, str) and mod.startswith(("xarray_zcache", "asyncio")):
            counts[f"{mod}.{type(obj).__qualname__}"] += 1
    return counts


def test_11_event_loops_are_not_kept_alive(tmp_path: pathlib.Path) -> None:
    inner = LocalStore(tmp_path / "data")
    arr = zarr.create_array(inner, name="a", shape=(80,), chunks=(1,), dtype="i4")
    arr[:] = np.arange(1, 81)  # no chunk holds only the fill value: every chunk is stored
    # a 1-byte memory tier: no read leaves objects in memory, every read misses memory
    store = CachedStore(inner, _config(tmp_path, memory=1))
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def one(i: int) -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        assert await store.get(f"a/c/{i % 20}", P) is not None

    for i in range(10):
        asyncio.run(one(i))
    gc.collect()
    before = _zcache_and_asyncio_objects()
    for i in range(10, 70):
        asyncio.run(one(i))
    gc.collect()
    alive = sum(ref() is not None for ref in loops)
    assert alive <= 2, f"{alive} of 70 finished event loops are still alive"
    grown = {k: n - before[k] for k, n in _zcache_and_asyncio_objects().items() if n - before[k]}
    assert all(n < 20 for n in grown.values()), f"per-loop objects kept by 60 runs: {grown}"


# ------------------------------------------------------------ (10) read-only cache folder


@pytest.fixture
def read_only_folder(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A read-only bind mount of a folder (skips the test where mounting is not permitted)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    (src / "existing").mkdir()
    try:
        subprocess.run(["mount", "--bind", str(src), str(ro)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a bind mount here: {exc}")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(ro)]
        if subprocess.run(remount, capture_output=True).returncode != 0:
            pytest.skip("cannot remount the bind mount read-only here")
        try:
            (ro / "probe").write_bytes(b"x")
        except OSError:
            pass
        else:
            pytest.skip("the read-only bind mount is writable here")
        yield ro
    finally:
        close_all()
        subprocess.run(["umount", str(ro)], check=False, capture_output=True)


@pytest.mark.parametrize("folder", ["mount-root", "missing-subfolder", "existing-subfolder"])
def test_10_read_only_cache_folder_falls_back_to_memory(
    folder: str,
    read_only_folder: pathlib.Path,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = LocalStore(tmp_path / "data")
    ds = xr.Dataset({"v": ("x", np.arange(12.0))}).chunk({"x": 4})
    ds.to_zarr(data, mode="w", consolidated=False)
    where = {
        "mount-root": read_only_folder,
        "missing-subfolder": read_only_folder / "zcache",
        "existing-subfolder": read_only_folder / "existing",
    }[folder]
    cfg = CacheConfig().with_memory_size("16MB").with_disk_cache(where, "1GB")
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = CachedStore(LocalStore(tmp_path / "data", read_only=True), cfg)
        opened = xr.open_zarr(store, consolidated=False)
        np.testing.assert_array_equal(opened["v"].values, np.arange(12.0))
        np.testing.assert_array_equal(opened["v"].values, np.arange(12.0))  # from memory
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    named = [m for m in messages if str(where) in m and "disk_path" in m]
    assert named, f"no warning naming {where} and disk_path; got {messages}"
    # the reason is kept for tools (`zcache warm` names it)
    assert store.cache.disk_tier is None
    assert (store.cache.disk_refused or "").startswith("it cannot be written")


def test_10_warm_refuses_a_read_only_cache_folder(
    read_only_folder: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``zcache warm`` into a read-only folder: exit 1, naming the folder and the reason the
    cache gave when it refused the disk tier (nothing is read into memory only)."""
    from xarray_zcache.cli import main

    data = tmp_path / "data.zarr"
    xr.Dataset({"v": ("x", np.arange(12.0))}).chunk({"x": 4}).to_zarr(data, mode="w")
    where = read_only_folder / "existing"
    code = main(["warm", str(data), "--cache", str(where), "-q"])
    _, err = capsys.readouterr()
    assert code == 1, err
    assert str(where) in err and "it cannot be written" in err and "nothing was warmed" in err


# ----------------------------------------------------------- (6) namespaces and endpoints


@pytest.fixture
def two_s3_servers() -> Iterator[tuple[S3ServerProcess, S3ServerProcess]]:
    first = S3ServerProcess()
    try:
        second = S3ServerProcess()
    except BaseException:
        first.stop()
        raise
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def test_6_same_bucket_on_two_endpoints_from_environment(
    two_s3_servers: tuple[S3ServerProcess, S3ServerProcess],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = f"shared-{uuid4().hex[:8]}"
    cfg = _config(tmp_path)  # one config: one cache and one disk folder for both stores
    stores: list[CachedStore] = []
    inners: list[FsspecStore] = []
    for n, server in enumerate(two_s3_servers):
        import s3fs

        fs = s3fs.S3FileSystem(**server.options())
        fs.mkdir(bucket)
        fs.pipe_file(f"{bucket}/data/g/c/0", f"server {n} bytes".encode())
        close_filesystem_session(fs)  # (not left to the garbage collector)
        # the endpoint comes from the environment only
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
        inner = FsspecStore.from_url(
            f"s3://{bucket}/data", storage_options=server.options(with_endpoint=False)
        )
        # bind the client to this endpoint while the environment names it
        assert sync(inner.get("g/c/0", P)).to_bytes() == f"server {n} bytes".encode()  # type: ignore[union-attr]
        store = CachedStore(inner, cfg)
        assert sync(store.get("g/c/0", P)).to_bytes() == f"server {n} bytes".encode(), (  # type: ignore[union-attr]
            f"store {n} served another endpoint's bytes"
        )
        inners.append(inner)
        stores.append(store)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    for n, store in enumerate(stores):
        assert sync(store.get("g/c/0", P)).to_bytes() == f"server {n} bytes".encode()  # type: ignore[union-attr]
    assert dask.base.tokenize(stores[0]) != dask.base.tokenize(stores[1])


# ------------------------------------------ (10b) a cache folder a newer version has written


def test_10b_folder_of_a_newer_version_is_left_alone_and_reads_go_on(
    s3_server: Any,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two versions of xarray-zcache on one folder (a shared cluster mid-upgrade, a user who
    went back a version): the older one must neither fail the user's read nor touch what
    the newer one holds. It reads memory only, with one warning naming the folder; the
    folder's index is left byte for byte, and once the schema is one it knows again, every
    entry is still there (no request to S3)."""

    from old_index import become_newer, become_ours_again

    from xarray_zcache.testing.writers import write_zarr

    url = f"s3://{s3_bucket}/newer.zarr"
    ds = xr.Dataset({"v": ("x", np.arange(24.0))}).chunk({"x": 6})
    write_zarr(ds, url, s3_options, consolidated=True)
    folder = tmp_path / "cache"

    def chunk_gets() -> int:
        return sum(
            1
            for r in s3_server.requests.records()
            if r.bucket == s3_bucket and r.method == "GET" and "/v/c/" in (r.key or "")
        )

    def read(name: str) -> np.ndarray:
        cfg = CacheConfig().with_name(name).with_disk_cache(folder, "1GB")
        with xr.open_dataset(
            url, engine="zcache", chunks=None, storage_options=s3_options, cache_config=cfg
        ) as opened:
            return opened["v"].values

    np.testing.assert_array_equal(read("first"), np.arange(24.0))
    close_all()  # written to disk and closed
    assert chunk_gets() == 4
    become_newer(folder / "index.db")
    before = (folder / "index.db").read_bytes()

    caplog.set_level(logging.WARNING, logger="xarray_zcache")
    np.testing.assert_array_equal(read("older"), np.arange(24.0))
    assert chunk_gets() == 8  # memory only: read from S3 again
    close_all()
    named = [m for m in caplog.messages if str(folder) in m and "newer" in m]
    assert len(named) == 1 and "disk_path" in named[0], caplog.messages
    assert (folder / "index.db").read_bytes() == before  # not migrated, not rebuilt

    become_ours_again(folder / "index.db")  # the newer one's entries, readable again
    np.testing.assert_array_equal(read("again"), np.arange(24.0))
    assert chunk_gets() == 8  # every chunk from the folder
