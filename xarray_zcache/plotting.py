"""Bokeh figures of a cluster's caches, for the ``/zcache`` dashboard page and for notebooks.

Every function here takes plain data, the way the scheduler's aggregator
(`~xarray_zcache.distributed.ZCacheSchedulerPlugin`) hands it out, and returns
Bokeh models; nothing here does I/O. The two inputs are

``stats``
    the dict of ``ZCacheSchedulerPlugin.zcache_cluster_stats()``: ``workers``
    (address -> ``name``, ``host`` and the `~xarray_zcache.cache.stats.CacheStats`
    fields of ``CacheStats.to_dict()``), ``total`` (the same fields for the
    cluster), ``hot_keys`` and ``decisions``;
``series``
    the aggregator's time series (``ZCacheSchedulerPlugin.series``): one dict per
    point with ``time`` (epoch seconds), ``workers``, ``hit_rate``,
    ``hits_memory``, ``hits_disk``, ``misses``, ``bytes_saved``,
    ``requests_saved``, ``memory_used`` and ``disk_used``, cluster-wide and
    cumulative.

`source_data` turns them into the columns of every figure's data source (plain
JSON-able lists). The figures read named `~bokeh.models.ColumnDataSource`
objects (``zcache-source-<name>``), so a page can update them in place from
`source_data` without rebuilding the layout; `layout_key` tells when it must
rebuild instead (the set of workers changed).

Examples
--------
>>> from bokeh.io import output_notebook, show  # doctest: +SKIP
>>> from xarray_zcache import plotting
>>> from xarray_zcache.distributed.dashboard import snapshot  # doctest: +SKIP
>>> data = snapshot(client)  # doctest: +SKIP
>>> show(plotting.dashboard(data["cluster"], data["series"]))  # doctest: +SKIP
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from bokeh.layouts import column, row
from bokeh.models import (
    AdaptiveTicker,
    BasicTicker,
    ColumnDataSource,
    CustomJSTickFormatter,
    DataRange1d,
    FactorRange,
    HoverTool,
    LinearAxis,
    NumeralTickFormatter,
    Range1d,
    Text,
)
from bokeh.models.layouts import LayoutDOM
from bokeh.models.widgets.markups import Div
from bokeh.models.widgets.tables import DataTable, NumberFormatter, TableColumn
from bokeh.plotting import figure
from dask.utils import format_bytes

from xarray_zcache.distributed.dashboard import worker_labels as _worker_labels

__all__ = [
    "SOURCE_NAMES",
    "bytes_axis",
    "bytes_saved_figure",
    "capacity_figure",
    "dashboard",
    "decisions_table",
    "figures",
    "hit_rate_figure",
    "hot_keys_table",
    "layout_key",
    "make_sources",
    "notes",
    "panel",
    "source_data",
    "summary",
    "summary_text",
    "tier_figure",
    "worker_labels",
]

#: the data sources behind the figures (``ColumnDataSource`` objects named ``zcache-source-<name>``)
SOURCE_NAMES = ("series", "recent", "workers", "tiers", "hot_keys", "decisions")

#: label of the cluster-wide row in the per-tier breakdown
CLUSTER_LABEL = "cluster"
#: the single row shown while no worker has reported yet
NO_WORKERS_LABEL = "(no reports yet)"

COLORS = {
    "memory": "#2b83ba",
    "disk": "#abdda4",
    "peer": "#fdae61",
    "miss": "#d7191c",
    "capacity": "#e0e0e0",
    "requests": "#fdae61",
}

#: figures stretch to the width of the page (or notebook cell); this is the least they take
MIN_WIDTH = 360
#: every figure and table follows the width of its container
SIZING: Final = "stretch_width"
_TOOLS = "pan,wheel_zoom,box_zoom,reset,save"

Stats = Mapping[str, Any]
Series = Sequence[Mapping[str, Any]]
Columns = dict[str, list[Any]]


# -- data ----------------------------------------------------------------------------------------


def _num(value: Any) -> float:
    """A finite float (0.0 for missing, non-numeric or non-finite values)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) else 0.0


