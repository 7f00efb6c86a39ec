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
