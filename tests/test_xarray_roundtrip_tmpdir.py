"""xarray's own zarr backend round trips, each test with its own cache in a
`tempfile.TemporaryDirectory`, the caches never closed.

What a user's test suite does: every test makes a cache folder in a temporary directory
and forgets about the cache. The folders vanish while their caches are still open in the
process, and every later write invalidates those caches too (two configs over one dataset
are two caches). A cache whose folder vanished must go memory only without failing
anyone's write (`xarray_zcache/cache/fallback.py`); before that, 945 of these tests failed
with ``FileNotFoundError: .../index.db``.

This is also the suite of `CachedStore` over a zarr `LocalStore` with every read past a
write served by the disk tier (a memory tier of one byte); it replaced a copy of itself
that closed each cache (session 6: one suite, not two, of 366 tests each). Same outcomes
as over a plain zarr store (see `test_xarray_roundtrip`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from test_xarray_roundtrip import (  # noqa: F401 - fixtures ZarrBase needs
    DESELECTED,
    ZarrBase,
    _skip_if_param,
    default_zarr_format,
    deselect,
    time_unit,
    use_dask,
)

zarr = pytest.importorskip("zarr")

from xarray_zcache import CacheConfig, CachedStore, get_cache  # noqa: E402
from xarray_zcache.registry import close_all  # noqa: E402

#: the cache folders of this module: a lost cache re-creates its (empty) folder
_FOLDERS: list[str] = []


@pytest.fixture(autouse=True)
def _close_caches() -> Iterator[None]:
    """Overrides conftest's: the caches of this module stay open from test to test."""
    yield


@pytest.fixture(scope="module", autouse=True)
def _close_at_the_end() -> Iterator[None]:
    yield
    close_all()
    for folder in _FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@deselect(DESELECTED)
class TestCachedTmpdirRoundtrip(ZarrBase):  # type: ignore[misc]
    """Round trips through a `CachedStore` whose cache folder is a temporary directory."""

    @contextlib.contextmanager
    def create_zarr_target(self) -> Iterator[CachedStore]:
        with (
            tempfile.TemporaryDirectory(prefix="zcache-data-") as data,
            tempfile.TemporaryDirectory(prefix="zcache-disk-") as disk,
        ):
            _FOLDERS.append(disk)
            # reads past a write are served by the disk tier (a memory tier of one byte)
            config = CacheConfig().with_memory_size(1).with_disk_cache(disk, "256MB")
            inner = zarr.storage.LocalStore(os.path.join(data, "test.zarr"), read_only=False)
            try:
                yield CachedStore(inner, config)
            finally:
                # not closed: the folder goes away under the open cache. Flushed, since a
                # background fill racing `rmtree` can make the rmtree itself fail
                # ("Directory not empty"), which is the deleter's race, not this test's
                get_cache(config).flush()