def _int(value: Any) -> int:
    return int(_num(value))


def _hits(s: Mapping[str, Any], tier: str) -> int:
    """Hits of one tier (all kinds) in a ``CacheStats.to_dict()`` dict."""
    by_kind = (s.get("hits") or {}).get(tier) or {}
    return sum(_int(v) for v in by_kind.values())


def _misses(s: Mapping[str, Any]) -> int:
    return sum(_int(v) for v in (s.get("misses") or {}).values())


def worker_labels(stats: Stats) -> dict[str, str]:
    """One short, unique display label per worker, by address: used in every figure and table.

    See `xarray_zcache.distributed.dashboard.worker_labels` (this is the same function).
    """
    return _worker_labels(stats.get("workers") or {})


def summary(stats: Stats) -> dict[str, Any]:
    """The cluster's headline figures.

    Parameters
    ----------
    stats
        The aggregator's cluster stats dict.

    Returns
    -------
    dict
        ``workers``, ``hit_rate`` (0..1), ``hits_memory``, ``hits_disk``,
        ``misses``, ``requests_saved``, ``bytes_saved``, ``memory_used``,
        ``memory_capacity``, ``disk_used``, ``disk_capacity``, ``disk_folders``,
        ``decisions``. Disk figures count each disk folder once, even when several
        workers of a host share it (and each reports it whole), when the reports
        say which folder each worker uses (``disk_path``; ``disk_folders`` is
        ``None`` otherwise, and the figures are the plain sums).
    """
    total: Mapping[str, Any] = stats.get("total") or {}
    disk_used, disk_capacity, folders = _disk_folders(stats)
    return {
        "workers": len(stats.get("workers") or {}),
        "hit_rate": _num(total.get("hit_rate")),
        "hits_memory": _hits(total, "memory"),
        "hits_disk": _hits(total, "disk"),
        "hits_peer": _hits(total, "peer"),
        "misses": _misses(total),
        "requests_saved": _int(total.get("requests_saved")),
        "bytes_saved": _int(total.get("bytes_saved")),
        "memory_used": _int(total.get("memory_used")),
        "memory_capacity": _int(total.get("memory_capacity")),
        "disk_used": disk_used,
        "disk_capacity": disk_capacity,
        "disk_folders": folders,
        "decisions": len(stats.get("decisions") or []),
    }


def _disk_folders(stats: Stats) -> tuple[int, int, int | None]:
    """Disk use and capacity counting each (host, folder) once, and the number of folders.

    The workers of one host share a disk folder by default, and each reports the
    whole folder: summing over workers would count it once per worker. When the
    workers' reports don't say which folder they use (no ``disk_path``), the
    cluster totals are returned as they are, and the number of folders as ``None``.
    """
    total: Mapping[str, Any] = stats.get("total") or {}
    workers: Mapping[str, Any] = stats.get("workers") or {}
    folders: dict[tuple[str, str], tuple[int, int]] = {}
    for addr, s in workers.items():
        s = s or {}
        path = s.get("disk_path")
        if not path:
            if _int(s.get("disk_capacity")):
                return _int(total.get("disk_used")), _int(total.get("disk_capacity")), None
            continue  # no disk tier
        where = (str(s.get("host") or addr), str(path))
        used, cap = folders.get(where, (0, 0))
        folders[where] = (
            max(used, _int(s.get("disk_used"))),
            max(cap, _int(s.get("disk_capacity"))),
        )
    return (
        sum(u for u, _ in folders.values()),
        sum(c for _, c in folders.values()),
        len(folders),
    )


