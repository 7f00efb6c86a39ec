"""Access analytics: a bounded access trace, miss-ratio curves and access patterns.

The trace records (key, size) of recent reads. From it:

* `miss_ratio_curve` estimates the hit rate an LRU cache would have at other sizes
  (byte-weighted stack distances, O(n log n) with a Fenwick tree) — the basis of
  "a cache twice as large would serve 93 % instead of 71 %" recommendations;
* `access_patterns` tells, per group of keys (e.g. per zarr array), whether reads
  are sequential (neighbouring chunk indices one after the other) or random.

Nothing here runs on the hot path except `AccessTrace.add` (a deque append).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from xarray_zcache.cache.units import format_bytes

__all__ = ["AccessTrace", "access_patterns", "miss_ratio_curve", "recommendation"]


class AccessTrace:
    """The last ``capacity`` reads as (key, size) pairs. Thread-safe.

    Examples
    --------
    >>> trace = AccessTrace(3)
    >>> for k in "abcd":
    ...     trace.add(k, 10)
    >>> [k for k, _ in trace.snapshot()]
    ['b', 'c', 'd']
    """

    def __init__(self, capacity: int = 50_000) -> None:
        self._items: deque[tuple[str, int]] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, key: str, size: int) -> None:
        self._items.append((key, size))  # deque.append is atomic

    def add_many(self, items: list[tuple[str, int]]) -> None:
        """`add` of each (key, size) of ``items``, in order."""
        self._items.extend(items)  # (one C call: atomic, as append)

    def snapshot(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


class _Fenwick:
    def __init__(self, n: int) -> None:
        self.n = n
        self.tree = [0] * (n + 1)

    def add(self, i: int, delta: int) -> None:
        i += 1
        while i <= self.n:
            self.tree[i] += delta
            i += i & -i

    def prefix(self, i: int) -> int:
        """Sum of positions [0, i)."""
        total = 0
        while i > 0:
            total += self.tree[i]
            i -= i & -i
        return total


def stack_distances(trace: Sequence[tuple[str, int]]) -> list[tuple[float, int]]:
    """For each access: bytes of distinct other keys read since the key's previous read.

    ``inf`` for a first access. An LRU cache of ``C`` bytes hits an access whose
    distance plus own size is at most ``C``.
    """
    n = len(trace)
    fen = _Fenwick(n)
    last: dict[str, tuple[int, int]] = {}
    out: list[tuple[float, int]] = []
    for t, (key, size) in enumerate(trace):
        prev = last.get(key)
        if prev is None:
            dist: float = float("inf")
        else:
            p, psize = prev
            dist = fen.prefix(t) - fen.prefix(p + 1)
            fen.add(p, -psize)
        fen.add(t, size)
        last[key] = (t, size)
        out.append((dist, size))
    return out


def miss_ratio_curve(
    trace: Sequence[tuple[str, int]], capacities: Iterable[int]
) -> dict[int, float]:
    """Estimated LRU hit rate (by request count) at each capacity in bytes."""
    dists = stack_distances(trace)
    caps = list(capacities)
    if not dists:
        return dict.fromkeys(caps, 0.0)
    return {c: sum(1 for d, s in dists if d + s <= c) / len(dists) for c in caps}


_INDEX = re.compile(r"(\d+)")


def _indices(key: str) -> tuple[int, ...]:
    tail = key.rsplit("/c/", 1)[-1] if "/c/" in key else key.rsplit("/", 1)[-1]
    return tuple(int(x) for x in _INDEX.findall(tail))


def access_patterns(
    trace: Sequence[tuple[str, int]], group: Callable[[str], str], min_accesses: int = 8
) -> dict[str, dict[str, object]]:
    """Per group: accesses, fraction of sequential steps, and "sequential"/"random".

    A step is sequential when the chunk index tuple of a read differs from the
    previous read of the same group by one in exactly one dimension.
    """
    last: dict[str, tuple[int, ...]] = {}
    steps: dict[str, list[int]] = {}
    for key, _ in trace:
        g = group(key)
        idx = _indices(key)
        prev = last.get(g)
        counts = steps.setdefault(g, [0, 0, 0])  # accesses, steps, sequential steps
        counts[0] += 1
        if prev is not None and idx != prev:
            counts[1] += 1
            if len(prev) == len(idx):
                diff = [abs(a - b) for a, b in zip(prev, idx, strict=True)]
                if sorted(diff)[-1] == 1 and sum(diff) == 1:
                    counts[2] += 1
        last[g] = idx
    out: dict[str, dict[str, object]] = {}
    for g, (accesses, n_steps, seq) in steps.items():
        if accesses < min_accesses:
            continue
        frac = seq / n_steps if n_steps else 0.0
        out[g] = {
            "accesses": accesses,
            "sequential_fraction": round(frac, 3),
            "pattern": "sequential" if frac >= 0.5 else "random",
        }
    return out


def recommendation(curve: dict[int, float], capacity: int, tier: str) -> str:
    """A one-line sizing advice from a miss-ratio curve around ``capacity``."""
    now = curve.get(capacity)
    if now is None:
        return ""
    bigger = {c: h for c, h in curve.items() if c > capacity}
    smaller = {c: h for c, h in curve.items() if c < capacity}
    for c, h in sorted(bigger.items()):
        if h - now >= 0.05:
            return (
                f"{tier} tier: {format_bytes(c)} would serve {h:.0%} of reads instead of "
                f"{now:.0%} at {format_bytes(capacity)}"
            )
    for c, h in sorted(smaller.items()):
        if now - h <= 0.01:
            return (
                f"{tier} tier: {format_bytes(c)} would serve about as much ({h:.0%}) as "
                f"{format_bytes(capacity)} ({now:.0%}); it could be smaller"
            )
    return f"{tier} tier: {format_bytes(capacity)} is about right ({now:.0%} of reads served)"
