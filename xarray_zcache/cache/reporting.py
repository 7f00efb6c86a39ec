"""What a cache counts, and the figures it reports (`HybridCache` inherits this)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from xarray_zcache.cache.analytics import (
    AccessTrace,
    access_patterns,
    miss_ratio_curve,
    recommendation,
)
from xarray_zcache.cache.logs import events
from xarray_zcache.cache.recorder import StatsRecorder
from xarray_zcache.cache.stats import TIERS, CacheStats

if TYPE_CHECKING:
    from xarray_zcache.cache.decoded import DecodedTier
    from xarray_zcache.cache.disk import DiskTier
    from xarray_zcache.cache.memory import MemoryTier
    from xarray_zcache.cache.request import Read

__all__ = ["CacheReporting"]

_events = events("xarray_zcache.cache")
_T = TypeVar("_T")


class CacheReporting:
    """Counters of the read protocol, kept exact against what the source saw.

    * a **miss** is a request sent to the source (a read-ahead's too: it is a
      request, counted when sent, in ``prefetches`` as well);
    * a **hit** is a read answered by a tier; a hit on an entry a read-ahead filled
      and no reader read yet is also a **prefetch hit**: it saved no request;
    * ``requests_saved`` = hits - prefetch hits + negative hits;
    * hot keys and the access trace count reader accesses only.
    """

    _memory: MemoryTier
    _decoded: DecodedTier
    _disk: DiskTier | None

    if TYPE_CHECKING:  # provided by DiskFallback

        def _on_disk(self, action: str, op: Callable[[DiskTier], _T], default: _T) -> _T: ...

    def __init__(self, top_n: int) -> None:
        self._stats = StatsRecorder(top_n)
        self._corruptions_base = 0
        self.trace = AccessTrace()
        # keys filled by read-ahead that no reader has read yet
        self._prefetched: set[str] = set()

    def _count_hit(self, tier: str, read: Read, value: bytes) -> None:
        if read.prefetch:
            return  # a read-ahead finding the key cached: nothing sent, nothing served
        if tier != "memory":
            _events.debug(f"{tier} hit", "xarray-zcache: %s hit %r", tier, read.key)
        if read.for_peer:
            self._stats.add("peer_served")
            self._stats.add("peer_served_bytes", len(value))
            return
        if self._prefetched and read.key in self._prefetched:
            self._prefetched.discard(read.key)
            self._stats.add("prefetch_hits")
        self._stats.hit(tier, read.kind, len(value), read.key)
        self.trace.add(read.key, len(value))

    def _count_memory_hits(self, hits: list[tuple[Read, bytes]]) -> None:
        """`_count_hit` ``("memory", read, value)`` of each of ``hits`` (one lock)."""
        if self._prefetched or any(r.prefetch or r.for_peer for r, _ in hits):
            for read, value in hits:
                self._count_hit("memory", read, value)
            return
        keys = [read.key for read, _ in hits]
        sizes = [len(value) for _, value in hits]
        kinds = {read.kind for read, _ in hits}
        if len(kinds) == 1:  # (one kind: the counters at once)
            self._stats.hits_of_kind("memory", kinds.pop(), keys, sum(sizes))
        else:
            kinds_of = [read.kind for read, _ in hits]
            self._stats.hit_many("memory", list(zip(kinds_of, sizes, keys, strict=True)))
        self.trace.add_many(list(zip(keys, sizes, strict=True)))

    def _count_negative(self, read: Read) -> None:
        if not read.prefetch and not read.for_peer:
            self._stats.negative_hit(read.key)

    def _count_miss(self, read: Read, nbytes: int, seconds: float) -> None:
        why = "read-ahead" if read.prefetch else "peer read" if read.for_peer else "miss"
        _events.debug(
            why,
            "xarray-zcache: %s %r (%s): fetched %d bytes from the source in %.1f ms",
            why,
            read.key,
            read.kind,
            nbytes,
            seconds * 1e3,
        )
        if read.for_peer:
            self._stats.miss(read.kind, nbytes, seconds, None)  # sent; the asker counts the read
        elif read.prefetch:
            self._stats.miss(read.kind, nbytes, seconds, None)
            self._stats.add("prefetches")
        else:
            self._stats.miss(read.kind, nbytes, seconds, read.key)
            self.trace.add(read.key, nbytes)

    def record_write(self, nbytes: int) -> None:
        """Count a write that went through the cache."""
        self._stats.write(nbytes)

    def stats(self) -> CacheStats:
        """A snapshot of counters and gauges."""
        gauges: dict[str, Any] = {
            "memory_used": self._memory.used_bytes(),
            "memory_capacity": self._memory.capacity,
            "memory_entries": len(self._memory),
            "memory_entry_overhead": self._memory.entry_overhead,
            "decoded_used": self._decoded.used_bytes(),
            "decoded_capacity": self._decoded.capacity,
            "decoded_entries": len(self._decoded),
        }
        evictions = dict.fromkeys(TIERS, 0)
        evictions["memory"] = self._memory.evictions
        disk = self._disk
        on_disk = self._on_disk("reporting", _disk_gauges, None)
        if disk is not None and on_disk is not None:
            gauges.update(on_disk)
            evictions["disk"] = disk.evictions
        snap = self._stats.snapshot(**gauges)
        snap.evictions = evictions
        snap.decoded_hits = self._decoded.hits
        snap.decoded_misses = self._decoded.misses
        snap.decoded_evictions = self._decoded.evictions
        if disk is not None and on_disk is not None:
            # everything the disk tier found damaged: payload files and the index
            snap.corruptions += disk.corruptions - self._corruptions_base
        return snap

    def analytics(self, group: Callable[[str], str] | None = None) -> dict[str, Any]:
        """Miss-ratio curves, sizing recommendations and access patterns of recent reads.

        Computed on demand from the last reads (`AccessTrace`), O(n log n): call it
        from time to time, not per read.

        Parameters
        ----------
        group
            Maps a key to its group (e.g. its zarr array) for access patterns;
            ``None`` skips them.

        Returns
        -------
        dict
            ``memory_curve`` / ``disk_curve``: estimated LRU hit rate at 0.5x, 1x, 2x
            and 4x the tier's size (keys are the factors as strings); ``recommendations``:
            one line per tier; ``patterns``: per group, sequential or random;
            ``trace_length``: reads analysed.
        """
        trace = self.trace.snapshot()
        factors = (0.5, 1.0, 2.0, 4.0)
        out: dict[str, Any] = {"trace_length": len(trace), "recommendations": []}
        tiers = [("memory", self._memory.capacity)]
        disk = self._disk
        if disk is not None:
            tiers.append(("disk", disk.capacity))
        for tier, cap in tiers:
            caps = {f: int(cap * f) for f in factors}
            curve = miss_ratio_curve(trace, caps.values())
            out[f"{tier}_curve"] = {str(f): curve[c] for f, c in caps.items()}
            if trace:
                out["recommendations"].append(recommendation(curve, cap, tier))
        out["patterns"] = access_patterns(trace, group) if group is not None else {}
        return out

    def reset_stats(self) -> None:
        """Zero the counters (entries are kept)."""
        self._stats.reset()
        self._decoded.hits = self._decoded.misses = 0
        disk = self._disk
        self._corruptions_base = disk.corruptions if disk is not None else 0
        self.trace.clear()

    def hot_keys(self, n: int | None = None) -> list[tuple[str, int]]:
        """The most accessed keys with their access counts."""
        return self._stats.hot_keys(n)


def _disk_gauges(disk: DiskTier) -> dict[str, Any]:
    return {
        "disk_used": disk.used_bytes(),
        "disk_capacity": disk.capacity,
        "disk_entries": len(disk),
        "disk_path": str(disk.path),
    }
