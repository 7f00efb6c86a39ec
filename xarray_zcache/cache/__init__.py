"""The cache itself: tiers, policies and statistics. Knows nothing about zarr or Dask.

It maps ``str`` keys to ``bytes``, takes a plain `CacheSettings`, and importing it
loads none of zarr, xarray, dask or distributed (a test checks).
"""

from xarray_zcache.cache.disk import DiskTier
from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.cache.memory import MemoryTier
from xarray_zcache.cache.request import Read
from xarray_zcache.cache.settings import CacheSettings
from xarray_zcache.cache.stats import CacheStats

__all__ = ["CacheSettings", "CacheStats", "DiskTier", "HybridCache", "MemoryTier", "Read"]
