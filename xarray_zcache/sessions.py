"""Closing the aiohttp sessions of the s3fs filesystems behind zcache's stores.

zarr's `FsspecStore` builds *asynchronous* s3fs filesystems, for which s3fs registers no
finalizer: their aiohttp sessions stay open until collected, and aiohttp then reports
"Unclosed client session". Every inner store a `CachedStore` wraps is tracked here (held
weakly) and its filesystem's session closed by `CachedStore.close`, by `close_sessions`
(a Dask worker's teardown, `registry.close_all`) and at interpreter exit. Best effort: a
failure is logged at debug level, never raised. A closed filesystem opens a new session
if it is used again.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import weakref
from typing import Any

__all__ = ["close_sessions", "close_store_session", "track"]

logger = logging.getLogger("xarray_zcache")

_lock = threading.Lock()
# id -> filesystem (weakly): filesystems compare by their options, so not a WeakSet
_tracked: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
# the filesystems zcache built itself (from a URL): no one else uses them
_owned: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def _filesystem(store: object) -> Any:
    fs = getattr(store, "fs", None)
    return fs if fs is not None and hasattr(type(fs), "close_session") else None


def track(store: object, *, owned: bool = False) -> None:
    """Remember the s3fs filesystem of ``store`` (if any) so its session is closed.

    ``owned``: zcache built the store from a URL, so `close_store_session` may close it.
    """
    fs = _filesystem(store)
    if fs is not None:
        with _lock:
            _tracked[id(fs)] = fs
            if owned:
                _owned[id(fs)] = fs


def _session_loop(fs: Any) -> asyncio.AbstractEventLoop | None:
    """The event loop the filesystem's aiohttp session was created on (None: unknown)."""
    with contextlib.suppress(AttributeError, TypeError):
        for session in (fs._s3._endpoint.http_session._sessions or {}).values():
            return session._loop  # type: ignore[no-any-return]
    return getattr(fs, "_loop", None)


def _close(fs: Any) -> None:
    creator = getattr(fs, "_s3creator", None)
    if creator is None or getattr(fs, "_s3", None) is None:
        return  # no session was opened
    loop = _session_loop(fs)
    try:
        if loop is not None and loop.is_running() and not _in_loop(loop):
            asyncio.run_coroutine_threadsafe(creator.__aexit__(None, None, None), loop).result(5)
        else:
            # s3fs's own: a task on the running loop, or closes the connector's sockets
            type(fs).close_session(loop, creator)
    except Exception as exc:
        logger.debug("xarray-zcache: closing an s3fs session failed (%s)", exc)
    fs._s3 = None  # a later use opens a new session
    fs._s3creator = None


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def close_store_session(store: object) -> None:
    """Close the aiohttp session of ``store``'s s3fs filesystem if zcache built it (a
    store the user built may be in use elsewhere: closed at exit)."""
    fs = _filesystem(store)
    if fs is None:
        return
    with _lock:
        if _owned.get(id(fs)) is not fs:
            return
        _owned.pop(id(fs), None)
        _tracked.pop(id(fs), None)
    _close(fs)


@atexit.register
def close_sessions() -> None:
    """Close the sessions of every tracked filesystem (at exit, on worker teardown)."""
    with _lock:
        filesystems = list(_tracked.values())
        _tracked.clear()
        _owned.clear()
    for fs in filesystems:
        _close(fs)
