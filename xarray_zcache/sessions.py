"""Closing the aiohttp sessions of the s3fs filesystems behind zcache's stores.

zarr's `FsspecStore` builds *asynchronous* s3fs filesystems, for which s3fs registers no
finalizer: their aiohttp sessions stay open until collected, and aiohttp then reports
"Unclosed client session". Every inner store a `CachedStore` wraps is tracked here (held
weakly) and the sessions of its s3fs filesystems (its own, or those it reads through: a
chained URL's target, a reference set's targets) closed by `CachedStore.close`, by
`close_sessions` (a Dask worker's teardown, `registry.close_all`) and at interpreter
exit. Best effort: a
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

__all__ = [
    "aclose_filesystem_session",
    "aclose_store_session",
    "close_filesystem_session",
    "close_sessions",
    "close_store_session",
    "track",
]

logger = logging.getLogger("xarray_zcache")

_lock = threading.Lock()
# id -> filesystem (weakly): filesystems compare by their options, so not a WeakSet
_tracked: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
# the filesystems zcache built itself (from a URL): no one else uses them
_owned: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def _filesystems(store: object) -> list[Any]:
    """The s3fs filesystems behind ``store``: its own, and those the filesystem it reads
    through reads through in turn (the target of a chained URL such as
    ``simplecache::s3://...``, the targets of a kerchunk ``reference://`` set, the
    synchronous filesystem zarr wraps in an `AsyncFileSystemWrapper`)."""
    found: list[Any] = []
    seen: set[int] = set()
    todo = [getattr(store, "fs", None)]
    while todo:
        fs = todo.pop()
        if fs is None or id(fs) in seen:
            continue
        seen.add(id(fs))
        if hasattr(type(fs), "close_session"):
            found.append(fs)
            continue
        todo.append(getattr(fs, "sync_fs", None))  # AsyncFileSystemWrapper
        todo.append(getattr(fs, "fs", None))  # CachingFileSystem (simplecache::, ...)
        fss = getattr(fs, "fss", None)  # ReferenceFileSystem: one per target protocol
        if isinstance(fss, dict):
            todo.extend(fss.values())
    return found


def track(store: object, *, owned: bool = False) -> None:
    """Remember the s3fs filesystems of ``store`` (if any) so their sessions are closed.

    ``owned``: zcache built the store from a URL, so `close_store_session` may close them.
    """
    filesystems = _filesystems(store)
    with _lock:
        for fs in filesystems:
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


def _release(store: object) -> list[Any]:
    """``store``'s s3fs filesystems that zcache built, no longer tracked."""
    released = []
    with _lock:
        for fs in _filesystems(store):
            if _owned.get(id(fs)) is fs:
                _owned.pop(id(fs), None)
                _tracked.pop(id(fs), None)
                released.append(fs)
    return released


def close_store_session(store: object) -> None:
    """Close the aiohttp sessions of ``store``'s s3fs filesystems if zcache built them (a
    store the user built may be in use elsewhere: closed at exit)."""
    for fs in _release(store):
        _close(fs)


async def aclose_store_session(store: object) -> None:
    """`close_store_session`, awaited: on the event loop of the session (an asynchronous
    filesystem used from this loop) the session is closed before this returns, where
    `close_store_session` could only schedule its closing."""
    for fs in _release(store):
        await _aclose(fs)


async def _aclose(fs: Any) -> None:
    creator = getattr(fs, "_s3creator", None)
    loop = _session_loop(fs) if getattr(fs, "_s3", None) is not None else None
    if creator is not None and loop is not None and _in_loop(loop):
        try:
            await creator.__aexit__(None, None, None)
        except Exception as exc:
            logger.debug("xarray-zcache: closing an s3fs session failed (%s)", exc)
        fs._s3 = None
        fs._s3creator = None
    else:
        _close(fs)


def close_filesystem_session(fs: object) -> None:
    """Close the aiohttp session of an s3fs filesystem one built and is done with (any
    other filesystem: nothing). A later use opens a new session."""
    if hasattr(type(fs), "close_session"):
        with _lock:
            _tracked.pop(id(fs), None)
            _owned.pop(id(fs), None)
        _close(fs)


async def aclose_filesystem_session(fs: object) -> None:
    """`close_filesystem_session`, awaited (an asynchronous filesystem used from this
    event loop: closed before this returns)."""
    if hasattr(type(fs), "close_session"):
        with _lock:
            _tracked.pop(id(fs), None)
            _owned.pop(id(fs), None)
        await _aclose(fs)


@atexit.register
def close_sessions() -> None:
    """Close the sessions of every tracked filesystem (at exit, on worker teardown)."""
    with _lock:
        filesystems = list(_tracked.values())
        _tracked.clear()
        _owned.clear()
    for fs in filesystems:
        _close(fs)
