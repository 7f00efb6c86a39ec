"""The hybrid cache: a memory tier (L1) over a persistent disk tier (L2)."""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dask.utils import format_bytes

from xarray_zcache.cache.analytics import (
    AccessTrace,
    access_patterns,
    miss_ratio_curve,
    recommendation,
)
from xarray_zcache.cache.disk import DiskTier
from xarray_zcache.cache.memory import MemoryTier
from xarray_zcache.cache.policy import AccessRateTracker, Invalidations
from xarray_zcache.cache.stats import CacheStats, StatsRecorder
from xarray_zcache.config import CacheConfig

__all__ = ["Fill", "HybridCache"]

logger = logging.getLogger("xarray_zcache.cache")

_LIVE: weakref.WeakSet[HybridCache] = weakref.WeakSet()


@atexit.register
def _flush_all_at_exit() -> None:
    # a short script must still leave its disk tier filled for the next process
    for cache in list(_LIVE):
        try:
            cache.close()
        except Exception:  # pragma: no cover - best effort at exit
            logger.exception("xarray-zcache: flushing the cache at exit failed")


@dataclass(frozen=True, slots=True)
class Fill:
    """Token of one in-flight fetch (or write) of ``key``, from `HybridCache.begin`."""

    key: str
    generation: tuple[int, int]
    started_ns: int


