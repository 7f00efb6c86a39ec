"""The memory tier (L1): a byte-bounded LRU or segmented-LRU mapping of str to bytes."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Literal

from pympler.asizeof import asizeof  # type: ignore[import-untyped]

from xarray_zcache.cache.logs import events

__all__ = ["MemoryTier"]

_events = events("xarray_zcache.cache")


class _Entry:
    __slots__ = ("expires", "kind", "protected", "value")

    def __init__(self, value: bytes, expires: float | None, kind: str) -> None:
        self.value = value
        self.expires = expires
        self.kind = kind
        self.protected = False


def _measure_entry_overhead() -> int:
    """Bytes of bookkeeping per entry (dict slot, key string, entry object), measured.

    Payload bytes are excluded: they are counted exactly by ``len(value)``. The key
    is sized as a typical cache key (a namespace plus a chunk path).
    """
    n = 256
    d: OrderedDict[str, _Entry] = OrderedDict()
    empty: int = asizeof(d)  # type: ignore[no-untyped-call]
    payload = b""  # shared, so asizeof counts it once
    for i in range(n):
        d[f"s3://bucket/dataset.zarr/var/c/{i}/0/0"] = _Entry(payload, None, "chunk")
    full: int = asizeof(d)  # type: ignore[no-untyped-call]
    return max(1, (full - empty) // n)


_ENTRY_OVERHEAD: int | None = None

_HALF = bytes(x >> 1 for x in range(256))  # bytes.translate table: halve every counter
_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)


class FrequencySketch:
    """Approximate access counts (a count-min sketch with aging), as in TinyLFU.

    Four rows of 8-bit counters; a key's estimate is the minimum of its four
    counters. After ``10 * width`` increments every counter is halved, so old
    popularity fades. About ``4 * width`` bytes. Not thread-safe on its own.

    Examples
    --------
    >>> sketch = FrequencySketch(1024)
    >>> for _ in range(3):
    ...     sketch.increment("hot")
    >>> sketch.frequency("hot"), sketch.frequency("cold")
    (3, 0)
    """

    def __init__(self, width: int = 1 << 16) -> None:
        self.width = 1 << max(4, (width - 1).bit_length())
        self._mask = self.width - 1
        self._rows = [bytearray(self.width) for _ in _MULTIPLIERS]
        self._additions = 0
        self._sample = 10 * self.width

    def _indices(self, key: str) -> list[int]:
        h = hash(key) & 0xFFFFFFFFFFFFFFFF
        return [((h * m) & 0xFFFFFFFFFFFFFFFF) >> 40 & self._mask for m in _MULTIPLIERS]

    def increment(self, key: str) -> None:
        for row, i in zip(self._rows, self._indices(key), strict=True):
            if row[i] < 255:
                row[i] += 1
        self._additions += 1
        if self._additions >= self._sample:
            self._additions //= 2
            for row in self._rows:
                row[:] = row.translate(_HALF)

    def frequency(self, key: str) -> int:
        return min(row[i] for row, i in zip(self._rows, self._indices(key), strict=True))


def entry_overhead() -> int:
    """Measured bookkeeping bytes per memory-tier entry (computed once per process)."""
    global _ENTRY_OVERHEAD
    if _ENTRY_OVERHEAD is None:
        _ENTRY_OVERHEAD = _measure_entry_overhead()
    return _ENTRY_OVERHEAD


class MemoryTier:
    """A thread-safe, byte-bounded in-memory cache of ``bytes`` values.

    The budget counts each payload's length plus a per-entry bookkeeping overhead
    measured with ``pympler.asizeof`` (the dict slot, the key and the entry record),
    so ``used_bytes() <= capacity`` bounds the real footprint, not only payloads.

    Two eviction policies:

    ``"lru"``
        Plain least-recently-used.
    ``"slru"``
        Segmented LRU: new entries enter a *probation* segment; a second hit moves
        an entry to the *protected* segment (80 % of the budget). Eviction takes
        from probation first, so a single sequential scan cannot flush entries that
        were used more than once.
    ``"tinylfu"``
        Segmented LRU with TinyLFU admission: every lookup (hit or miss) counts in
        a `FrequencySketch`, and a new entry that would evict another is admitted
        only if it has been asked for more often than the entry it would evict.
        Frequency-aware and scan resistant: the best hit rate under skewed (Zipf)
        access with a cache smaller than the working set.

    Entries may carry an absolute expiry time (``time.time()`` seconds); an expired
    entry is a miss and is dropped when seen.

    All methods are thread-safe (one lock; no I/O is done under it).

    Parameters
    ----------
    capacity
        Budget in bytes (payloads + measured overhead). 0 stores nothing.
    policy
        ``"lru"``, ``"slru"`` or ``"tinylfu"``.

    Examples
    --------
    >>> tier = MemoryTier(1_000_000)
    >>> tier.put("a", b"xyz")
    True
    >>> tier.get("a")
    b'xyz'
    >>> "b" in tier
    False
    """

    def __init__(self, capacity: int, *, policy: Literal["lru", "slru", "tinylfu"] = "lru") -> None:
        if capacity < 0:
            raise ValueError(f"capacity: expected bytes >= 0, got {capacity!r}")
        if policy not in ("lru", "slru", "tinylfu"):
            raise ValueError(f"policy: expected 'lru', 'slru' or 'tinylfu', got {policy!r}")
        self.capacity = capacity
        self.policy = policy
        self.entry_overhead = entry_overhead()
        self._lock = threading.Lock()
        # probation holds every entry under "lru"; under "slru" it holds entries seen once
        self._probation: OrderedDict[str, _Entry] = OrderedDict()
        self._protected: OrderedDict[str, _Entry] = OrderedDict()
        self._protected_bytes = 0
        self._protected_capacity = int(capacity * 0.8) if policy != "lru" else 0
        self._sketch = FrequencySketch() if policy == "tinylfu" else None
        self._used = 0
        self.evictions = 0
        self.evicted_bytes = 0
        self.rejections = 0  # entries TinyLFU did not admit

    def _cost(self, value: bytes) -> int:
        return len(value) + self.entry_overhead

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: str, now: float | None = None) -> bytes | None:
        """Return the value of ``key`` and mark it recently used, or ``None``."""
        with self._lock:
            return self._get_locked(key, now)

    def get_many(self, keys: list[str], now: float | None = None) -> list[bytes | None]:
        """`get` of each of ``keys``, in order, under one acquisition of the lock."""
        with self._lock:
            # (what `_get_locked` compares with, 0 included; read under the lock, as `get`)
            when = now or time.time()
            if self._sketch is not None:
                return [self._get_locked(key, when) for key in keys]
            # `_get_locked` inlined for the usual hit (a warm read's every chunk): an entry
            # not expired, in probation under "lru" or in the protected segment; any
            # other case (a promotion, an expired entry) goes through `_get_locked`
            out: list[bytes | None] = []
            probation, protected = self._probation, self._protected
            lru = not self._protected_capacity
            for key in keys:
                entry = probation.get(key)
                segment = probation
                if entry is None:
                    entry = protected.get(key)
                    segment = protected
                    if entry is None:
                        out.append(None)
                        continue
                elif not lru:
                    out.append(self._get_locked(key, when))
                    continue
                if entry.expires is not None and entry.expires <= when:
                    out.append(self._get_locked(key, when))
                    continue
                segment.move_to_end(key)
                out.append(entry.value)
            return out

    def _get_locked(self, key: str, now: float | None) -> bytes | None:
        if self._sketch is not None:
            self._sketch.increment(key)
        entry = self._probation.get(key)
        segment = self._probation
        if entry is None:
            entry = self._protected.get(key)
            segment = self._protected
            if entry is None:
                return None
        if entry.expires is not None and entry.expires <= (now or time.time()):
            self._remove(key, entry)
            return None
        if segment is self._protected:
            segment.move_to_end(key)
        elif self._protected_capacity:
            self._promote_locked(key, entry)
        else:
            segment.move_to_end(key)
        return entry.value

    def peek(self, key: str) -> bytes | None:
        """Return the value of ``key`` without touching recency or expiry."""
        with self._lock:
            entry = self._probation.get(key) or self._protected.get(key)
            return None if entry is None else entry.value

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._probation or key in self._protected

    def __len__(self) -> int:
        with self._lock:
            return len(self._probation) + len(self._protected)

    def keys(self) -> list[str]:
        """Keys from least to most recently used (probation first)."""
        with self._lock:
            return [*self._probation, *self._protected]

    def used_bytes(self) -> int:
        """Payload bytes plus bookkeeping overhead of the entries held."""
        return self._used

    def payload_bytes(self) -> int:
        """Payload bytes of the entries held."""
        with self._lock:
            return self._used - self.entry_overhead * (len(self._probation) + len(self._protected))

    # -- writes --------------------------------------------------------------------------------

    def put(
        self, key: str, value: bytes, *, expires: float | None = None, kind: str = "chunk"
    ) -> bool:
        """Store ``value`` under ``key``; return False if it cannot fit at all."""
        cost = self._cost(value)
        with self._lock:
            old = self._probation.get(key) or self._protected.get(key)
            if old is not None:
                self._remove(key, old)
            if cost > self.capacity:
                return False
            if (
                self._sketch is not None
                and old is None
                and self._used + cost > self.capacity
                and not self._admit_locked(key)
            ):
                self.rejections += 1
                return False
            entry = _Entry(value, expires, kind)
            self._probation[key] = entry
            self._used += cost
            self._evict_locked()
            return True

    def promote(self, key: str) -> bool:
        """Move ``key`` to the protected segment (SLRU) or to the MRU end (LRU)."""
        with self._lock:
            entry = self._probation.get(key)
            if entry is None:
                return key in self._protected
            if self._protected_capacity:
                self._promote_locked(key, entry)
            else:
                self._probation.move_to_end(key)
            return True

    def delete(self, key: str) -> bool:
        """Drop ``key``; return whether it was present."""
        with self._lock:
            entry = self._probation.get(key) or self._protected.get(key)
            if entry is None:
                return False
            self._remove(key, entry)
            return True

    def delete_prefix(self, prefix: str) -> int:
        """Drop every key starting with ``prefix``; return how many were dropped."""
        with self._lock:
            doomed = [k for k in (*self._probation, *self._protected) if k.startswith(prefix)]
            for k in doomed:
                entry = self._probation.get(k) or self._protected[k]
                self._remove(k, entry)
            return len(doomed)

    def drop_expired(self, now: float | None = None) -> int:
        """Drop expired entries; return how many."""
        now = now or time.time()
        with self._lock:
            doomed = [
                (k, e)
                for seg in (self._probation, self._protected)
                for k, e in seg.items()
                if e.expires is not None and e.expires <= now
            ]
            for k, e in doomed:
                self._remove(k, e)
            return len(doomed)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._probation.clear()
            self._protected.clear()
            self._used = 0
            self._protected_bytes = 0

    # -- internals (lock held) -----------------------------------------------------------------

    def _admit_locked(self, key: str) -> bool:
        """TinyLFU: admit ``key`` only if asked for more often than the entry it would evict."""
        assert self._sketch is not None
        segment = self._probation if self._probation else self._protected
        if not segment:
            return True
        victim = next(iter(segment))  # the entry eviction would take first
        return self._sketch.frequency(key) > self._sketch.frequency(victim)

    def _remove(self, key: str, entry: _Entry) -> None:
        cost = self._cost(entry.value)
        if entry.protected:
            del self._protected[key]
            self._protected_bytes -= cost
        else:
            del self._probation[key]
        self._used -= cost

    def _promote_locked(self, key: str, entry: _Entry) -> None:
        del self._probation[key]
        entry.protected = True
        self._protected[key] = entry
        self._protected_bytes += self._cost(entry.value)
        # demote the protected segment's LRU entries back to probation's MRU end
        while self._protected_bytes > self._protected_capacity and len(self._protected) > 1:
            k, e = self._protected.popitem(last=False)
            e.protected = False
            self._protected_bytes -= self._cost(e.value)
            self._probation[k] = e

    def _evict_locked(self) -> None:
        while self._used > self.capacity:
            segment = self._probation if self._probation else self._protected
            key, entry = next(iter(segment.items()))
            self._remove(key, entry)
            self.evictions += 1
            self.evicted_bytes += len(entry.value)
            _events.debug(
                "eviction",
                "xarray-zcache: evicted %r from memory (%d bytes)",
                key,
                len(entry.value),
            )
