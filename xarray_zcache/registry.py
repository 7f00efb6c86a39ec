"""The caches of this process: one `HybridCache` per configuration (and per Dask worker).

A `CachedStore` never carries cache contents: it carries a `CacheConfig` and asks
`get_cache` for the cache of the process (or of the Dask worker) it runs in. On a
worker where the zcache worker plugin installed a cache under a name, every store
naming that cache uses it. In-process clusters (``processes=False``) share module
globals, so caches are keyed by worker address too.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.config import CacheConfig

__all__ = [
    "current_worker_address",
    "get_cache",
    "registered_caches",
    "resolve_config",
    "set_worker_cache",
]

_lock = threading.Lock()
# (worker address or None, config) -> cache created on demand
_caches: dict[tuple[str | None, CacheConfig], HybridCache] = {}
# (worker address, cache name) -> cache installed by the worker plugin
_worker_caches: dict[tuple[str, str], HybridCache] = {}


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


def current_worker_address() -> str | None:
    """Address of the Dask worker running the current task, or ``None``."""
    worker_mod: Any = sys.modules.get("distributed.worker")
    if worker_mod is None:  # distributed never imported: not on a worker
        return None
    worker = worker_mod._worker_cvar.get(None)
    return None if worker is None else str(worker.address)


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
    with _lock:
        if address is not None:
            installed = _worker_caches.get((address, cfg.name))
            if installed is not None and not installed.closed:
                return installed
        cache = _caches.get((address, cfg))
        if cache is None or cache.closed:
            cache = HybridCache(cfg)
            cache.start_maintenance()
            _caches[(address, cfg)] = cache
        return cache


def set_worker_cache(address: str, cache: HybridCache | None, name: str | None = None) -> None:
    """Install (or with ``cache=None`` remove) the cache a worker uses for cache ``name``."""
    with _lock:
        if cache is None:
            if name is not None:
                _worker_caches.pop((address, name), None)
            return
        _worker_caches[(address, name or cache.config.name)] = cache


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
