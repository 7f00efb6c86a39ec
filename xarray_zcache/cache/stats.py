"""Cache statistics: live thread-safe counters and immutable snapshots (`CacheStats`)."""

from __future__ import annotations

import dataclasses
import html
import math
import threading
import time
from collections import Counter
from typing import Any

from xarray_zcache.cache.units import format_bytes

__all__ = ["KINDS", "TIERS", "CacheStats", "HotKeys", "StatsRecorder"]

KINDS = ("metadata", "chunk")
TIERS = ("memory", "disk", "peer")

# upper bounds (ms) of the fetch-latency histogram buckets; the last bucket is open
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, math.inf)


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
            self._counts = Counter(dict(self._counts.most_common(2 * self.n)))

    def top(self, n: int | None = None) -> list[tuple[str, int]]:
        return self._counts.most_common(self.n if n is None else n)

    def clear(self) -> None:
        self._counts.clear()


def _zeros() -> dict[str, int]:
    return dict.fromkeys(KINDS, 0)


def _tiered() -> dict[str, dict[str, int]]:
    return {t: _zeros() for t in TIERS}


@dataclasses.dataclass
class CacheStats:
    """A snapshot of a cache's counters and gauges.

    Counters (hits, misses, bytes, ...) are per kind (``"metadata"``, ``"chunk"``)
    and, for hits, per tier (``"memory"``, ``"disk"``). A *hit* is a read served
    without asking the inner store (S3); a *miss* is a read that asked it.
    Negative hits (a metadata key known to be missing) count as requests saved.

    Snapshots add (``a + b``: totals over caches or workers) and subtract
    (``b - a``: what happened between two snapshots; gauges keep ``b``'s values).
    """

    hits: dict[str, dict[str, int]] = dataclasses.field(default_factory=_tiered)
    hit_bytes: dict[str, dict[str, int]] = dataclasses.field(default_factory=_tiered)
    misses: dict[str, int] = dataclasses.field(default_factory=_zeros)
    miss_bytes: dict[str, int] = dataclasses.field(default_factory=_zeros)
    negative_hits: int = 0
    inner_errors: int = 0
    writes: int = 0
    write_bytes: int = 0
    invalidations: int = 0
    evictions: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    corruptions: int = 0
    promotions: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    # the cluster as one cache: reads this worker served to others, reads others
    # served that their owner had to load from the source, and asks that fell back
    peer_served: int = 0
    peer_served_bytes: int = 0
    peer_loads: int = 0
    peer_fallbacks: int = 0
    peer_latency_ms: list[int] = dataclasses.field(
        default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS)
    )
    disk_write_failures: int = 0
    not_admitted: int = 0
    fetch_latency_ms: list[int] = dataclasses.field(
        default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS)
    )
    # gauges
    memory_used: int = 0
    memory_capacity: int = 0
    memory_entries: int = 0
    memory_entry_overhead: int = 0
    disk_used: int = 0
    disk_capacity: int = 0
    disk_entries: int = 0
    disk_path: str | None = None
    hot_keys: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    uptime: float = 0.0

    # -- derived figures -----------------------------------------------------------------------

    def total_hits(self, kind: str | None = None, tier: str | None = None) -> int:
        """Hits, optionally for one kind and/or tier."""
        tiers = TIERS if tier is None else (tier,)
        kinds = KINDS if kind is None else (kind,)
        return sum(self.hits[t][k] for t in tiers for k in kinds)

    def total_misses(self, kind: str | None = None) -> int:
        """Misses (reads that went to the inner store), optionally for one kind."""
        kinds = KINDS if kind is None else (kind,)
        return sum(self.misses[k] for k in kinds)

    def hit_rate(self, kind: str | None = None) -> float:
        """Fraction of requests the cache saved: saved / (saved + sent); 0.0 with neither.

        A read served from an entry that a read-ahead fetched saved no request
        (the read-ahead sent it): it counts in neither the numerator nor as a miss.
        """
        saved = self.total_hits(kind)
        if kind in (None, "chunk"):
            saved -= self.prefetch_hits
        if kind in (None, "metadata"):
            saved += self.negative_hits
        total = saved + self.total_misses(kind)
        return saved / total if total else 0.0

    @property
    def requests_saved(self) -> int:
        """Requests not sent to the inner store thanks to the cache (read-ahead hits excluded)."""
        return self.total_hits() - self.prefetch_hits + self.negative_hits

    @property
    def bytes_saved(self) -> int:
        """Bytes served from the cache instead of the inner store."""
        return sum(self.hit_bytes[t][k] for t in TIERS for k in KINDS)

    @property
    def requests_sent(self) -> int:
        """Reads that went to the inner store."""
        return self.total_misses()

    # -- arithmetic ----------------------------------------------------------------------------

    _GAUGES = (
        "memory_used",
        "memory_capacity",
        "memory_entries",
        "memory_entry_overhead",
        "disk_used",
        "disk_capacity",
        "disk_entries",
        "disk_path",
        "hot_keys",
        "uptime",
    )

    def _combine(self, other: CacheStats, sign: int) -> CacheStats:
        """Counters: ``self + sign * other``. Gauges: summed for ``+``, self's for ``-``."""
        out = CacheStats()
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name not in self._GAUGES:
                setattr(out, f.name, _op(a, b, sign))
            elif sign < 0:
                setattr(out, f.name, a)
            elif f.name == "hot_keys":
                merged: Counter[str] = Counter(dict(a))
                merged.update(dict(b))
                setattr(out, f.name, merged.most_common(max(len(a), len(b))))
            elif f.name == "disk_path":
                setattr(out, f.name, a if a == b else None)
            elif f.name in ("uptime", "memory_entry_overhead"):
                setattr(out, f.name, max(a, b))
            else:
                setattr(out, f.name, a + b)
        return out

    def __add__(self, other: CacheStats) -> CacheStats:
        return self._combine(other, +1)

    def __sub__(self, other: CacheStats) -> CacheStats:
        return self._combine(other, -1)

    # -- compact wire form ---------------------------------------------------------------------

    # every number, in a fixed order: what a Dask worker sends to the scheduler (small,
    # fast to pack, and summable element by element)
    VECTOR_FIELDS: tuple[str, ...] = (
        *(f"hits.{t}.{k}" for t in TIERS for k in KINDS),
        *(f"hit_bytes.{t}.{k}" for t in TIERS for k in KINDS),
        *(f"misses.{k}" for k in KINDS),
        *(f"miss_bytes.{k}" for k in KINDS),
        "negative_hits",
        "inner_errors",
        "writes",
        "write_bytes",
        "invalidations",
        *(f"evictions.{t}" for t in TIERS),
        "corruptions",
        "promotions",
        "prefetches",
        "disk_write_failures",
        "not_admitted",
        "prefetch_hits",
        "peer_served",
        "peer_served_bytes",
        "peer_loads",
        "peer_fallbacks",
        *(f"peer_latency_ms.{i}" for i in range(len(LATENCY_BUCKETS_MS))),
        *(f"fetch_latency_ms.{i}" for i in range(len(LATENCY_BUCKETS_MS))),
        "memory_used",
        "memory_capacity",
        "memory_entries",
        "disk_used",
        "disk_capacity",
        "disk_entries",
    )

    def to_vector(self) -> list[int]:
        """The numbers of `VECTOR_FIELDS`, in order (counters and summable gauges)."""
        out: list[int] = []
        for t in TIERS:
            out += [self.hits[t][k] for k in KINDS]
        for t in TIERS:
            out += [self.hit_bytes[t][k] for k in KINDS]
        out += [self.misses[k] for k in KINDS]
        out += [self.miss_bytes[k] for k in KINDS]
        out += [
            self.negative_hits,
            self.inner_errors,
            self.writes,
            self.write_bytes,
            self.invalidations,
        ]
        out += [self.evictions[t] for t in TIERS]
        out += [
            self.corruptions,
            self.promotions,
            self.prefetches,
            self.disk_write_failures,
            self.not_admitted,
            self.prefetch_hits,
            self.peer_served,
            self.peer_served_bytes,
            self.peer_loads,
            self.peer_fallbacks,
        ]
        out += list(self.peer_latency_ms)
        out += list(self.fetch_latency_ms)
        out += [
            self.memory_used,
            self.memory_capacity,
            self.memory_entries,
            self.disk_used,
            self.disk_capacity,
            self.disk_entries,
        ]
        return out

    @classmethod
    def from_vector(cls, vec: list[int] | tuple[int, ...]) -> CacheStats:
        """Inverse of `to_vector`.

        Raises
        ------
        ValueError
            If ``vec`` is not a sequence of ``len(VECTOR_FIELDS)`` numbers.
        """
        if len(vec) != len(cls.VECTOR_FIELDS) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in vec
        ):
            raise ValueError(
                f"stats vector: expected {len(cls.VECTOR_FIELDS)} numbers, got {len(vec)} items"
            )
        it = iter(vec)
        s = cls()
        for t in TIERS:
            for k in KINDS:
                s.hits[t][k] = int(next(it))
        for t in TIERS:
            for k in KINDS:
                s.hit_bytes[t][k] = int(next(it))
        for k in KINDS:
            s.misses[k] = int(next(it))
        for k in KINDS:
            s.miss_bytes[k] = int(next(it))
        for name in ("negative_hits", "inner_errors", "writes", "write_bytes", "invalidations"):
            setattr(s, name, int(next(it)))
        for t in TIERS:
            s.evictions[t] = int(next(it))
        for name in (
            "corruptions",
            "promotions",
            "prefetches",
            "disk_write_failures",
            "not_admitted",
            "prefetch_hits",
            "peer_served",
            "peer_served_bytes",
            "peer_loads",
            "peer_fallbacks",
        ):
            setattr(s, name, int(next(it)))
        s.peer_latency_ms = [int(next(it)) for _ in LATENCY_BUCKETS_MS]
        s.fetch_latency_ms = [int(next(it)) for _ in LATENCY_BUCKETS_MS]
        for name in (
            "memory_used",
            "memory_capacity",
            "memory_entries",
            "disk_used",
            "disk_capacity",
            "disk_entries",
        ):
            setattr(s, name, int(next(it)))
        return s

    # -- export --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON- and msgpack-friendly dict, with the derived figures added."""
        d = dataclasses.asdict(self)
        d["hot_keys"] = [[k, c] for k, c in self.hot_keys]
        d["hit_rate"] = self.hit_rate()
        d["hit_rate_chunk"] = self.hit_rate("chunk")
        d["hit_rate_metadata"] = self.hit_rate("metadata")
        d["requests_saved"] = self.requests_saved
        d["bytes_saved"] = self.bytes_saved
        d["requests_sent"] = self.requests_sent
        d["fetch_latency_buckets_ms"] = [None if math.isinf(b) else b for b in LATENCY_BUCKETS_MS]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheStats:
        """Inverse of `to_dict` (derived figures are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["hot_keys"] = [(str(k), int(c)) for k, c in kwargs.get("hot_keys", [])]
        # msgpack (Dask's wire format) turns lists into tuples
        for hist in ("fetch_latency_ms", "peer_latency_ms"):
            if hist in kwargs:
                kwargs[hist] = [int(x) for x in kwargs[hist]]
                if len(kwargs[hist]) != len(LATENCY_BUCKETS_MS):
                    raise ValueError(f"{hist}: wrong number of buckets")
        for name in ("hits", "hit_bytes"):
            if name in kwargs:
                given = kwargs[name]
                kwargs[name] = {
                    t: {k: int((given.get(t) or {}).get(k, 0)) for k in KINDS} for t in TIERS
                }
        for name in ("misses", "miss_bytes"):
            if name in kwargs:
                kwargs[name] = {k: int(kwargs[name][k]) for k in KINDS}
        if "evictions" in kwargs:
            kwargs["evictions"] = {t: int(kwargs["evictions"].get(t, 0)) for t in TIERS}
        return cls(**kwargs)

    def _rows(self) -> list[tuple[str, str]]:
        mem_hits = self.total_hits(tier="memory")
        disk_hits = self.total_hits(tier="disk")
        peer_hits = self.total_hits(tier="peer")
        rows = [
            ("hit rate", f"{self.hit_rate():.1%}"),
            ("  chunks", f"{self.hit_rate('chunk'):.1%}"),
            ("  metadata", f"{self.hit_rate('metadata'):.1%}"),
            ("hits memory / disk / peer", f"{mem_hits} / {disk_hits} / {peer_hits}"),
            ("misses (requests sent)", str(self.requests_sent)),
            ("requests saved", str(self.requests_saved)),
            ("bytes saved", format_bytes(self.bytes_saved)),
            ("bytes fetched", format_bytes(sum(self.miss_bytes.values()))),
            (
                "memory used",
                f"{format_bytes(self.memory_used)} / {format_bytes(self.memory_capacity)} "
                f"({self.memory_entries} entries)",
            ),
        ]
        if self.disk_path is not None or self.disk_capacity:
            rows.append(
                (
                    "disk used",
                    f"{format_bytes(self.disk_used)} / {format_bytes(self.disk_capacity)} "
                    f"({self.disk_entries} entries)",
                )
            )
        if self.prefetches or self.prefetch_hits:
            rows.append(("read ahead (hits on it)", f"{self.prefetches} ({self.prefetch_hits})"))
        if self.peer_served or self.peer_loads or self.peer_fallbacks or peer_hits:
            rows.append(
                (
                    "peers: served / loads / fallbacks",
                    f"{self.peer_served} / {self.peer_loads} / {self.peer_fallbacks}",
                )
            )
        rows += [
            ("evictions memory / disk", f"{self.evictions['memory']} / {self.evictions['disk']}"),
            ("corrupt entries dropped", str(self.corruptions)),
            ("errors from store (not cached)", str(self.inner_errors)),
        ]
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        width = max(len(k) for k, _ in rows)
        lines = ["CacheStats"] + [f"  {k:<{width}}  {v}" for k, v in rows]
        if self.hot_keys:
            lines.append("  hot keys")
            lines += [f"    {c:>6}  {k}" for k, c in self.hot_keys[:10]]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k.strip())}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self._rows()
        )
        hot = "".join(
            f"<tr><td>{c}</td><td style='text-align:left'><code>{html.escape(k)}</code></td></tr>"
            for k, c in self.hot_keys[:10]
        )
        hot_table = (
            f"<details><summary>hot keys</summary><table>{hot}</table></details>" if hot else ""
        )
        return f"<div><strong>xarray-zcache</strong><table>{cells}</table>{hot_table}</div>"


def _op(a: Any, b: Any, sign: int) -> Any:
    if isinstance(a, dict):
        return {k: _op(a[k], b.get(k, 0), sign) for k in a}
    if isinstance(a, list):
        return [_op(x, y, sign) for x, y in zip(a, b, strict=True)]
    return a + sign * b


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
                hits={t: dict(v) for t, v in self._s.hits.items()},
                hit_bytes={t: dict(v) for t, v in self._s.hit_bytes.items()},
                misses=dict(self._s.misses),
                miss_bytes=dict(self._s.miss_bytes),
                evictions=dict(self._s.evictions),
                fetch_latency_ms=list(self._s.fetch_latency_ms),
                peer_latency_ms=list(self._s.peer_latency_ms),
                hot_keys=self._hot.top(),
                uptime=time.monotonic() - self.started,
            )
        for k, v in gauges.items():
            setattr(s, k, v)
        return s

    def reset(self) -> None:
        with self._lock:
            self._s = CacheStats()
            self._hot.clear()
            self.started = time.monotonic()
