"""Cache statistics: live thread-safe counters and immutable snapshots (`CacheStats`)."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from xarray_zcache.cache import stats_text
from xarray_zcache.cache.stats_fields import (
    COUNTER,
    KINDS,
    LATENCY_BUCKETS_MS,
    MAX,
    SAME,
    SUM,
    TIERS,
    TOP,
    Path,
    _buckets,
    _clone,
    _combine_of,
    _gauge,
    _op,
    _reader,
    _tiered,
    _wire_paths,
    _zeros,
)

__all__ = [
    "COUNTER",
    "KINDS",
    "LATENCY_BUCKETS_MS",
    "MAX",
    "SAME",
    "SUM",
    "TIERS",
    "TOP",
    "CacheStats",
    "HotKeys",
    "Path",
    "StatsRecorder",
]


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


@dataclasses.dataclass
class CacheStats:
    """A snapshot of a cache's counters and gauges.

    Counters (hits, misses, bytes, ...) are per kind (``"metadata"``, ``"chunk"``)
    and, for hits, per tier (`TIERS`). A *hit* is a read served without asking the
    inner store (S3); a *miss* is a read that asked it. Negative hits (a metadata key
    known to be missing) count as requests saved.

    Snapshots add (``a + b``: totals over caches or workers) and subtract
    (``b - a``: what happened between two snapshots; gauges keep ``b``'s values).

    The dataclass fields are the whole model: the compact wire form a Dask worker
    sends (`to_vector`, `WIRE_PATHS`), the plain dict (`to_dict`), the arithmetic
    and the scheduler's totals are all derived from them, so a new field needs no
    other edit. Every integer of a snapshot is on the wire; fields are counters
    unless their metadata says otherwise (`SUM`, `MAX`, `SAME`, `TOP` gauges).
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
    peer_latency_ms: list[int] = dataclasses.field(default_factory=_buckets)
    # validation against the source's versions (see cache/freshness.py): units validated,
    # listing requests they sent, objects found changed (dropped), validations that failed
    validations: int = 0
    validation_requests: int = 0
    validation_changes: int = 0
    validation_errors: int = 0
    disk_write_failures: int = 0
    not_admitted: int = 0
    fetch_latency_ms: list[int] = dataclasses.field(default_factory=_buckets)
    # the decoded tier (arrays above the byte tiers, xarray backend): reads of a chunk
    # served without decoding, reads that decoded, arrays evicted. A decoded hit sends
    # nothing to the source: the byte tier that vouched for its encoded bytes counted
    # its own hit (or, if it had to load them, its miss) as for any read
    decoded_hits: int = 0
    decoded_misses: int = 0
    decoded_evictions: int = 0
    # gauges
    memory_used: int = _gauge(SUM)
    memory_capacity: int = _gauge(SUM)
    memory_entries: int = _gauge(SUM)
    memory_entry_overhead: int = _gauge(MAX)
    decoded_used: int = _gauge(SUM)
    decoded_capacity: int = _gauge(SUM)
    decoded_entries: int = _gauge(SUM)
    disk_used: int = _gauge(SUM)
    disk_capacity: int = _gauge(SUM)
    disk_entries: int = _gauge(SUM)
    disk_path: str | None = _gauge(SAME, None)
    hot_keys: list[tuple[str, int]] = dataclasses.field(
        default_factory=list, metadata={"combine": TOP}
    )
    uptime: float = _gauge(MAX, 0.0)

    #: the numbers on the wire, in order: every integer of a default snapshot, by path
    #: (``("hits", "memory", "chunk")``, ..., ``("fetch_latency_ms", 12)``, ...)
    WIRE_PATHS: ClassVar[tuple[Path, ...]]
    #: the same, as dotted names (``"hits.memory.chunk"``)
    VECTOR_FIELDS: ClassVar[tuple[str, ...]]
    #: how each number of the wire form combines (`COUNTER`, `SUM` or `MAX`)
    WIRE_COMBINE: ClassVar[tuple[str, ...]]

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

    def _combine(self, other: CacheStats, sign: int) -> CacheStats:
        """Counters: ``self + sign * other``. Gauges: combined for ``+``, self's for ``-``."""
        out = CacheStats()
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            combine = _combine_of(f)
            if combine == COUNTER:
                value = _op(a, b, sign)
            elif sign < 0:
                value = _clone(a)
            elif combine == TOP:
                merged: Counter[str] = Counter(dict(a))
                merged.update(dict(b))
                value = merged.most_common(max(len(a), len(b)))
            elif combine == SAME:
                value = a if a == b else None
            elif combine == MAX:
                value = max(a, b)
            else:
                value = a + b
            setattr(out, f.name, value)
        return out

    def __add__(self, other: CacheStats) -> CacheStats:
        return self._combine(other, +1)

    def __sub__(self, other: CacheStats) -> CacheStats:
        return self._combine(other, -1)

    # -- compact wire form ---------------------------------------------------------------------

    @classmethod
    def wire_index(cls, name: str) -> int:
        """The position of a number in the wire vector, by dotted name (``"disk_used"``).

        Raises
        ------
        KeyError
            If ``name`` is not one of `VECTOR_FIELDS`.
        """
        try:
            return _WIRE_INDEX[name]
        except KeyError:
            raise KeyError(f"not a field of the stats vector: {name!r}") from None

    def to_vector(self) -> list[int]:
        """The numbers of `WIRE_PATHS`, in order: what a Dask worker sends to the scheduler.

        Small, fast to pack and summable element by element.
        """
        out: list[int] = []
        for name, read in _WIRE_READERS:
            out += read(getattr(self, name))
        return out

    @classmethod
    def from_vector(cls, vec: list[int] | tuple[int, ...]) -> CacheStats:
        """Inverse of `to_vector`.

        Raises
        ------
        ValueError
            If ``vec`` is not a sequence of ``len(WIRE_PATHS)`` numbers.
        """
        if len(vec) != len(cls.WIRE_PATHS) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in vec
        ):
            raise ValueError(
                f"stats vector: expected {len(cls.WIRE_PATHS)} numbers, got {len(vec)} items"
            )
        s = cls()
        for path, x in zip(cls.WIRE_PATHS, vec, strict=True):
            s._set(path, int(x))
        return s

    def _set(self, path: Path, value: int) -> None:
        if len(path) == 1:
            setattr(self, str(path[0]), value)
            return
        box: Any = getattr(self, str(path[0]))
        for k in path[1:-1]:
            box = box[k]
        box[path[-1]] = value

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
    def from_dict(cls, d: Mapping[str, Any]) -> CacheStats:
        """Inverse of `to_dict`; derived figures are ignored, missing numbers are 0.

        Dicts of an older version (without the ``"peer"`` tier, say) read fine; lists
        may be tuples (msgpack, Dask's wire format, makes them so).

        Raises
        ------
        ValueError
            If a number is not a number, or a histogram has the wrong number of buckets.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"stats must be a dict, got {type(d).__name__}")
        s = cls()
        for path in cls.WIRE_PATHS:
            value: Any = d
            for k in path:
                if isinstance(value, Mapping):
                    value = value.get(k)
                elif isinstance(value, list | tuple):
                    if len(value) != len(getattr(s, str(path[0]))):
                        raise ValueError(f"{path[0]}: wrong number of buckets ({len(value)})")
                    value = value[int(k)]
                else:
                    value = None
                if value is None:
                    break
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                name = ".".join(map(str, path))
                raise ValueError(f"stats field {name} must be a number, not {value!r}")
            s._set(path, int(value))
        if d.get("disk_path") is not None:
            s.disk_path = str(d["disk_path"])
        s.hot_keys = [(str(k), int(c)) for k, c in d.get("hot_keys") or []]
        uptime = d.get("uptime")
        if isinstance(uptime, int | float) and not isinstance(uptime, bool):
            s.uptime = float(uptime)
        return s

    def _rows(self) -> list[tuple[str, str]]:
        return stats_text.rows(self)

    def __str__(self) -> str:
        return stats_text.as_text(self)

    def _repr_html_(self) -> str:
        return stats_text.as_html(self)


def _derive_wire_form() -> None:
    default = CacheStats()
    paths: list[Path] = []
    combine: list[str] = []
    for f in dataclasses.fields(CacheStats):
        found = list(_wire_paths(getattr(default, f.name), (f.name,)))
        if found and _combine_of(f) not in (COUNTER, SUM, MAX):
            raise TypeError(f"CacheStats.{f.name}: numbers on the wire must be summable or max")
        paths += found
        combine += [_combine_of(f)] * len(found)
        if found:
            _WIRE_READERS.append((f.name, _reader([p[1:] for p in found])))
    CacheStats.WIRE_PATHS = tuple(paths)
    CacheStats.VECTOR_FIELDS = tuple(".".join(map(str, p)) for p in paths)
    CacheStats.WIRE_COMBINE = tuple(combine)
    _WIRE_INDEX.update({name: i for i, name in enumerate(CacheStats.VECTOR_FIELDS)})


_WIRE_INDEX: dict[str, int] = {}
_WIRE_READERS: list[tuple[str, Callable[[Any], list[int]]]] = []
_derive_wire_form()


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
