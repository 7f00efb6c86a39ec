"""The settings a `HybridCache` runs with: a plain dataclass, no dask config behind it.

`xarray_zcache.config.CacheConfig` (which reads dask config) converts to this with
`CacheSettings.of`; the cache itself never imports dask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from xarray_zcache.cache.disk.schema import INDEX_CACHE_BYTES

__all__ = ["DECODED_FRACTION", "CacheSettings"]

#: the decoded tier's default size: this fraction of the memory tier
DECODED_FRACTION = 0.5


@dataclasses.dataclass(frozen=True, slots=True)
class CacheSettings:
    """What one cache needs to know; validated by whoever builds it (`CacheConfig`).

    Sizes are bytes, durations seconds; ``None`` TTLs mean "forever".
    """

    name: str = "default"
    memory_size: int = 256 * 2**20
    disk_path: str | None = None
    disk_size: int = 0
    max_object_size: int = 64 * 2**20
    #: disk entries of at most this many bytes go to segment files; 0: off
    disk_pack_below: int = 64 * 2**10
    #: bound of the SQLite page cache of each connection to the disk index, bytes
    disk_index_cache: int = INDEX_CACHE_BYTES
    #: hold where every disk entry is in memory (one device read per hit, after restarts too)
    disk_location_map: bool = True
    metadata_ttl: float | None = 300.0
    chunk_ttl: float | None = None
    listing_ttl: float = 60.0
    negative_ttl: float = 300.0
    #: seconds between validations of cached entries against the source; None: never
    validation: float | None = 300.0
    eviction_policy: str = "lru"
    promotion_threshold: float = 0.0
    maintenance_interval: float = 60.0
    write_queue_size: int = 256 * 2**20
    top_n: int = 20
    #: bytes of the decoded tier (read-only NumPy arrays); None: `DECODED_FRACTION` of
    #: ``memory_size``; 0: off
    decoded_memory_size: int | None = None

    @classmethod
    def of(cls, config: Any) -> CacheSettings:
        """The settings of any object with the same attribute names (a `CacheConfig`)."""
        if isinstance(config, cls):
            return config
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def decoded_capacity(self) -> int:
        """Bytes of the decoded tier (``decoded_memory_size``, or its default)."""
        if self.decoded_memory_size is None:
            return int(DECODED_FRACTION * self.memory_size)
        return self.decoded_memory_size

    def ttl(self, kind: str) -> float | None:
        """Time to live of entries of ``kind`` (``"metadata"`` or ``"chunk"``)."""
        return self.metadata_ttl if kind == "metadata" else self.chunk_ttl