def summary_text(stats: Stats) -> str:
    """One line of headline figures, e.g. ``"cluster hit rate: 50.0% | 2 workers | ..."``.

    Parameters
    ----------
    stats
        The aggregator's cluster stats dict.

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


def _clock(t: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(_num(t)))


def _pct(used: int, capacity: int) -> float:
    return used / capacity if capacity > 0 else 0.0


def _pct_text(fraction: float) -> str:
    return "<0.1%" if 0 < fraction < 0.001 else f"{fraction:.1%}"


def source_data(stats: Stats, series: Series) -> dict[str, Columns]:
    """The columns of every figure's data source (plain, JSON-able lists).

    Parameters
    ----------
    stats
        The aggregator's cluster stats dict.
    series
        The aggregator's time series points, oldest first.

    Returns
    -------
    dict
        Source name (see `SOURCE_NAMES`) -> column name -> values. ``series``: the
        cumulative cluster figures over time (``time`` in epoch milliseconds);
        ``recent``: the hit rate between consecutive points that saw reads;
        ``workers``: one row per worker (memory/disk use and capacity);
        ``tiers``: one row per worker plus the cluster (hits by tier, misses);
        ``hot_keys``: the cluster's hottest keys (``rate``: reads/s across the
        cluster in the workers' latest report interval, ``peak``: the highest
        such rate the aggregator saw); ``decisions``: the latest promotion/warm
        decisions, newest first. Workers are named by `worker_labels` everywhere.
    """
    points = list(series)
    ser: Columns = {
        k: []
        for k in (
            "time",
            "hit_rate",
            "hits_memory",
            "hits_disk",
            "misses",
            "bytes_saved",
            "bytes_saved_text",
            "requests_saved",
            "workers",
        )
    }
    for p in points:
        ser["time"].append(_num(p.get("time")) * 1000.0)
        ser["hit_rate"].append(_num(p.get("hit_rate")))
        for k in ("hits_memory", "hits_disk", "misses", "requests_saved", "workers"):
            ser[k].append(_int(p.get(k)))
        saved = _int(p.get("bytes_saved"))
        ser["bytes_saved"].append(saved)
        ser["bytes_saved_text"].append(format_bytes(saved))

    recent: Columns = {"time": [], "hit_rate": [], "reads": []}
    for i in range(1, len(points)):
        a, b = points[i - 1], points[i]
        tiers = ("hits_memory", "hits_disk", "hits_peer")
        hits = sum(_int(b.get(t)) for t in tiers) - sum(_int(a.get(t)) for t in tiers)
        misses = _int(b.get("misses")) - _int(a.get("misses"))
        if hits < 0 or misses < 0 or hits + misses == 0:
            continue  # no reads in between, or counters went back (a worker left, a clear)
        recent["time"].append(_num(b.get("time")) * 1000.0)
        recent["hit_rate"].append(hits / (hits + misses))
        recent["reads"].append(hits + misses)

    labels = worker_labels(stats)
    workers: Mapping[str, Any] = stats.get("workers") or {}
    wcols: Columns = {
        k: []
        for k in (
            "label",
            "address",
            "memory_used",
            "memory_capacity",
            "memory_pct",
            "memory_text",
            "disk_used",
            "disk_capacity",
            "disk_pct",
            "disk_text",
        )
    }
    tcols: Columns = {
        k: [] for k in ("label", "memory", "disk", "peer", "miss", "negative", "hit_rate", "reads")
    }

    def add_tier_row(label: str, s: Mapping[str, Any]) -> None:
        negative = _int(s.get("negative_hits"))
        memory, disk, miss = _hits(s, "memory") + negative, _hits(s, "disk"), _misses(s)
        peer = _hits(s, "peer")
        tcols["label"].append(label)
        tcols["memory"].append(memory)
        tcols["disk"].append(disk)
        tcols["peer"].append(peer)
        tcols["miss"].append(miss)
        tcols["negative"].append(negative)
        tcols["hit_rate"].append(_num(s.get("hit_rate")))
        tcols["reads"].append(memory + disk + peer + miss)

    for addr, label in labels.items():
        s = workers[addr] or {}
        wcols["label"].append(label)
        wcols["address"].append(addr)
        for tier in ("memory", "disk"):
            used, cap = _int(s.get(f"{tier}_used")), _int(s.get(f"{tier}_capacity"))
            wcols[f"{tier}_used"].append(used)
            wcols[f"{tier}_capacity"].append(cap)
            wcols[f"{tier}_pct"].append(_pct(used, cap))
            wcols[f"{tier}_text"].append(
                f"{format_bytes(used)} of {format_bytes(cap)} ({_pct_text(_pct(used, cap))})"
                if cap
                else f"{format_bytes(used)} (no {tier} tier)"
            )
        add_tier_row(label, s)
    if not labels:
        wcols["label"].append(NO_WORKERS_LABEL)
        wcols["address"].append("")
        for tier in ("memory", "disk"):
            wcols[f"{tier}_used"].append(0)
            wcols[f"{tier}_capacity"].append(0)
            wcols[f"{tier}_pct"].append(0.0)
            wcols[f"{tier}_text"].append("")
    add_tier_row(CLUSTER_LABEL, stats.get("total") or {})

    hot: Columns = {"key": [], "count": [], "rate": [], "peak": [], "workers": []}
    for h in stats.get("hot_keys") or []:
        holders: Mapping[str, Any] = h.get("workers") or {}
        hot["key"].append(str(h.get("key", "")))
        hot["count"].append(_int(h.get("count")))
        rate = _num(h.get("rate"))
        hot["rate"].append(rate)
        hot["peak"].append(max(rate, _num(h.get("peak_rate"))))
        hot["workers"].append(
            ", ".join(f"{labels.get(w, w)}: {tier}" for w, tier in sorted(holders.items()))
        )

    dec: Columns = {"time": [], "action": [], "worker": [], "key": [], "rate": []}
    for d in reversed(list(stats.get("decisions") or [])):
        w = str(d.get("worker", ""))
        dec["time"].append(_clock(d.get("time")))
        dec["action"].append(str(d.get("action", "")))
        dec["worker"].append(labels.get(w, w))
        dec["key"].append(str(d.get("key", "")))
        dec["rate"].append(_num(d.get("rate")))

    return {
        "series": ser,
        "recent": recent,
        "workers": wcols,
        "tiers": tcols,
        "hot_keys": hot,
        "decisions": dec,
    }


def make_sources(stats: Stats, series: Series) -> dict[str, ColumnDataSource]:
    """Named data sources (``zcache-source-<name>``) holding `source_data`.

    Parameters
    ----------
    stats
        The aggregator's cluster stats dict.
    series
        The aggregator's time series points, oldest first.

    Returns
    -------
    dict
        Source name -> `~bokeh.models.ColumnDataSource`.
    """
    return {
        name: ColumnDataSource(data=cols, name=f"zcache-source-{name}")
        for name, cols in source_data(stats, series).items()
    }


# -- figures -------------------------------------------------------------------------------------

#: byte axes tick at round binary values: 1, 2, 4 ... 512 times a power of 1024
#: (0, 2 MiB, 4 MiB, 6 MiB; 0, 128 MiB, 256 MiB), never at 1.9 or 190.7 MiB
BINARY_TICKS: dict[str, Any] = {
    "base": 1024,
    "mantissas": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
    "min_interval": 1,
}

# each tick in the largest binary unit it reaches: 0, 512 KiB, 1 MiB, 1.5 MiB
_BYTES_JS = """
const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
if (tick === 0) { return "0"; }
let i = 0;
while (i < units.length - 1 && Math.abs(tick) >= Math.pow(1024, i + 1)) { i += 1; }
const value = Math.round((tick / Math.pow(1024, i)) * 100) / 100;
return String(value) + " " + units[i];
"""


def bytes_axis(axis: Any) -> None:
    """Make ``axis`` (a Bokeh axis, or a splattable list of them) a byte axis with binary ticks.

    Ticks fall at round binary values (`BINARY_TICKS`) and read ``0``, ``2 MiB``,
    ``4 MiB``...; ``1.5 GiB`` when a tick is not a whole number of its unit.
    """
    axis.ticker = AdaptiveTicker(**BINARY_TICKS)
    axis.formatter = CustomJSTickFormatter(code=_BYTES_JS)


def _bar_height(rows: int) -> int:
    return max(150, 70 + 32 * rows)


def hit_rate_figure(series: ColumnDataSource, recent: ColumnDataSource) -> figure:
    """Cluster hit rate over time: cumulative (line) and per report interval (dots).

    Parameters
    ----------
    series
        The ``series`` source of `make_sources`.
    recent
        The ``recent`` source of `make_sources`.

    Returns
    -------
    bokeh.plotting.figure
    """
    p = figure(
        title="Cluster hit rate over time",
        x_axis_type="datetime",
        sizing_mode=SIZING,
        min_width=MIN_WIDTH,
        height=300,
        y_range=Range1d(start=0, end=1.05),
        tools=_TOOLS,
        name="zcache-hit-rate",
    )
    line = p.line(
        "time", "hit_rate", source=series, line_width=2, color=COLORS["memory"], legend_label="all"
    )
    dots = p.scatter(
        "time",
        "hit_rate",
        source=recent,
        size=6,
        color=COLORS["requests"],
        legend_label="since previous point",
    )
    p.yaxis.formatter = NumeralTickFormatter(format="0%")
    p.yaxis.axis_label = "reads served by the cache"
    p.legend.location = "top_left"
    p.legend.click_policy = "hide"
    p.add_tools(
        HoverTool(
            renderers=[line],
            tooltips=[("time", "@time{%H:%M:%S}"), ("hit rate", "@hit_rate{0.0%}")],
            formatters={"@time": "datetime"},
            mode="vline",
        ),
        HoverTool(
            renderers=[dots],
            tooltips=[("hit rate", "@hit_rate{0.0%}"), ("reads", "@reads")],
        ),
    )
    return p


def bytes_saved_figure(series: ColumnDataSource) -> figure:
    """Bytes (left axis) and requests (right axis) the caches saved, over time.

    Parameters
    ----------
    series
        The ``series`` source of `make_sources`.

    Returns
    -------
    bokeh.plotting.figure
    """
    p = figure(
        title="Saved: bytes not downloaded, requests not sent",
        x_axis_type="datetime",
        sizing_mode=SIZING,
        min_width=MIN_WIDTH,
        height=300,
        tools=_TOOLS,
        name="zcache-saved",
    )
    nbytes = p.line(
        "time",
        "bytes_saved",
        source=series,
        line_width=2,
        color=COLORS["memory"],
        legend_label="bytes",
    )
    p.y_range = DataRange1d(renderers=[nbytes], start=0)
    requests_range = DataRange1d(start=0)
    p.extra_y_ranges = {"requests": requests_range}
    requests = p.line(
        "time",
        "requests_saved",
        source=series,
        line_width=2,
        line_dash="dashed",
        color=COLORS["requests"],
        legend_label="requests",
        y_range_name="requests",
    )
    requests_range.renderers = [requests]
    bytes_axis(p.yaxis)
    p.yaxis.axis_label = "bytes"
    requests_axis: Any = LinearAxis(y_range_name="requests", axis_label="requests")
    requests_axis.formatter = NumeralTickFormatter(format="0,0")
    requests_axis.ticker = BasicTicker(min_interval=1)
    p.add_layout(requests_axis, "right")
    p.legend.location = "top_left"
    p.add_tools(
        HoverTool(
            renderers=[nbytes],
            tooltips=[
                ("time", "@time{%H:%M:%S}"),
                ("bytes saved", "@bytes_saved_text"),
                ("requests saved", "@requests_saved"),
            ],
            formatters={"@time": "datetime"},
            mode="vline",
        )
    )
    return p


def capacity_figure(workers: ColumnDataSource, tier: str) -> figure:
    """Use vs capacity of one tier (``"memory"`` or ``"disk"``) on each worker.

    Parameters
    ----------
    workers
        The ``workers`` source of `make_sources`.
    tier
        ``"memory"`` or ``"disk"``.

    Returns
    -------
    bokeh.plotting.figure
    """
    if tier not in ("memory", "disk"):
        raise ValueError(f"tier must be 'memory' or 'disk', not {tier!r}")
    labels = list(workers.data["label"])
    shade = "blue" if tier == "memory" else "green"
    p = figure(
        title=f"{tier.capitalize()} tier per worker: used ({shade}) of capacity (grey)",
        y_range=FactorRange(factors=list(reversed(labels))),
        x_range=DataRange1d(start=0),
        sizing_mode=SIZING,
        min_width=MIN_WIDTH,
        height=_bar_height(len(labels)),
        tools="save",
        toolbar_location=None,
        name=f"zcache-{tier}",
    )
    p.hbar(
        y="label",
        right=f"{tier}_capacity",
        height=0.75,
        source=workers,
        color=COLORS["capacity"],
    )
    used = p.hbar(
        y="label",
        right=f"{tier}_used",
        height=0.45,
        source=workers,
        color=COLORS[tier],
    )
    words = Text(  # the figures in words: a few kB in a GB tier is no visible bar
        x=0,
        y="label",
        text=f"{tier}_text",
        x_offset=6,
        text_baseline="middle",
        text_font_size="12px",
        text_color="#222222",
        background_fill_color="white",
        background_fill_alpha=0.75,
    )
    p.add_glyph(workers, words)
    bytes_axis(p.xaxis)
    p.ygrid.grid_line_color = None
    p.add_tools(
        HoverTool(
            renderers=[used],
            tooltips=[
                ("worker", "@label"),
                ("address", "@address"),
                (tier, f"@{tier}_text"),
                ("full", f"@{tier}_pct{{0.0%}}"),
            ],
        )
    )
    return p


def tier_figure(tiers: ColumnDataSource) -> figure:
    """Where reads were served from, per worker and cluster-wide: memory, disk, or S3.

    Parameters
    ----------
    tiers
        The ``tiers`` source of `make_sources`.

    Returns
    -------
    bokeh.plotting.figure
    """
    labels = list(tiers.data["label"])
    p = figure(
        title="Reads by tier (misses went to the store)",
        y_range=FactorRange(factors=list(reversed(labels))),
        x_range=DataRange1d(start=0),
        sizing_mode=SIZING,
        min_width=MIN_WIDTH,
        height=_bar_height(len(labels)) + 30,
        tools="save",
        toolbar_location=None,
        name="zcache-tiers",
    )
    bars = p.hbar_stack(
        ["memory", "disk", "peer", "miss"],
        y="label",
        height=0.7,
        source=tiers,
        color=[COLORS["memory"], COLORS["disk"], COLORS["peer"], COLORS["miss"]],
        legend_label=["memory hits", "disk hits", "peer hits", "misses"],
    )
    p.legend.location = "top_center"
    p.legend.orientation = "horizontal"
    p.add_layout(p.legend[0], "below")
    p.ygrid.grid_line_color = None
    p.xaxis.axis_label = "reads"
    p.xaxis.ticker = BasicTicker(min_interval=1)  # whole reads
    p.xaxis.formatter = NumeralTickFormatter(format="0,0")
    p.add_tools(
        HoverTool(
            renderers=list(bars),
            tooltips=[
                ("", "@label"),
                ("memory hits", "@memory (@negative known-missing)"),
                ("disk hits", "@disk"),
                ("peer hits (owner had it)", "@peer"),
                ("misses", "@miss"),
                ("hit rate", "@hit_rate{0.0%}"),
            ],
        )
    )
    return p


#: the tables, and the note above each (``zcache-table-<name>``, ``zcache-note-<name>``)
TABLE_NAMES = ("hot_keys", "decisions")


def hot_keys_table(hot_keys: ColumnDataSource) -> DataTable:
    """The cluster's hottest keys: reads, cluster read rate now and at peak, who holds them where.

    Parameters
    ----------
    hot_keys
        The ``hot_keys`` source of `make_sources`.

    Returns
    -------
    bokeh.models.DataTable
        Hidden while there are no hot keys (`notes` says so instead).
    """
    rate = NumberFormatter(format="0.00")
    return DataTable(
        source=hot_keys,
        columns=[
            TableColumn(field="count", title="reads", width=60),
            TableColumn(field="rate", title="rate now (/s)", width=90, formatter=rate),
            TableColumn(field="peak", title="peak (/s)", width=80, formatter=rate),
            TableColumn(field="key", title="key", width=560),
            TableColumn(field="workers", title="held by (tier)", width=260),
        ],
        sizing_mode=SIZING,
        min_width=MIN_WIDTH,
        autosize_mode="fit_columns",
        height=260,
        index_position=None,
        visible=bool(hot_keys.data["key"]),
        name="zcache-table-hot_keys",
    )


def decisions_table(decisions: ColumnDataSource) -> DataTable:
    """The aggregator's latest promotion and warm decisions, newest first.

    Parameters
    ----------
    decisions
        The ``decisions`` source of `make_sources`.

    Returns
    -------
    bokeh.models.DataTable
        Hidden while the aggregator made no decision (`notes` says so instead).
    """
    return DataTable(
        source=decisions,
        columns=[
            TableColumn(field="time", title="time", width=70),
            TableColumn(field="action", title="action", width=70),
            TableColumn(field="worker", title="worker", width=150),
            TableColumn(
                field="rate",
                title="cluster rate (/s)",
                width=110,
                formatter=NumberFormatter(format="0.00"),
            ),
            TableColumn(field="key", title="key", width=600),
        ],
        sizing_mode=SIZING,
        min_width=MIN_WIDTH,
        autosize_mode="fit_columns",
        height=220,
        index_position=None,
        visible=bool(decisions.data["key"]),
        name="zcache-table-decisions",
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def notes(stats: Stats) -> dict[str, str]:
    """What each table shows, in words, or why it is empty (HTML-escaped text).

    Parameters
    ----------
    stats
        The aggregator's cluster stats dict.

    Returns
    -------
    dict
        ``hot_keys`` and ``decisions`` -> the text of the note above that table
        (``zcache-note-<name>``).
    """
    threshold = _num(stats.get("promotion_threshold")) or 1.0
    rule = (
        "the aggregator promotes a key a worker holds on disk only to memory once it is "
        f"read {threshold:g}/s or more across the cluster"
    )
    hot = list(stats.get("hot_keys") or [])
    if hot:
        hot_note = (
            f"The {_plural(len(hot), 'hottest key')}, by reads summed over the workers. "
            "Rate now: reads per second across the cluster in the workers' latest report "
            "interval (0 once reading stops); peak: the highest such rate seen. "
            f"{rule[0].upper()}{rule[1:]}."
        )
    else:
        hot_note = "None yet: no worker has reported a read through its cache."
    decisions = list(stats.get("decisions") or [])
    promotions = _int((stats.get("total") or {}).get("promotions"))
    if decisions:
        dec_note = (
            f"The aggregator's latest {_plural(len(decisions), 'decision')}, newest first; "
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


def _note(name: str, text: str) -> Div:
    return Div(
        text=text,
        sizing_mode=SIZING,
        styles={"color": "#444", "font-size": "13px"},
        name=f"zcache-note-{name}",
    )


def _heading(text: str) -> Div:
    return Div(text=f"<h3 style='margin:12px 0 0 0'>{html.escape(text)}</h3>", sizing_mode=SIZING)


def _with_note(name: str, table: DataTable, stats: Stats) -> LayoutDOM:
    return column(_note(name, notes(stats)[name]), table, sizing_mode=SIZING)


def figures(stats: Stats, series: Series) -> dict[str, LayoutDOM]:
    """Every figure and table, on shared data sources.

    Parameters
    ----------
    stats
        The aggregator's cluster stats dict.
    series
        The aggregator's time series points, oldest first.

    Returns
    -------
    dict
        ``hit_rate``, ``saved``, ``memory``, ``disk``, ``tiers``, ``hot_keys``,
        ``decisions`` -> Bokeh model (the two tables with their `notes` above
        them). They share data sources: show them together (in one layout), or
        use `panel` for one on its own.
    """
    src = make_sources(stats, series)
    return {
        "hit_rate": hit_rate_figure(src["series"], src["recent"]),
        "saved": bytes_saved_figure(src["series"]),
        "memory": capacity_figure(src["workers"], "memory"),
        "disk": capacity_figure(src["workers"], "disk"),
        "tiers": tier_figure(src["tiers"]),
        "hot_keys": _with_note("hot_keys", hot_keys_table(src["hot_keys"]), stats),
        "decisions": _with_note("decisions", decisions_table(src["decisions"]), stats),
    }


def panel(name: str, stats: Stats, series: Series) -> LayoutDOM:
    """One figure or table of `figures`, on data sources of its own.

    Bokeh models belong to one document at a time, so figures sharing data
    sources can't be shown separately (``bokeh.io.show`` each in a notebook
    cell); panels can.

    Parameters
    ----------
    name
        ``"hit_rate"``, ``"saved"``, ``"memory"``, ``"disk"``, ``"tiers"``,
        ``"hot_keys"`` or ``"decisions"``.
    stats
        The aggregator's cluster stats dict.
    series
        The aggregator's time series points, oldest first.

    Returns
    -------
    bokeh.models.LayoutDOM
    """
    builders: dict[str, Any] = {
        "hit_rate": lambda s: hit_rate_figure(s["series"], s["recent"]),
        "saved": lambda s: bytes_saved_figure(s["series"]),
        "memory": lambda s: capacity_figure(s["workers"], "memory"),
        "disk": lambda s: capacity_figure(s["workers"], "disk"),
        "tiers": lambda s: tier_figure(s["tiers"]),
        "hot_keys": lambda s: _with_note("hot_keys", hot_keys_table(s["hot_keys"]), stats),
        "decisions": lambda s: _with_note("decisions", decisions_table(s["decisions"]), stats),
    }
    if name not in builders:
        raise ValueError(f"unknown panel {name!r}; expected one of {sorted(builders)}")
    built: LayoutDOM = builders[name](make_sources(stats, series))
    return built


def _row(*children: LayoutDOM) -> LayoutDOM:
    """Side by side while there is room (`MIN_WIDTH` each), one under the other when not."""
    return row(*children, sizing_mode=SIZING, styles={"flex-wrap": "wrap"})


def dashboard(stats: Stats, series: Series, *, with_summary: bool = True) -> LayoutDOM:
    """The whole dashboard as one layout (what ``/zcache`` shows), as wide as its container.

    Parameters
    ----------
    stats
        The aggregator's cluster stats dict.
    series
        The aggregator's time series points, oldest first.
    with_summary
        Start with a line of headline figures (`summary_text`); the web page shows
        its own, as plain HTML, and leaves it out.

    Returns
    -------
    bokeh.models.LayoutDOM
    """
    f = figures(stats, series)
    parts: list[LayoutDOM] = []
    if with_summary:
        parts.append(
            Div(
                text=f"<b>{html.escape(summary_text(stats))}</b>",
                sizing_mode=SIZING,
                name="zcache-summary",
            )
        )
    parts += [
        _row(f["hit_rate"], f["saved"]),
        _row(f["tiers"], column(f["memory"], f["disk"], sizing_mode=SIZING, min_width=MIN_WIDTH)),
        _heading("Hot keys"),
        f["hot_keys"],
        _heading("Promotion decisions"),
        f["decisions"],
    ]
    return column(*parts, sizing_mode=SIZING, name="zcache-dashboard")