class HybridCache:
    """A memory tier over an optional persistent disk tier, mapping str keys to bytes.

    Reads look in memory, then in the not-yet-written background disk writes, then
    on disk (a disk hit is promoted to memory per ``promotion_threshold``). Fills
    after a miss go to memory at once and to disk in a background thread, so the
    caller is not slowed down by disk writes; `flush` waits for them and runs at
    `close` and at interpreter exit. A fill that raced with an invalidation of its
    key (a write or delete through the cache) is dropped, here and on disk (where
    the check also covers other processes sharing the folder).

    The cache knows nothing about zarr: keys are opaque strings, and ``kind`` is a
    label (``"metadata"`` or ``"chunk"``) that selects a TTL and a stats bucket.

    All methods are thread-safe. Disk reads and SQLite work happen in the calling
    thread: async callers should run `lookup_disk` in a worker thread.

    Parameters
    ----------
    config
        The settings (sizes, TTLs, policies, disk folder).

    Examples
    --------
    >>> from xarray_zcache.config import CacheConfig
    >>> cache = HybridCache(CacheConfig().with_memory_size("10MB").without_disk_cache())
    >>> fill = cache.begin("ns/a")
    >>> cache.fill(fill, b"abc", kind="chunk", namespace="ns")
    True
    >>> cache.end(fill)
    >>> cache.lookup_memory("ns/a", kind="chunk")
    b'abc'
    """

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.memory = MemoryTier(config.memory_size, policy=config.eviction_policy)
        self.disk: DiskTier | None = None
        if config.disk_path is not None and config.disk_size > 0:
            self.disk = DiskTier(
                config.disk_path, config.disk_size, max_object_size=config.max_object_size
            )
        self._stats = StatsRecorder(config.top_n)
        self._corruptions_base = 0
        self.trace = AccessTrace()
        self._rates = AccessRateTracker()
        self._inv = Invalidations()
        self._lock = threading.Lock()
        self._negatives: dict[str, float] = {}
        self._listings: dict[str, tuple[float, tuple[str, ...]]] = {}
        # background disk writes: key -> (value, kind, namespace, expires, started_ns)
        self._pending: dict[str, tuple[bytes, str, str, float | None, int]] = {}
        self._pending_bytes = 0
        self._warned_queue_full = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._closed = False
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"<HybridCache {self.config}>"

    # -- expiry --------------------------------------------------------------------------------

    def ttl(self, kind: str) -> float | None:
        """Time to live of entries of ``kind`` in seconds (``None``: forever)."""
        return self.config.metadata_ttl if kind == "metadata" else self.config.chunk_ttl

    def _expires(self, kind: str) -> float | None:
        ttl = self.ttl(kind)
        return None if ttl is None else time.time() + ttl

    # -- reads ---------------------------------------------------------------------------------

    def lookup_memory(self, key: str, *, kind: str) -> bytes | None:
        """Return ``key`` from memory or from a pending disk write, recording a hit."""
        value = self.memory.get(key)
        if value is None:
            pending = self._pending.get(key)
            if pending is None:
                return None
            value = pending[0]
        self._stats.hit("memory", kind, len(value), key)
        self.trace.add(key, len(value))
        return value

    def lookup_disk(self, key: str, *, kind: str) -> bytes | None:
        """Return ``key`` from disk (checksum verified), recording a hit; promote per policy."""
        if self.disk is None:
            return None
        value = self.disk.get(key)
        if value is None:
            return None
        self._stats.hit("disk", kind, len(value), key)
        self.trace.add(key, len(value))
        rate = self._rates.touch(key)
        threshold = self.config.promotion_threshold
        if threshold == 0 or rate >= threshold:
            self.memory.put(key, value, expires=self._expires(kind), kind=kind)
            self._stats.add("promotions")
        return value

    def lookup(self, key: str, *, kind: str) -> bytes | None:
        """`lookup_memory`, then `lookup_disk`."""
        value = self.lookup_memory(key, kind=kind)
        return value if value is not None else self.lookup_disk(key, kind=kind)

    def contains(self, key: str) -> bool:
        """Whether ``key`` is cached in any tier (no stats, no recency change)."""
        if key in self.memory or key in self._pending:
            return True
        return self.disk is not None and key in self.disk

    # -- misses and fills ----------------------------------------------------------------------

    def begin(self, key: str) -> Fill:
        """Register a fetch (or write) of ``key`` about to start; pair with `end`."""
        return Fill(key, self._inv.begin(key), time.time_ns())

    def end(self, fill: Fill) -> None:
        """Unregister the fetch of `begin`."""
        self._inv.end(fill.key)

    def record_miss(self, key: str, *, kind: str, nbytes: int, seconds: float) -> None:
        """Count a read that went to the inner store."""
        self._stats.miss(kind, nbytes, seconds, key)
        self.trace.add(key, nbytes)

    def record_prefetch(self) -> None:
        """Count a read-ahead fetch (it is also counted as a miss)."""
        self._stats.add("prefetches")

    def record_error(self) -> None:
        """Count an error from the inner store (never cached)."""
        self._stats.add("inner_errors")

    def fill(
        self,
        fill: Fill,
        value: bytes,
        *,
        kind: str,
        namespace: str,
        own_invalidations: int = 0,
        disk: bool = True,
    ) -> bool:
        """Admit ``value`` fetched for ``fill.key``; return whether it was admitted.

        Refused when the object is over ``max_object_size``, or when the key was
        invalidated while the fetch was in flight (other than ``own_invalidations``
        by the caller itself: a write invalidates before and after sending).
        ``disk=False`` admits to memory only (values written through this process:
        other processes sharing the disk tier may have written the key since).
        """
        key = fill.key
        if len(value) > self.config.max_object_size:
            self._stats.add("not_admitted")
            return False
        if not self._inv.unchanged(key, fill.generation, own_invalidations):
            return False
        expires = self._expires(kind)
        self.memory.put(key, value, expires=expires, kind=kind)
        if self.disk is not None and disk:
            self._queue_disk_write(key, value, kind, namespace, expires, fill.started_ns)
        return True

    def _queue_disk_write(
        self, key: str, value: bytes, kind: str, namespace: str, expires: float | None, t0: int
    ) -> None:
        with self._lock:
            if self._closed:
                return
            if self._pending and self._pending_bytes + len(value) > self.config.write_queue_size:
                # never block a reader on the disk: drop this write, memory still has it
                # (an empty queue takes any admitted object, however large)
                self._stats.add("disk_write_failures")
                if not self._warned_queue_full:
                    self._warned_queue_full = True
                    logger.warning(
                        "xarray-zcache: the background disk writer is behind (%s queued); "
                        "dropping disk writes until it catches up (raise zcache.write-queue-size)",
                        format_bytes(self._pending_bytes),
                    )
                return
            old = self._pending.get(key)
            if old is not None:
                self._pending_bytes -= len(old[0])
            self._pending[key] = (value, kind, namespace, expires, t0)
            self._pending_bytes += len(value)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="zcache-disk-writer", daemon=True
                )
                self._writer.start()
        self._queue.put(key)

    def _write_loop(self) -> None:
        assert self.disk is not None
        while True:
            key = self._queue.get()
            try:
                if key is None:
                    return
                item = self._pending.get(key)
                if item is None:
                    continue  # invalidated, or already written by an earlier queue entry
                value, kind, namespace, expires, t0 = item
                ok = self.disk.put(
                    key, value, namespace=namespace, kind=kind, expires=expires, fetch_started_ns=t0
                )
                if not ok and len(value) <= self.disk.capacity:
                    self._stats.add("disk_write_failures")
                with self._lock:
                    if self._pending.get(key) is item:
                        del self._pending[key]
                        self._pending_bytes -= len(value)
            except Exception:
                logger.exception("xarray-zcache: background disk write of %r failed", key)
            finally:
                self._queue.task_done()

    # -- writes through the cache --------------------------------------------------------------

    def invalidate(self, key: str) -> None:
        """Drop ``key`` from every tier (a write or delete of it went through)."""
        self._inv.bump(key)
        with self._lock:
            old = self._pending.pop(key, None)
            if old is not None:
                self._pending_bytes -= len(old[0])
            self._negatives.pop(key, None)
            negative = self._pending.pop(key + self.NEGATIVE_SUFFIX, None)
            if negative is not None:
                self._pending_bytes -= len(negative[0])
        self.memory.delete(key)
        if self.disk is not None:
            self.disk.delete(key)
            self.disk.delete(key + self.NEGATIVE_SUFFIX)
        self._stats.add("invalidations")

    def invalidate_prefix(self, prefix: str) -> None:
        """Drop every key starting with ``prefix`` from every tier."""
        self._inv.bump_prefix(prefix)
        with self._lock:
            for k in [k for k in self._pending if k.startswith(prefix)]:
                self._pending_bytes -= len(self._pending.pop(k)[0])
            for k in [k for k in self._negatives if k.startswith(prefix)]:
                del self._negatives[k]
        self.memory.delete_prefix(prefix)
        if self.disk is not None:
            self.disk.delete_prefix(prefix)
        self._stats.add("invalidations")

    def record_write(self, nbytes: int) -> None:
        """Count a write that went through the cache."""
        self._stats.write(nbytes)

    # -- negative entries and listings ---------------------------------------------------------

    # negative entries are also kept on disk (an empty payload under key + this suffix),
    # so a new process does not probe S3 again for the same missing metadata documents
    NEGATIVE_SUFFIX = "\x00missing"

    def is_negative(self, key: str) -> bool:
        """Whether ``key`` is known missing (a fresh negative entry); counts a hit if so."""
        expires = self._negatives.get(key)
        now = time.time()
        if expires is None and self.disk is not None and self.config.negative_ttl > 0:
            entry = self.disk.get(key + self.NEGATIVE_SUFFIX, now=now)
            if entry is not None:  # (the disk tier drops it once expired)
                expires = now + self.config.negative_ttl
                with self._lock:
                    self._negatives[key] = expires
        if expires is None:
            return False
        if expires <= now:
            with self._lock:
                self._negatives.pop(key, None)
            return False
        self._stats.negative_hit(key)
        return True

    def set_negative(self, fill: Fill, namespace: str = "") -> None:
        """Remember that ``fill.key`` is missing for ``negative_ttl`` seconds."""
        ttl = self.config.negative_ttl
        if ttl <= 0 or not self._inv.unchanged(fill.key, fill.generation):
            return
        expires = time.time() + ttl
        with self._lock:
            if len(self._negatives) > 100_000:
                self._negatives.clear()
            self._negatives[fill.key] = expires
        if self.disk is not None:
            self._queue_disk_write(
                fill.key + self.NEGATIVE_SUFFIX,
                b"",
                "metadata",
                namespace,
                expires,
                fill.started_ns,
            )

    def get_listing(self, key: str) -> tuple[str, ...] | None:
        """A cached listing under ``key``, or ``None`` if absent or expired."""
        item = self._listings.get(key)
        if item is None or item[0] <= time.time():
            return None
        return item[1]

    def put_listing(self, key: str, names: tuple[str, ...], generation: int) -> None:
        """Cache a listing taken when `listing_generation` was ``generation``."""
        ttl = self.config.listing_ttl
        if ttl <= 0:
            return
        with self._lock:
            if generation != self._listing_gen:
                return  # a write went through while listing: the result may be stale
            if len(self._listings) > 10_000:
                self._listings.clear()
            self._listings[key] = (time.time() + ttl, names)

    _listing_gen = 0

    def listing_generation(self) -> int:
        """Counter bumped by `drop_listings`; pass it back to `put_listing`."""
        return self._listing_gen

    def drop_listings(self, prefix: str) -> None:
        """Forget listings whose key starts with ``prefix`` (a write went through)."""
        with self._lock:
            self._listing_gen += 1
            for k in [k for k in self._listings if k.startswith(prefix)]:
                del self._listings[k]

    # -- cluster hooks -------------------------------------------------------------------------

    def promote(self, keys: list[str]) -> int:
        """Promote ``keys`` held on disk to memory now; return how many were promoted."""
        n = 0
        for key in keys:
            if key in self.memory or self.disk is None:
                continue
            value = self.disk.get(key)
            if value is not None:
                self.memory.put(key, value, kind="chunk")
                self._stats.add("promotions")
                n += 1
        return n

    # -- maintenance ---------------------------------------------------------------------------

    def start_maintenance(self) -> None:
        """Start the periodic maintenance thread (idempotent)."""
        with self._lock:
            if self._maintenance is not None or self._closed:
                return
            self._maintenance = threading.Thread(
                target=self._maintenance_loop, name="zcache-maintenance", daemon=True
            )
            self._maintenance.start()

    def _maintenance_loop(self) -> None:
        while not self._stop.wait(self.config.maintenance_interval):
            try:
                self.maintain()
            except Exception:
                logger.exception("xarray-zcache: cache maintenance failed")

    def maintain(self) -> None:
        """Drop expired entries, enforce sizes, flush access statistics."""
        now = time.time()
        self.memory.drop_expired(now)
        with self._lock:
            for k in [k for k, t in self._negatives.items() if t <= now]:
                del self._negatives[k]
            for k in [k for k, (t, _) in self._listings.items() if t <= now]:
                del self._listings[k]
        if self.disk is not None:
            self.disk.drop_expired(now)
            self.disk.evict()
            self.disk.prune_tombstones()
            self.disk.flush()

    def flush(self) -> None:
        """Wait for background disk writes and persist access statistics."""
        if self._writer is not None:
            self._queue.join()
        if self.disk is not None:
            self.disk.flush()

    def close(self) -> None:
        """Flush, stop the background threads and close the disk index. Idempotent."""
        if self._closed:
            return
        self.flush()
        with self._lock:
            self._closed = True
        self._stop.set()
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=10)
        if self.disk is not None:
            self.disk.close()
        _LIVE.discard(self)

    @property
    def disk_backlog(self) -> float:
        """Fraction of ``write_queue_size`` waiting for the background disk writer."""
        return self._pending_bytes / max(1, self.config.write_queue_size)

    @property
    def closed(self) -> bool:
        return self._closed

    def clear(self, prefix: str = "") -> None:
        """Drop every entry (or every entry whose key starts with ``prefix``)."""
        self.invalidate_prefix(prefix)
        self.drop_listings(prefix)

    # -- stats ---------------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """A snapshot of counters and gauges."""
        gauges: dict[str, Any] = {
            "memory_used": self.memory.used_bytes(),
            "memory_capacity": self.memory.capacity,
            "memory_entries": len(self.memory),
            "memory_entry_overhead": self.memory.entry_overhead,
        }
        evictions = {"memory": self.memory.evictions, "disk": 0}
        if self.disk is not None:
            gauges.update(
                disk_used=self.disk.used_bytes(),
                disk_capacity=self.disk.capacity,
                disk_entries=len(self.disk),
                disk_path=str(self.disk.path),
            )
            evictions["disk"] = self.disk.evictions
        snap = self._stats.snapshot(**gauges)
        snap.evictions = evictions
        if self.disk is not None:
            # everything the disk tier found damaged: payload files (on reads, promotions,
            # verify) and the index (at open, on writes)
            snap.corruptions += self.disk.corruptions - self._corruptions_base
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
        tiers = [("memory", self.memory.capacity)]
        if self.disk is not None:
            tiers.append(("disk", self.disk.capacity))
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
        self._corruptions_base = self.disk.corruptions if self.disk is not None else 0
        self.trace.clear()

    def hot_keys(self, n: int | None = None) -> list[tuple[str, int]]:
        """The most accessed keys with their access counts."""
        return self._stats.hot_keys(n)
