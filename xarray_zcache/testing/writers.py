"""Writing Zarr data through s3fs with no aiohttp session left open.

zarr's `FsspecStore` builds an *asynchronous* s3fs filesystem, which s3fs never closes
itself: its aiohttp session is reported as "Unclosed client session" when it is
collected (at interpreter exit, typically). ``ds.to_zarr(url, storage_options=...)``
builds such a store and drops it. The test suite, the benchmarks and the demo write
through `s3fs_store` (or `write_zarr`) instead, which close the session when done.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import xarray as xr
    from zarr.storage import FsspecStore

__all__ = ["async_s3fs_store", "s3fs_store", "write_zarr"]


@contextlib.contextmanager
def s3fs_store(
    url: str, storage_options: dict[str, Any] | None = None, *, read_only: bool = False
) -> Iterator[FsspecStore]:
    """A zarr `FsspecStore` of ``url`` (writable unless ``read_only``), its aiohttp
    session closed on exit.

    The store is what ``ds.to_zarr(url, storage_options=storage_options)`` (or, read
    only, ``xr.open_zarr(url, storage_options=...)``) would build
    (`FsspecStore.from_url`); a session the filesystem opened is closed when the
    ``with`` block ends (`xarray_zcache.sessions.close_store_session`), even if it
    raised.
    """
    from zarr.storage import FsspecStore

    from xarray_zcache.sessions import close_store_session, track

    store = FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
    track(store, owned=True)  # ours: close_store_session closes it
    try:
        yield store
    finally:
        close_store_session(store)


@contextlib.asynccontextmanager
async def async_s3fs_store(
    url: str, storage_options: dict[str, Any] | None = None, *, read_only: bool = False
) -> AsyncIterator[FsspecStore]:
    """`s3fs_store` for a store used on an event loop that ends with its user (an
    asynchronous test or fixture): the session opened on that loop is closed, awaited,
    before the ``async with`` block ends (`xarray_zcache.sessions.aclose_store_session`);
    once the loop has ended it could no longer be closed."""
    from zarr.storage import FsspecStore

    from xarray_zcache.sessions import aclose_store_session, track

    store = FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
    track(store, owned=True)  # ours: aclose_store_session closes it
    try:
        yield store
    finally:
        await aclose_store_session(store)


def write_zarr(
    ds: xr.Dataset,
    url: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    **to_zarr: Any,
) -> None:
    """``ds.to_zarr(url, storage_options=storage_options, **to_zarr)`` through `s3fs_store`.

    A local path (no ``protocol://``) is written as ``to_zarr`` writes it (zarr's
    `LocalStore`: no session).
    """
    path = os.fspath(url)
    if "://" not in path:
        ds.to_zarr(path, storage_options=storage_options, **to_zarr)
        return
    with s3fs_store(path, storage_options) as store:
        ds.to_zarr(store, **to_zarr)
