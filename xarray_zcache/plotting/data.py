"""The data behind the figures: headline figures, data-source columns and table notes.

Everything here takes a `~xarray_zcache.distributed.clusterstats.ClusterStats` (or the
dict of ``zcache_cluster_stats``, turned into one by `ClusterStats.from_dict`) and the
aggregator's time series, and returns plain JSON-able data; no Bokeh, no I/O.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from dask.utils import format_bytes

from xarray_zcache.cache.stats import TIERS, CacheStats
from xarray_zcache.distributed.clusterstats import ClusterStats, as_cluster_stats

__all__ = [
    "CAPACITY_TIERS",
    "CLUSTER_LABEL",
    "EVICTION_TIERS",
    "NO_WORKERS_LABEL",
    "SOURCE_NAMES",
    "decoded_hit_rate",
    "evictions",
    "layout_key",
    "notes",
    "source_data",
    "summary",
    "summary_text",
    "worker_labels",
]

#: the data sources behind the figures (``ColumnDataSource`` objects named ``zcache-source-<name>``)
SOURCE_NAMES = ("series", "recent", "workers", "tiers", "hot_keys", "decisions")

#: label of the cluster-wide row in the per-tier breakdown
CLUSTER_LABEL = "cluster"
#: the single row shown while no worker has reported yet
NO_WORKERS_LABEL = "(no reports yet)"

#: the aggregator's cluster stats: the model, or its dict (``zcache_cluster_stats``)
Stats = ClusterStats | Mapping[str, Any]
#: the aggregator's time series (`~xarray_zcache.distributed.clusterstats.SeriesPoint`)
Series = Sequence[Mapping[str, Any]]
Columns = dict[str, list[Any]]

#: the tiers with a capacity (the peer tier is other workers' caches), as the page shows them
CAPACITY_TIERS = ("memory", "decoded", "disk")
#: the tiers that evict (`CacheStats.evictions` and ``decoded_evictions``)
EVICTION_TIERS = ("memory", "decoded", "disk")
#: the decoded tier's columns of the ``tiers`` source
_DECODED_COLUMNS = (
    "decoded_hits",
    "decoded_misses",
    "decoded_reads",
    "decoded_hit_rate",
    "decoded_text",
)


def worker_labels(stats: Stats) -> dict[str, str]:
    """One short, unique display label per worker, by address: used in every figure and table.

    See `xarray_zcache.distributed.dashboard.worker_labels` (the same labels).
    """
    return as_cluster_stats(stats).labels()


def summary(stats: Stats) -> dict[str, Any]:
    """The cluster's headline figures.

    Parameters
    ----------
    stats
        The aggregator's cluster stats.

    Returns
    -------
    dict
        ``workers``, ``hit_rate`` (0..1), ``hits_<tier>`` for each tier (memory,
        disk, peer), ``misses``, ``requests_saved``, ``bytes_saved``, ``memory_used``,
        ``memory_capacity``, ``decoded_hits``, ``decoded_misses``,
        ``decoded_hit_rate`` (0..1), ``decoded_used``, ``decoded_capacity``,
        ``disk_used``, ``disk_capacity``, ``disk_folders``, ``evictions_<tier>`` for
        each of `EVICTION_TIERS`, ``decisions``. Disk figures count each disk folder
        once, even when several workers of a host share it (and each reports it
        whole), when the reports
        say which folder each worker uses (``disk_path``; ``disk_folders`` is
        ``None`` otherwise, and the figures are the plain sums).
    """
    cs = as_cluster_stats(stats)
    total = cs.total
    disk_used, disk_capacity, folders = cs.disk_usage()
    return {
        "workers": len(cs.workers),
        "hit_rate": total.hit_rate(),
        **{f"hits_{tier}": total.total_hits(tier=tier) for tier in TIERS},
        "misses": total.total_misses(),
        "requests_saved": total.requests_saved,
        "bytes_saved": total.bytes_saved,
        "memory_used": total.memory_used,
        "memory_capacity": total.memory_capacity,
        "decoded_hits": total.decoded_hits,
        "decoded_misses": total.decoded_misses,
        "decoded_hit_rate": decoded_hit_rate(total),
        "decoded_used": total.decoded_used,
        "decoded_capacity": total.decoded_capacity,
        "disk_used": disk_used,
        "disk_capacity": disk_capacity,
        "disk_folders": folders,
        **{f"evictions_{tier}": evictions(total, tier) for tier in EVICTION_TIERS},
        "decisions": len(cs.decisions),
    }


def decoded_hit_rate(s: CacheStats) -> float:
    """Share of the decoded tier's reads it served without decoding (0.0 with none).

    The decoded tier sits above the byte tiers: each of its reads, hit or miss, was
    also counted by the byte tier that vouched for (or loaded) the encoded bytes, so
    its hits are a rate of their own, not a share of `CacheStats.hit_rate`.
    """
    reads = s.decoded_hits + s.decoded_misses
    return s.decoded_hits / reads if reads else 0.0


def evictions(s: CacheStats, tier: str) -> int:
    """Entries ``tier`` (one of `EVICTION_TIERS`) evicted to stay within its capacity."""
    if tier == "decoded":
        return s.decoded_evictions
    return int(s.evictions.get(tier, 0))


def summary_text(stats: Stats) -> str:
    """One line of headline figures, e.g. ``"cluster hit rate: 50.0% | 2 workers | ..."``.

    Parameters
    ----------
    stats
        The aggregator's cluster stats.

    Returns
    -------
    str
        Plain text (not HTML-escaped).
    """
    s = summary(stats)
    parts = [
        f"cluster hit rate: {s['hit_rate']:.1%}",
        f"{s['workers']} worker{'' if s['workers'] == 1 else 's'}",
        f"{s['requests_saved']} requests and {format_bytes(s['bytes_saved'])} saved",
        f"memory {format_bytes(s['memory_used'])} of {format_bytes(s['memory_capacity'])}",
    ]
    if s["decoded_capacity"] or s["decoded_hits"] or s["decoded_misses"]:
        parts.append(
            f"decoded {format_bytes(s['decoded_used'])} of "
            f"{format_bytes(s['decoded_capacity'])} (hit rate {s['decoded_hit_rate']:.1%})"
        )
    if s["disk_capacity"]:
        n = s["disk_folders"]
        folders = "" if n is None else f" ({n} folder{'' if n == 1 else 's'})"
        parts.append(
            f"disk {format_bytes(s['disk_used'])} of {format_bytes(s['disk_capacity'])}{folders}"
        )
    return " | ".join(parts)


def layout_key(stats: Stats) -> str:
    """What the shape of the layout depends on: the workers' labels, in order.

    A page built for one key can update its sources in place from `source_data`
    while the key stays the same; when it changes, the layout must be rebuilt.
    """
    return "\n".join(worker_labels(stats).values())


def _point(p: Mapping[str, Any], name: str) -> float:
    """A figure of a time series point (0 when an older aggregator did not record it)."""
    x = p.get(name)
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else 0.0


def _pct(used: int, capacity: int) -> float:
    return used / capacity if capacity > 0 else 0.0


def _pct_text(fraction: float) -> str:
    return "<0.1%" if 0 < fraction < 0.001 else f"{fraction:.1%}"


def _series_columns(points: Series) -> tuple[Columns, Columns]:
    """The ``series`` and ``recent`` sources: cumulative figures, and the hit rate in between."""
    hit_names = tuple(f"hits_{tier}" for tier in TIERS)
    counts = (*hit_names, "misses", "requests_saved", "workers")
    ser: Columns = {k: [] for k in ("time", "hit_rate", *counts, "bytes_saved", "bytes_saved_text")}
    for p in points:
        ser["time"].append(_point(p, "time") * 1000.0)
        ser["hit_rate"].append(_point(p, "hit_rate"))
        for k in counts:
            ser[k].append(int(_point(p, k)))
        saved = int(_point(p, "bytes_saved"))
        ser["bytes_saved"].append(saved)
        ser["bytes_saved_text"].append(format_bytes(saved))

    recent: Columns = {"time": [], "hit_rate": [], "reads": []}
    for i in range(1, len(points)):
        a, b = points[i - 1], points[i]
        hits = int(sum(_point(b, t) - _point(a, t) for t in hit_names))
        misses = int(_point(b, "misses") - _point(a, "misses"))
        if hits < 0 or misses < 0 or hits + misses == 0:
            continue  # no reads in between, or counters went back (a worker left, a clear)
        recent["time"].append(_point(b, "time") * 1000.0)
        recent["hit_rate"].append(hits / (hits + misses))
        recent["reads"].append(hits + misses)
    return ser, recent


def _capacity_text(tier: str, used: int, cap: int) -> str:
    if not cap:
        return f"{format_bytes(used)} (no {tier} tier)"
    return f"{format_bytes(used)} of {format_bytes(cap)} ({_pct_text(_pct(used, cap))})"


def _worker_columns(cs: ClusterStats, labels: Mapping[str, str]) -> Columns:
    """The ``workers`` source: memory, decoded and disk use and capacity of each worker."""
    cols: Columns = {"label": [], "address": []}
    for tier in CAPACITY_TIERS:
        for k in ("used", "capacity", "pct", "text"):
            cols[f"{tier}_{k}"] = []
    rows = [(label, addr, cs.workers[addr]) for addr, label in labels.items()]
    if not rows:
        rows = [(NO_WORKERS_LABEL, "", CacheStats())]
    for label, addr, s in rows:
        cols["label"].append(label)
        cols["address"].append(addr)
        for tier in CAPACITY_TIERS:
            used, cap = getattr(s, f"{tier}_used"), getattr(s, f"{tier}_capacity")
            cols[f"{tier}_used"].append(used)
            cols[f"{tier}_capacity"].append(cap)
            cols[f"{tier}_pct"].append(_pct(used, cap))
            cols[f"{tier}_text"].append(_capacity_text(tier, used, cap) if addr else "")
    return cols


def _tier_columns(cs: ClusterStats, labels: Mapping[str, str]) -> Columns:
    """The ``tiers`` source: reads by tier, decoded reads, evictions; per worker and cluster."""
    names = ("label", *TIERS, "miss", "negative", "hit_rate", "reads", *_DECODED_COLUMNS)
    cols: Columns = {k: [] for k in (*names, *(f"evictions_{t}" for t in EVICTION_TIERS))}
    rows = [(label, cs.workers[addr]) for addr, label in labels.items()]
    for label, s in [*rows, (CLUSTER_LABEL, cs.total)]:
        by_tier = {tier: s.total_hits(tier=tier) for tier in TIERS}
        by_tier["memory"] += s.negative_hits  # a known-missing key: served from memory
        cols["label"].append(label)
        for tier, n in by_tier.items():
            cols[tier].append(n)
        cols["miss"].append(s.total_misses())
        cols["negative"].append(s.negative_hits)
        cols["hit_rate"].append(s.hit_rate())
        cols["reads"].append(sum(by_tier.values()) + s.total_misses())
        rate = decoded_hit_rate(s)
        cols["decoded_hits"].append(s.decoded_hits)
        cols["decoded_misses"].append(s.decoded_misses)
        cols["decoded_reads"].append(s.decoded_hits + s.decoded_misses)
        cols["decoded_hit_rate"].append(rate)
        cols["decoded_text"].append(
            f"hit rate {_pct_text(rate)}" if s.decoded_hits + s.decoded_misses else "no reads"
        )
        for tier in EVICTION_TIERS:
            cols[f"evictions_{tier}"].append(evictions(s, tier))
    return cols


def source_data(stats: Stats, series: Series) -> dict[str, Columns]:
    """The columns of every figure's data source (plain, JSON-able lists).

    Parameters
    ----------
    stats
        The aggregator's cluster stats.
    series
        The aggregator's time series points, oldest first.

    Returns
    -------
    dict
        Source name (see `SOURCE_NAMES`) -> column name -> values. ``series``: the
        cumulative cluster figures over time (``time`` in epoch milliseconds);
        ``recent``: the hit rate between consecutive points that saw reads;
        ``workers``: one row per worker (memory/decoded/disk use and capacity:
        ``<tier>_used``, ``<tier>_capacity``, ``<tier>_pct``, ``<tier>_text``);
        ``tiers``: one row per worker plus the cluster (hits by tier, misses; the
        decoded tier's ``decoded_hits``, ``decoded_misses``, ``decoded_reads``,
        ``decoded_hit_rate``, ``decoded_text``; ``evictions_<tier>`` for each of
        `EVICTION_TIERS`);
        ``hot_keys``: the cluster's hottest keys (``rate``: reads/s across the
        cluster in the workers' latest report interval, ``peak``: the highest
        such rate the aggregator saw); ``decisions``: the latest promotion/warm
        decisions, newest first. Workers are named by `worker_labels` everywhere.
    """
    cs = as_cluster_stats(stats)
    labels = cs.labels()
    ser, recent = _series_columns(list(series))

    hot: Columns = {"key": [], "count": [], "rate": [], "peak": [], "workers": []}
    for h in cs.hot_keys:
        hot["key"].append(h["key"])
        hot["count"].append(h["count"])
        hot["rate"].append(h["rate"])
        hot["peak"].append(h["peak_rate"])
        hot["workers"].append(
            ", ".join(f"{labels.get(w, w)}: {tier}" for w, tier in sorted(h["workers"].items()))
        )

    dec: Columns = {"time": [], "action": [], "worker": [], "key": [], "rate": []}
    for d in reversed(cs.decisions):
        dec["time"].append(time.strftime("%H:%M:%S", time.localtime(d["time"])))
        dec["action"].append(d["action"])
        dec["worker"].append(labels.get(d["worker"], d["worker"]))
        dec["key"].append(d["key"])
        dec["rate"].append(d["rate"])

    return {
        "series": ser,
        "recent": recent,
        "workers": _worker_columns(cs, labels),
        "tiers": _tier_columns(cs, labels),
        "hot_keys": hot,
        "decisions": dec,
    }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def notes(stats: Stats) -> dict[str, str]:
    """What each table shows, in words, or why it is empty (HTML-escaped text).

    Parameters
    ----------
    stats
        The aggregator's cluster stats.

    Returns
    -------
    dict
        ``hot_keys`` and ``decisions`` -> the text of the note above that table
        (``zcache-note-<name>``).
    """
    cs = as_cluster_stats(stats)
    rule = (
        "the aggregator promotes a key a worker holds on disk only to memory once it is "
        f"read {cs.promotion_threshold:g}/s or more across the cluster"
    )
    if cs.hot_keys:
        hot_note = (
            f"The {_plural(len(cs.hot_keys), 'hottest key')}, by reads summed over the workers. "
            "Rate now: reads per second across the cluster in the workers' latest report "
            "interval (0 once reading stops); peak: the highest such rate seen. "
            f"{rule[0].upper()}{rule[1:]}."
        )
    else:
        hot_note = "None yet: no worker has reported a read through its cache."
    promotions = cs.total.promotions
    if cs.decisions:
        dec_note = (
            f"The aggregator's latest {_plural(len(cs.decisions), 'decision')}, newest first; "
            f"{rule}. The workers' caches counted {_plural(promotions, 'promotion')} in all "
            "(these and their own)."
        )
    elif promotions:
        dec_note = (
            "No decision of the aggregator yet, but the workers' caches counted "
            f"{_plural(promotions, 'promotion')} (disk to memory) of their own, for keys hot on "
            "one worker (its promotion threshold): those are counted, not listed here. "
            f"Cluster-wide, {rule}."
        )
    else:
        dec_note = f"None yet: {rule}."
    return {"hot_keys": html.escape(hot_note), "decisions": html.escape(dec_note)}
