"""The caches of this process: one `HybridCache` per configuration (and per Dask worker).

A `CachedStore` never carries cache contents: it carries a `CacheConfig` and binds,
at its first call, to the cache of the process (or of the Dask worker) it runs in.
On a worker where the zcache worker plugin installed a cache under a name, every
store naming that cache uses it. In-process clusters (``processes=False``) share
module globals, so plugin caches are keyed by worker address.

Caches no store uses any more ("idle") are closed once more than `MAX_IDLE` of
them pile up, oldest first, so a process that opens many configurations keeps
a bounded number of threads and file descriptors.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.config import CacheConfig

__all__ = [
    "MAX_IDLE",
    "bind_cache",
    "current_worker_address",
    "get_cache",
    "on_dask_worker",
    "registered_caches",
    "release_cache",
    "resolve_config",
    "set_worker_cache",
    "stores_of",
]

MAX_IDLE = 4

_lock = threading.Lock()
# config -> cache created on demand (insertion order: oldest first)
_caches: dict[CacheConfig, HybridCache] = {}
# (worker address, cache name) -> cache installed by the worker plugin
_worker_caches: dict[tuple[str, str], HybridCache] = {}
# the stores bound to each cache (weakly): a cache with none is idle
_users: weakref.WeakKeyDictionary[HybridCache, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


_inherited: list[Any] = []  # a forked child's references to its parent's caches


def _after_fork_in_child() -> None:
    """A forked child starts with no caches: the parent's hold SQLite connections (which must
    not cross fork()), descriptors and threads (which do not exist in the child). Only the
    references are dropped: closing would act on what the parent still uses."""
    global _lock, _caches, _worker_caches, _users
    # kept referenced, never collected here: collecting them would close the parent's
    # SQLite connections from the child
    _inherited.append((_caches, _worker_caches, _users))
    _lock = threading.Lock()
    _caches = {}
    _worker_caches = {}
    _users = weakref.WeakKeyDictionary()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def resolve_config(config: CacheConfig | str | None) -> CacheConfig:
    """Turn ``None`` (defaults), a configured cache name, or a `CacheConfig` into a config."""
    if config is None:
        return CacheConfig()
    if isinstance(config, CacheConfig):
        return config
    if isinstance(config, str):
        return CacheConfig.from_dask_config(config)
    raise TypeError(
        f"cache_config: expected a CacheConfig, the name of a configured cache (str) or None, "
        f"got {type(config).__name__}"
    )


def _worker() -> Any:
    """The Dask worker running the current task (public `get_worker`), or ``None``."""
    if "distributed.worker" not in sys.modules:  # never imported: not on a worker
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def on_dask_worker() -> bool:
    """Whether the caller runs inside a task on a Dask worker."""
    return _worker() is not None


def current_worker_address() -> str | None:
    """Address of the Dask worker running the current task, when the zcache plugin runs there.

    Only workers with the zcache plugin have a cache of their own; elsewhere stores
    use the process's cache, and this costs nothing.
    """
    if not _worker_caches:
        return None
    worker = _worker()
    return None if worker is None else str(worker.address)


def _process_cache(cfg: CacheConfig) -> HybridCache:
    with _lock:
        cache = _caches.get(cfg)
        if cache is not None and not cache.closed:
            return cache
        cache = HybridCache(cfg)
        cache.start_maintenance()
        _caches[cfg] = cache
        for k in [k for k, c in _caches.items() if c.closed]:  # closed by their user
            del _caches[k]
        idle = [c for c in _caches.values() if c is not cache and not _users.get(c)]
    for old in idle[: max(0, len(idle) - MAX_IDLE)]:
        _forget(old)
    return cache


def _forget(cache: HybridCache) -> None:
    with _lock:
        for k in [k for k, c in _caches.items() if c is cache]:
            del _caches[k]
    cache.close()


def get_cache(config: CacheConfig | str | None = None) -> HybridCache:
    """The cache of this process (or of the current Dask worker) for ``config``.

    Created on first use; the same object is returned for equal configs.

    Parameters
    ----------
    config
        A `CacheConfig`, the name of a cache configured under ``zcache.caches``,
        or ``None`` for the defaults from dask config.
    """
    cfg = resolve_config(config)
    address = current_worker_address()
    if address is not None:
        installed = _worker_caches.get((address, cfg.name))
        if installed is not None and not installed.closed:
            return installed
    return _process_cache(cfg)


#: the cache every store uses in this context, whatever the thread: a worker serving a
#: peer's ask (outside any task, so `current_worker_address` cannot tell the worker)
SERVING_CACHE: contextvars.ContextVar[HybridCache | None] = contextvars.ContextVar(
    "zcache_serving_cache", default=None
)


def bind_cache(
    store: Any, config: CacheConfig, bindings: dict[str | None, HybridCache]
) -> HybridCache:
    """The cache ``store`` uses here, remembered in ``bindings`` (per worker address)."""
    serving = SERVING_CACHE.get()
    if serving is not None:
        return serving
    address = current_worker_address()
    cache = bindings.get(address)
    if cache is None or cache.closed or cache not in _users:  # (not in _users: a forked child)
        cache = get_cache(config)
        bindings[address] = cache
        with _lock:
            users = _users.get(cache)
            if users is None:
                users = _users[cache] = weakref.WeakSet()
            users.add(store)
    return cache


def release_cache(store: Any, cache: HybridCache) -> None:
    """``store`` no longer uses ``cache`` (it was closed)."""
    with _lock:
        users = _users.get(cache)
        if users is not None:
            users.discard(store)
        idle = [c for c in _caches.values() if not _users.get(c)]
    for old in idle[: max(0, len(idle) - MAX_IDLE)]:
        _forget(old)


def stores_of(cache: HybridCache) -> Iterator[Any]:
    """The live stores bound to ``cache``."""
    with _lock:
        users = list(_users.get(cache) or ())
    yield from users


def set_worker_cache(address: str, cache: HybridCache | None, name: str | None = None) -> None:
    """Install (or with ``cache=None`` remove) the cache a worker uses for cache ``name``."""
    with _lock:
        if cache is None:
            if name is not None:
                _worker_caches.pop((address, name), None)
            return
        _worker_caches[(address, name or cache.settings.name)] = cache


def registered_caches() -> list[HybridCache]:
    """Every live cache of this process."""
    with _lock:
        return [c for c in (*_caches.values(), *_worker_caches.values()) if not c.closed]


def close_all() -> None:
    """Close and forget every cache of this process (tests, interpreter shutdown)."""
    with _lock:
        caches = [*_caches.values(), *_worker_caches.values()]
        _caches.clear()
        _worker_caches.clear()
    for c in caches:
        c.close()
    from xarray_zcache.sessions import close_sessions

    close_sessions()
