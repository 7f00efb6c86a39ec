"""xarray-zcache: a transparent, persistent, cluster-aware cache for Zarr on object storage."""

from xarray_zcache.cache.stats import CacheStats
from xarray_zcache.config import CacheConfig
from xarray_zcache.registry import get_cache
from xarray_zcache.store import CachedStore

__all__ = ["CacheConfig", "CacheStats", "CachedStore", "get_cache", "open_store"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name == "open_store":
        from xarray_zcache.backend import open_store

        return open_store
    raise AttributeError(f"module 'xarray_zcache' has no attribute {name!r}")
