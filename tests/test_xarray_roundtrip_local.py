"""xarray's own zarr backend round trips through a `CachedStore` over a `LocalStore`.

The same suite as `test_xarray_roundtrip` (see there), in its own module so that the
two halves run in parallel under ``pytest -n`` (`make test`).
"""

from __future__ import annotations

import contextlib
import os
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


@pytest.mark.slow
@deselect(DESELECTED)
class TestCachedLocalStoreRoundtrip(ZarrBase):  # type: ignore[misc]
    """Round trips through a `CachedStore` over a `LocalStore`, reads served from disk."""

    @contextlib.contextmanager
    def create_zarr_target(self) -> Iterator[CachedStore]:
        with (
            tempfile.TemporaryDirectory(prefix="zcache-data-") as data,
            tempfile.TemporaryDirectory(prefix="zcache-disk-") as disk,
        ):
            # a memory tier too small to hold anything: every read past a write is served
            # by the disk tier, which is what this class is here to exercise
            config = CacheConfig().with_memory_size(1).with_disk_cache(disk, "256MB")
            # like xarray's TestZarrDirectoryStore: a path that does not exist yet
            inner = zarr.storage.LocalStore(os.path.join(data, "test.zarr"), read_only=False)
            try:
                yield CachedStore(inner, config)
            finally:
                # stop the background disk writer before its folder goes away
                get_cache(config).close()
