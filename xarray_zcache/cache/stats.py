"""Cache statistics: the immutable snapshot `CacheStats` (how its fields combine and
travel, and its text and HTML forms); the live counters are `xarray_zcache.cache.recorder`."""

from __future__ import annotations

import dataclasses
import html
import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

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
from xarray_zcache.cache.units import format_bytes

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
    "Path",
]


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
        return _text_rows(self)

    def __str__(self) -> str:
        return _as_text(self)

    def _repr_html_(self) -> str:
        return _as_html(self)


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


# -- the text and HTML forms (``str``, notebooks) ----------------------------------------


def _text_rows(stats: CacheStats) -> list[tuple[str, str]]:
    """The (label, value) rows of the text and HTML forms."""
    mem_hits = stats.total_hits(tier="memory")
    disk_hits = stats.total_hits(tier="disk")
    peer_hits = stats.total_hits(tier="peer")
    out = [
        ("hit rate", f"{stats.hit_rate():.1%}"),
        ("  chunks", f"{stats.hit_rate('chunk'):.1%}"),
        ("  metadata", f"{stats.hit_rate('metadata'):.1%}"),
        ("hits memory / disk / peer", f"{mem_hits} / {disk_hits} / {peer_hits}"),
        ("misses (requests sent)", str(stats.requests_sent)),
        ("requests saved", str(stats.requests_saved)),
        ("bytes saved", format_bytes(stats.bytes_saved)),
        ("bytes fetched", format_bytes(sum(stats.miss_bytes.values()))),
        (
            "memory used",
            f"{format_bytes(stats.memory_used)} / {format_bytes(stats.memory_capacity)} "
            f"({stats.memory_entries} entries)",
        ),
    ]
    if stats.decoded_capacity or stats.decoded_hits or stats.decoded_misses:
        out.append(
            (
                "decoded used (hits / misses)",
                f"{format_bytes(stats.decoded_used)} / {format_bytes(stats.decoded_capacity)} "
                f"({stats.decoded_entries} arrays; {stats.decoded_hits} / "
                f"{stats.decoded_misses})",
            )
        )
    if stats.disk_path is not None or stats.disk_capacity:
        out.append(
            (
                "disk used",
                f"{format_bytes(stats.disk_used)} / {format_bytes(stats.disk_capacity)} "
                f"({stats.disk_entries} entries)",
            )
        )
    if stats.prefetches or stats.prefetch_hits:
        out.append(("read ahead (hits on it)", f"{stats.prefetches} ({stats.prefetch_hits})"))
    if stats.peer_served or stats.peer_loads or stats.peer_fallbacks or peer_hits:
        out.append(
            (
                "peers: served / loads / fallbacks",
                f"{stats.peer_served} / {stats.peer_loads} / {stats.peer_fallbacks}",
            )
        )
    if stats.validations or stats.validation_errors:
        out.append(
            (
                "validations (listings, changed, failed)",
                f"{stats.validations} ({stats.validation_requests}, "
                f"{stats.validation_changes}, {stats.validation_errors})",
            )
        )
    out += [
        ("evictions memory / disk", f"{stats.evictions['memory']} / {stats.evictions['disk']}"),
        ("corrupt entries dropped", str(stats.corruptions)),
        ("errors from store (not cached)", str(stats.inner_errors)),
    ]
    return out


def _as_text(stats: CacheStats) -> str:
    """``str(stats)``: an aligned table, then the hot keys."""
    table = _text_rows(stats)
    width = max(len(k) for k, _ in table)
    lines = ["CacheStats"] + [f"  {k:<{width}}  {v}" for k, v in table]
    if stats.hot_keys:
        lines.append("  hot keys")
        lines += [f"    {c:>6}  {k}" for k, c in stats.hot_keys[:10]]
    return "\n".join(lines)


def _as_html(stats: CacheStats) -> str:
    """``stats._repr_html_()``: the table of the notebook view."""
    cells = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k.strip())}</th>"
        f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in _text_rows(stats)
    )
    hot = "".join(
        f"<tr><td>{c}</td><td style='text-align:left'><code>{html.escape(k)}</code></td></tr>"
        for k, c in stats.hot_keys[:10]
    )
    hot_table = f"<details><summary>hot keys</summary><table>{hot}</table></details>" if hot else ""
    return f"<div><strong>xarray-zcache</strong><table>{cells}</table>{hot_table}</div>"
