"""No aiohttp session left open: zcache's s3fs client, and the s3fs writers.

aiohttp reports a session collected while open as "Unclosed client session" on stderr.
zarr's `FsspecStore` builds *asynchronous* s3fs filesystems, which s3fs never closes
itself; zcache closes the ones behind its stores (`xarray_zcache.sessions`), and the
tests, the benchmarks and the demo write their data through
`xarray_zcache.testing.writers` (``s3fs_store``, ``write_zarr``; the benchmarks'
``common.s3fs_store`` is the same), which close their own. Every session created
during a test is followed to its end here.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from xarray_zcache import CacheConfig, open_store

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("s3fs")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


class Sessions:
    """The aiohttp sessions created while installed: the live ones, and how the others ended."""

    def __init__(self) -> None:
        self.created = 0
        self.live: list[Any] = []  # weak references
        self.collected_open = 0

    def open_now(self) -> int:
        gc.collect()
        return sum(1 for ref in self.live if (s := ref()) is not None and not s.closed)


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sessions]:
    import weakref

    seen = Sessions()
    init, delete = aiohttp.ClientSession.__init__, aiohttp.ClientSession.__del__

    mine: set[int] = set()  # ids of the sessions created while installed

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        seen.created += 1
        seen.live.append(weakref.ref(self))
        mine.add(id(self))

    def counting_del(self: Any, *args: Any, **kwargs: Any) -> None:
        # (a session of an earlier test collected now is not this test's)
        if id(self) in mine and not self.closed:
            seen.collected_open += 1
        delete(self, *args, **kwargs)

    monkeypatch.setattr(aiohttp.ClientSession, "__init__", counting_init)
    monkeypatch.setattr(aiohttp.ClientSession, "__del__", counting_del)
    yield seen


def _dataset() -> xr.Dataset:
    return xr.Dataset(
        {"t": (("z", "y"), np.arange(64.0, dtype="f4").reshape(8, 8))},
        coords={"z": np.arange(8)},
    )


def _write(s3_options: dict[str, Any], bucket: str) -> str:
    """Written through `xarray_zcache.testing.writers` (its session closed). Not through
    s3fs's synchronous filesystem (``to_zarr(fs.get_mapper(...))``): zarr makes an
    asynchronous copy of that filesystem, whose session stayed open to the end."""
    from xarray_zcache.testing.writers import write_zarr

    url = f"s3://{bucket}/x.zarr"
    write_zarr(_dataset(), url, s3_options, zarr_format=3, consolidated=False)
    return url


def test_reading_through_the_s3fs_client_leaves_no_session_open(
    s3_server: Any, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, sessions: Sessions
) -> None:
    url = _write(s3_options, s3_bucket)
    sessions.created, sessions.live = 0, []  # the writer's (closed) is not counted
    gc.collect()
    cfg = CacheConfig(validation=None).with_memory_size("16MB").with_client("s3fs")
    for i, chunks in enumerate((None, {})):
        ds = xr.open_dataset(
            url,
            engine="zcache",
            chunks=chunks,
            storage_options=s3_options,
            cache_config=cfg.with_name(f"sessions-{i}").with_disk_cache(tmp_path / str(i)),
            consolidated=False,
        )
        xr.testing.assert_identical(ds.load(), _dataset())
        ds.close()
        del ds
    store = open_store(
        url,
        storage_options=s3_options,
        cache_config=cfg.with_name("sessions-s").with_disk_cache(tmp_path / "s"),
    )
    assert zarr.open_group(store, mode="r")["t"][:].sum() == _dataset().t.values.sum()
    store.close()
    del store
    assert sessions.created > 0  # s3fs did read (its sessions are aiohttp's)
    assert sessions.open_now() == 0
    assert sessions.collected_open == 0


def test_the_benchmarks_s3fs_writer_closes_its_session(
    s3_bucket: str, s3_options: dict[str, Any], sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, "common", raising=False)
    from common import s3fs_store  # benchmarks/common.py

    url = f"s3://{s3_bucket}/w.zarr"
    with s3fs_store(url, s3_options) as store:
        _dataset().to_zarr(store, mode="w", zarr_format=3, consolidated=False)
    assert sessions.created > 0
    assert sessions.open_now() == 0
    assert sessions.collected_open == 0
    # what it replaces: to_zarr(url, storage_options=...) leaves its session open
    written = _dataset().to_zarr(
        f"s3://{s3_bucket}/v.zarr", storage_options=s3_options, zarr_format=3, mode="w"
    )
    assert sessions.open_now() == 1
    _close_open(sessions)  # (not left to be reported when collected: `written` holds it)
    del written


def _close_open(sessions: Sessions) -> None:
    """Close the sessions still open, each on its own event loop (zarr's I/O thread)."""
    import asyncio

    for ref in sessions.live:
        session = ref()
        if session is not None and not session.closed:
            asyncio.run_coroutine_threadsafe(session.close(), session._loop).result(5)
    assert sessions.open_now() == 0


def test_write_zarr_closes_its_session_writes_regions_and_reads_back(
    s3_bucket: str, s3_options: dict[str, Any], sessions: Sessions
) -> None:
    from xarray_zcache.testing.writers import s3fs_store, write_zarr

    url = f"s3://{s3_bucket}/r.zarr"
    write_zarr(_dataset(), url, s3_options, mode="w", zarr_format=3, consolidated=False)
    part = _dataset().isel(z=slice(2, 3)).drop_vars("z") * 0 - 1
    write_zarr(part, url, s3_options, region={"z": slice(2, 3)}, consolidated=False)
    with (
        s3fs_store(url, s3_options, read_only=True) as store,
        xr.open_dataset(store, engine="zarr", consolidated=False) as back,
    ):
        want = _dataset().t.values.copy()
        want[2] = -1
        np.testing.assert_array_equal(back.t.values, want)
        with pytest.raises(ValueError, match="read-only"):
            store._check_writable()
    assert sessions.created > 0
    assert sessions.open_now() == 0
    assert sessions.collected_open == 0


async def test_async_s3fs_store_closes_its_session_before_the_loop_ends(
    s3_bucket: str, s3_options: dict[str, Any], sessions: Sessions
) -> None:
    """Used on a test's event loop (pytest-asyncio ends it after the test): the session the
    store opened on it is closed, awaited, when the ``async with`` block ends."""
    from zarr.core.buffer import default_buffer_prototype

    from xarray_zcache.testing.writers import async_s3fs_store

    prototype = default_buffer_prototype()
    async with async_s3fs_store(f"s3://{s3_bucket}/a", s3_options) as store:
        await store.set("k", prototype.buffer.from_bytes(b"v"))
        got = await store.get("k", prototype)
        assert got is not None and got.to_bytes() == b"v"
        assert sessions.open_now() == 1
    assert sessions.created == 1
    assert sessions.open_now() == 0
    assert sessions.collected_open == 0


def test_creating_a_bucket_leaves_no_session_open(s3_server: Any, sessions: Sessions) -> None:
    """`LocalS3Server.create_bucket` (the ``s3_bucket`` fixture) closes its filesystem's
    session itself: not left to s3fs's finalizer, which runs only when the garbage collector
    frees the filesystem (and, given 0.1 s on the I/O thread and missing them, leaves the
    session open)."""
    gc.disable()  # (what is open before any collection)
    try:
        s3_server.create_bucket("test-sessions-bucket")
        assert not [s for ref in sessions.live if (s := ref()) is not None and not s.closed]
    finally:
        gc.enable()
    assert sessions.created == 1
    assert sessions.open_now() == 0
    assert sessions.collected_open == 0


#: writers through ``to_zarr(url, storage_options=...)`` left: this file's demonstration
#: of the leak
_LEFT = {"tests/test_sessions.py"}


def test_no_writer_leaves_its_session_open() -> None:
    """No test, benchmark or demo writes with ``to_zarr(url, storage_options=...)``."""
    import ast

    root = Path(__file__).resolve().parent.parent
    found = []
    for folder in ("tests", "benchmarks", "xarray_zcache/demo"):
        for path in sorted((root / folder).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "to_zarr"
                    and any(k.arg == "storage_options" for k in node.keywords)
                    and name not in _LEFT
                ):
                    found.append(f"{name}:{node.lineno}")
    assert found == [], "write through xarray_zcache.testing.writers.write_zarr: " + str(found)


# -- the user's ways in: every session zcache opens is closed by the user's close ------------


def _opened_the_users_way(
    sessions: Sessions, open_: Any, tmp_path: Path, name: str, **kwargs: Any
) -> None:
    """``open_`` (a URL and its options) opened with ``engine="zcache"``, read and closed as
    a user does; then no session is open (before the test's `registry.close_all`)."""
    sessions.created, sessions.live = 0, []
    gc.collect()
    cfg = CacheConfig(validation=None).with_memory_size("16MB").with_client("s3fs")
    ds = xr.open_dataset(
        *open_,
        engine="zcache",
        cache_config=cfg.with_name(name).with_disk_cache(tmp_path / name),
        consolidated=False,
        **kwargs,
    )
    xr.testing.assert_identical(ds.load(), _dataset())
    ds.close()
    del ds
    assert sessions.created > 0
    assert sessions.open_now() == 0
    assert sessions.collected_open == 0


def test_a_chained_url_leaves_no_session_open(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, sessions: Sessions
) -> None:
    """``simplecache::s3://``: the s3fs filesystem fsspec builds under the caching one is
    zcache's too (it was left open to the end of the run)."""
    url = _write(s3_options, s3_bucket)
    opts = {"s3": s3_options, "simplecache": {"cache_storage": str(tmp_path / "simple")}}
    _opened_the_users_way(
        sessions, ["simplecache::" + url], tmp_path, "chain", storage_options=opts
    )


def test_a_reference_set_over_s3_leaves_no_session_open(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, sessions: Sessions
) -> None:
    """``reference://`` with S3 targets: the targets' s3fs filesystem, built by zcache from
    the URL's options, is closed with the dataset (it was collected open)."""
    url = _write(s3_options, s3_bucket)
    keys = ["zarr.json", "t/zarr.json", "t/c/0/0", "z/zarr.json", "z/c/0"]
    refs = {"version": 1, "refs": {k: [f"{url}/{k}"] for k in keys}}
    opts = {"fo": refs, "remote_protocol": "s3", "remote_options": s3_options}
    _opened_the_users_way(
        sessions, ["reference://"], tmp_path, "refs", storage_options=opts, zarr_format=3
    )


def test_a_failed_open_leaves_no_session_open(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, sessions: Sessions
) -> None:
    """An open that raises (no such group) closes the session of the store it built from
    the URL: the user has no dataset to close (it was collected open)."""
    url = _write(s3_options, s3_bucket)
    sessions.created, sessions.live = 0, []
    cfg = CacheConfig(validation=None).with_memory_size("16MB").with_client("s3fs")
    with pytest.raises(Exception, match="nope"):
        xr.open_dataset(
            url,
            engine="zcache",
            group="nope",
            storage_options=s3_options,
            cache_config=cfg.with_name("failed").with_disk_cache(tmp_path / "c"),
            consolidated=False,
        )
    assert sessions.created > 0
    assert sessions.open_now() == 0
    assert sessions.collected_open == 0


def test_zcache_warm_leaves_no_session_open(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, sessions: Sessions
) -> None:
    """``zcache warm`` of an S3 URL read through s3fs closes the session of the store it
    built (with the dataset it reads through)."""
    import dask.config

    from xarray_zcache.cli import main

    url = _write(s3_options, s3_bucket)
    sessions.created, sessions.live = 0, []
    argv = ["warm", url, "--cache", str(tmp_path / "c"), "-q"]
    argv += [f"--storage-option={k}={v}" for k, v in s3_options.items() if k != "config_kwargs"]
    argv += ["--storage-option=config_kwargs.s3.addressing_style=path"]
    with dask.config.set({"zcache.client": "s3fs"}):
        assert main(argv) == 0
    assert sessions.created > 0
    assert sessions.open_now() == 0
    assert sessions.collected_open == 0
