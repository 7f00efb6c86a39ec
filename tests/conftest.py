"""Shared pytest fixtures: an embedded, request-counting local S3 server."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import pytest

from xarray_zcache.testing.s3server import LocalS3Server

# No test uses the user's own cache folder (~/.cache/xarray-zcache, the default disk tier):
# a test that forgets `with_disk_cache(tmp_path)` gets a folder of this session instead.
_HOME_CACHE = tempfile.mkdtemp(prefix="zcache-tests-cache-home-")
os.environ["XDG_CACHE_HOME"] = _HOME_CACHE
atexit.register(shutil.rmtree, _HOME_CACHE, True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3Server]:
    """A moto S3 server started once per test session (no injected latency).

    Its request log is shared by all tests: filter counts by bucket (each test
    gets its own bucket from ``s3_bucket``) rather than resetting the log.
    """
    server = LocalS3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: LocalS3Server) -> str:
    """A freshly created, uniquely named, empty bucket on ``s3_server``."""
    name = f"test-{uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def s3_options(s3_server: LocalS3Server) -> dict[str, Any]:
    """s3fs storage options for ``s3_server`` (one whole-object read = one GET)."""
    return s3_server.storage_options()


@pytest.fixture
def s3_fs(s3_server: LocalS3Server) -> Iterator[Any]:
    """A synchronous s3fs filesystem of ``s3_server``, its aiohttp session closed when the
    test ends (`LocalS3Server.closing_filesystem`)."""
    with s3_server.closing_filesystem() as fs:
        yield fs


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the chunks zarr's codec pipelines decode (zarr's reads and the decoded
    tier's misses; the decoded-tier tests)."""
    from zarr.core.codec_pipeline import BatchedCodecPipeline

    counter = {"chunks": 0}
    original = BatchedCodecPipeline.decode

    async def counting(self: Any, items: Any) -> Any:
        items = list(items)
        counter["chunks"] += len(items)
        return await original(self, items)

    monkeypatch.setattr(BatchedCodecPipeline, "decode", counting)
    return counter


@pytest.fixture(autouse=True)
def _close_caches() -> Iterator[None]:
    """Close every cache a test created (threads, SQLite handles), so tests stay independent."""
    yield
    from xarray_zcache.registry import close_all

    close_all()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Close the aiohttp sessions tests left open (s3fs filesystems zarr's `FsspecStore`
    built in tests, which nothing closes), so that none is reported as "Unclosed client
    session" at interpreter exit. The package closes its own (`xarray_zcache.sessions`,
    tested in `test_sessions.py`); this only tidies what tests made directly."""
    import asyncio
    import contextlib
    import gc

    try:
        import aiohttp
    except ImportError:  # pragma: no cover - s3fs brings it
        return
    for obj in gc.get_objects():
        if not isinstance(obj, aiohttp.ClientSession) or obj.closed:
            continue
        loop = getattr(obj, "_loop", None)
        with contextlib.suppress(Exception):
            if loop is None or loop.is_closed():
                continue
            if loop.is_running():  # fsspec's I/O thread
                asyncio.run_coroutine_threadsafe(obj.close(), loop).result(timeout=5)
            else:
                loop.run_until_complete(obj.close())
