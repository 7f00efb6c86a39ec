"""xarray-zcache: a transparent, persistent, cluster-aware cache for Zarr on object storage.

Names are loaded on first use, so ``import xarray_zcache.cache`` (the zarr- and
Dask-free cache) does not load zarr, xarray or Dask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xarray_zcache.backend import open_store
    from xarray_zcache.cache.stats import CacheStats
    from xarray_zcache.config import CacheConfig
    from xarray_zcache.registry import get_cache
    from xarray_zcache.store import CachedStore

__all__ = ["CacheConfig", "CacheStats", "CachedStore", "get_cache", "open_store"]
__version__ = "0.1.0"

_WHERE = {
    "CacheConfig": "xarray_zcache.config",
    "CacheStats": "xarray_zcache.cache.stats",
    "CachedStore": "xarray_zcache.store",
    "get_cache": "xarray_zcache.registry",
    "open_store": "xarray_zcache.backend",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'xarray_zcache' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
