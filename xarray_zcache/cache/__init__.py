"""The cache itself: tiers, policies and statistics. Knows nothing about zarr or Dask."""

from xarray_zcache.cache.disk import DiskTier
from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.cache.memory import MemoryTier
from xarray_zcache.cache.stats import CacheStats

__all__ = ["CacheStats", "DiskTier", "HybridCache", "MemoryTier"]
