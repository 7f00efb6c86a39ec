"""Live counters of one cache: `StatsRecorder` (thread-safe; its `snapshot` is a
`~xarray_zcache.cache.stats.CacheStats`) and the top-N counter of its hot keys (`HotKeys`)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from operator import itemgetter
from typing import Any

from xarray_zcache.cache.stats import CacheStats
from xarray_zcache.cache.stats_fields import LATENCY_BUCKETS_MS, _clone

__all__ = ["HotKeys", "StatsRecorder"]


class HotKeys:
    """Approximate top-N access counter with bounded memory.

    Keeps at most ``4 * n`` counters; when full, it drops all but the ``2 * n``
    most frequent (a space-saving style sketch: heavy hitters survive, the long
    tail is forgotten). Not thread-safe on its own: `StatsRecorder` locks it.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._counts: Counter[str] = Counter()

    def add(self, key: str, count: int = 1) -> None:
        if self.n <= 0:
            return
        self._counts[key] += count
        if len(self._counts) > 4 * self.n:
            self._prune()

    def _prune(self) -> None:
        """Keep the ``2 * n`` most frequent (ties: the earliest counted first, as
        `Counter.most_common`: `heapq.nlargest` is a stable sort's head, and sorting
        81-odd counters is cheaper than the heap)."""
        items = sorted(self._counts.items(), key=itemgetter(1), reverse=True)
        self._counts = Counter(dict(items[: 2 * self.n]))

    def add_many(self, keys: list[str]) -> None:
        """`add` of each of ``keys``, in order, with the same counts and the same prunes:
        runs of keys that cannot overflow the table (no more of them than free counters)
        are counted in one step; a key that may is counted on its own."""
        if self.n <= 0:
            return
        limit, i, n = 4 * self.n, 0, len(keys)
        while i < n:
            room = limit - len(self._counts)
            if room > 0:  # at most ``room`` new counters: no prune is due within them
                self._counts.update(keys[i : i + room])
                i += room
                continue
            self._counts[keys[i]] += 1
            i += 1
            if len(self._counts) > limit:
                self._prune()

    def top(self, n: int | None = None) -> list[tuple[str, int]]:
        return self._counts.most_common(self.n if n is None else n)

    def clear(self) -> None:
        self._counts.clear()


class StatsRecorder:
    """Live counters of one cache. Thread-safe; cheap enough for the hit path."""

    def __init__(self, top_n: int = 20) -> None:
        self._lock = threading.Lock()
        self._s = CacheStats()
        self._hot = HotKeys(top_n)
        self.started = time.monotonic()

    def hit(self, tier: str, kind: str, nbytes: int, key: str) -> None:
        with self._lock:
            self._s.hits[tier][kind] += 1
            self._s.hit_bytes[tier][kind] += nbytes
            self._hot.add(key)

    def hit_many(self, tier: str, hits: list[tuple[str, int, str]]) -> None:
        """`hit` of each ``(kind, nbytes, key)`` of ``hits``, under one acquisition of the lock."""
        kinds = set(map(itemgetter(0), hits))
        with self._lock:
            counts, sizes = self._s.hits[tier], self._s.hit_bytes[tier]
            if len(kinds) == 1:
                (kind,) = kinds
                counts[kind] += len(hits)
                sizes[kind] += sum(map(itemgetter(1), hits))
            else:
                for kind, nbytes, _ in hits:
                    counts[kind] += 1
                    sizes[kind] += nbytes
            self._hot.add_many(list(map(itemgetter(2), hits)))

    def hits_of_kind(self, tier: str, kind: str, keys: list[str], nbytes: int) -> None:
        """`hit` of each of ``keys``, all of ``kind`` and ``nbytes`` in all, under one
        acquisition of the lock."""
        with self._lock:
            self._s.hits[tier][kind] += len(keys)
            self._s.hit_bytes[tier][kind] += nbytes
            self._hot.add_many(keys)

    def negative_hit(self, key: str) -> None:
        with self._lock:
            self._s.negative_hits += 1
            self._hot.add(key)

    def miss(self, kind: str, nbytes: int, seconds: float, key: str | None) -> None:
        """A request sent to the source; ``key=None``: no reader asked (a read-ahead)."""
        ms = seconds * 1000
        with self._lock:
            self._s.misses[kind] += 1
            self._s.miss_bytes[kind] += nbytes
            if key is not None:
                self._hot.add(key)
            for i, bound in enumerate(LATENCY_BUCKETS_MS):
                if ms <= bound:
                    self._s.fetch_latency_ms[i] += 1
                    break

    def peer_answer(self, seconds: float) -> None:
        """The latency of one answer from a peer (any outcome)."""
        ms = seconds * 1000
        with self._lock:
            for i, bound in enumerate(LATENCY_BUCKETS_MS):
                if ms <= bound:
                    self._s.peer_latency_ms[i] += 1
                    break

    def add(self, field: str, n: int = 1) -> None:
        """Increment a scalar counter such as ``"invalidations"`` or ``"corruptions"``."""
        with self._lock:
            setattr(self._s, field, getattr(self._s, field) + n)

    def write(self, nbytes: int) -> None:
        with self._lock:
            self._s.writes += 1
            self._s.write_bytes += nbytes

    def hot_keys(self, n: int | None = None) -> list[tuple[str, int]]:
        with self._lock:
            return self._hot.top(n)

    def snapshot(self, **gauges: Any) -> CacheStats:
        """A copy of the counters, with the given gauges filled in."""
        with self._lock:
            s = dataclasses.replace(
                self._s,
                **{f.name: _clone(getattr(self._s, f.name)) for f in dataclasses.fields(self._s)},
            )
            s.hot_keys = self._hot.top()
            s.uptime = time.monotonic() - self.started
        for k, v in gauges.items():
            setattr(s, k, v)
        return s

    def reset(self) -> None:
        with self._lock:
            self._s = CacheStats()
            self._hot.clear()
            self.started = time.monotonic()
