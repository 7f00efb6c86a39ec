"""The Bokeh figures and tables of the ``/zcache`` page, each drawn from named data sources.

Each function takes the `~bokeh.models.ColumnDataSource` objects of
`xarray_zcache.plotting.make_sources` (the columns of
`xarray_zcache.plotting.source_data`) and returns one Bokeh model.
"""

from __future__ import annotations

from typing import Any, Final

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
from bokeh.plotting import figure
from bokeh.transform import dodge

from xarray_zcache.cache.stats import TIERS
from xarray_zcache.plotting.data import CAPACITY_TIERS, EVICTION_TIERS

__all__ = [
    "BINARY_TICKS",
    "COLORS",
    "MIN_WIDTH",
    "SIZING",
    "bytes_axis",
    "bytes_saved_figure",
    "capacity_figure",
    "decoded_figure",
    "evictions_figure",
    "hit_rate_figure",
    "tier_figure",
]

COLORS = {
    "memory": "#2b83ba",
    "disk": "#abdda4",
    "peer": "#fdae61",
    "decoded": "#7b3294",
    "miss": "#d7191c",
    "capacity": "#e0e0e0",
    "requests": "#fdae61",
    "other": "#9e9ac8",  # a tier without a color of its own
}

#: figures stretch to the width of the page (or notebook cell); this is the least they take
MIN_WIDTH = 360
#: every figure and table follows the width of its container
SIZING: Final = "stretch_width"
_TOOLS = "pan,wheel_zoom,box_zoom,reset,save"

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


def _bar_figure(
    title: str,
    source: ColumnDataSource,
    name: str,
    *,
    legend_below: bool = True,
    x_range: DataRange1d | None = None,
) -> figure:
    """A figure of horizontal bars, one row per ``label`` of ``source`` (the first on top).

    ``legend_below``: the figure leaves 30 px more for a legend in a row below its bars.
    """
    labels = list(source.data["label"])
    return figure(
        title=title,
        y_range=FactorRange(factors=list(reversed(labels))),
        x_range=DataRange1d(start=0) if x_range is None else x_range,
        sizing_mode=SIZING,
        min_width=MIN_WIDTH,
        height=_bar_height(len(labels)) + (30 if legend_below else 0),
        tools="save",
        toolbar_location=None,
        name=name,
    )


def _bar_words(
    p: figure, source: ColumnDataSource, x: float | str, text: str, **style: Any
) -> None:
    """Words on each bar's row of ``p``: column ``text`` of ``source``, starting at ``x``."""
    words = Text(
        x=x,
        y="label",
        text=text,
        x_offset=6,
        text_baseline="middle",
        text_font_size="12px",
        text_color="#222222",
        **style,
    )
    p.add_glyph(source, words)


def _time_figure(title: str, name: str, **kwargs: Any) -> figure:
    """A figure with time along x (the series' figures)."""
    return figure(
        title=title,
        x_axis_type="datetime",
        sizing_mode=SIZING,
        min_width=MIN_WIDTH,
        height=300,
        tools=_TOOLS,
        name=name,
        **kwargs,
    )


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
    p = _time_figure(
        "Cluster hit rate over time", "zcache-hit-rate", y_range=Range1d(start=0, end=1.05)
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
    p = _time_figure("Saved: bytes not downloaded, requests not sent", "zcache-saved")
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


#: the color of each tier's bar in words, for the figures' titles
_SHADES = {"memory": "blue", "decoded": "purple", "disk": "green"}


def capacity_figure(workers: ColumnDataSource, tier: str) -> figure:
    """Use vs capacity of one tier (``"memory"``, ``"decoded"`` or ``"disk"``) on each worker.

    Parameters
    ----------
    workers
        The ``workers`` source of `make_sources`.
    tier
        ``"memory"``, ``"decoded"`` or ``"disk"`` (`CAPACITY_TIERS`).

    Returns
    -------
    bokeh.plotting.figure
    """
    if tier not in CAPACITY_TIERS:
        raise ValueError(
            f"tier must be one of {', '.join(map(repr, CAPACITY_TIERS))}, not {tier!r}"
        )
    shade = _SHADES[tier]
    p = _bar_figure(
        f"{tier.capitalize()} tier per worker: used ({shade}) of capacity (grey)",
        workers,
        f"zcache-{tier}",
        legend_below=False,
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
    # the figures in words: a few kB in a GB tier is no visible bar
    _bar_words(
        p,
        workers,
        0,
        f"{tier}_text",
        background_fill_color="white",
        background_fill_alpha=0.75,
    )
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
    p = _bar_figure("Reads by tier (misses went to the store)", tiers, "zcache-tiers")
    stack = [*TIERS, "miss"]
    bars = p.hbar_stack(
        stack,
        y="label",
        height=0.7,
        source=tiers,
        color=[COLORS.get(name, COLORS["other"]) for name in stack],
        legend_label=[f"{tier} hits" for tier in TIERS] + ["misses"],
    )
    _counts_across(
        p,
        "reads",
        bars,
        [
            ("memory hits", "@memory (@negative known-missing)"),
            ("disk hits", "@disk"),
            ("peer hits (owner had it)", "@peer"),
            ("misses", "@miss"),
            ("hit rate", "@hit_rate{0.0%}"),
            ("decoded hits / misses", "@decoded_hits / @decoded_misses"),
        ],
    )
    return p


def _counts_across(p: figure, label: str, bars: list[Any], tooltips: list[tuple[str, str]]) -> None:
    """Horizontal bars of counts: the legend in a row below, whole numbers along x, and a
    hover over ``bars`` naming the row, then ``tooltips``."""
    p.legend.location = "top_center"
    p.legend.orientation = "horizontal"
    p.add_layout(p.legend[0], "below")
    p.ygrid.grid_line_color = None
    p.xaxis.axis_label = label
    p.xaxis.ticker = BasicTicker(min_interval=1)  # whole counts
    p.xaxis.formatter = NumeralTickFormatter(format="0,0")
    p.add_tools(HoverTool(renderers=list(bars), tooltips=[("", "@label"), *tooltips]))


def decoded_figure(tiers: ColumnDataSource) -> figure:
    """The decoded tier's reads, per worker and cluster-wide: served decoded, or decoded again.

    The decoded tier holds decoded chunks above the byte tiers: a hit skips zarr's
    decoding, a miss decodes (its encoded bytes came from a byte tier, or from the
    store: the "Reads by tier" figure counts those reads too). Each bar says its
    hit rate in words.

    Parameters
    ----------
    tiers
        The ``tiers`` source of `make_sources`.

    Returns
    -------
    bokeh.plotting.figure
    """
    p = _bar_figure(
        "Decoded tier: reads served without decoding",
        tiers,
        "zcache-decoded-reads",
        # room on the right of the longest bar for its hit rate in words
        x_range=DataRange1d(start=0, range_padding=0.75, range_padding_units="percent"),
    )
    bars = p.hbar_stack(
        ["decoded_hits", "decoded_misses"],
        y="label",
        height=0.7,
        source=tiers,
        color=[COLORS["decoded"], COLORS["miss"]],
        legend_label=["decoded hits", "decoded misses (zarr decoded)"],
    )
    _bar_words(p, tiers, "decoded_reads", "decoded_text")  # after the bar: its hit rate
    _counts_across(
        p,
        "chunk reads",
        bars,
        [
            ("decoded hits", "@decoded_hits"),
            ("decoded misses", "@decoded_misses"),
            ("hit rate", "@decoded_hit_rate{0.0%}"),
            ("evictions", "@evictions_decoded"),
        ],
    )
    return p


def evictions_figure(tiers: ColumnDataSource) -> figure:
    """Entries each tier evicted to stay within its capacity, per worker and cluster-wide.

    Parameters
    ----------
    tiers
        The ``tiers`` source of `make_sources`.

    Returns
    -------
    bokeh.plotting.figure
    """
    p = _bar_figure("Evictions by tier (to stay within capacity)", tiers, "zcache-evictions")
    y_range = p.y_range
    n = len(EVICTION_TIERS)
    step = 0.8 / n
    bars = [
        p.hbar(
            y=dodge("label", ((n - 1) / 2 - i) * step, range=y_range),  # first on top
            right=f"evictions_{tier}",
            height=step * 0.9,
            source=tiers,
            color=COLORS[tier],
            legend_label=tier,
        )
        for i, tier in enumerate(EVICTION_TIERS)
    ]
    _counts_across(
        p, "evictions", bars, [(f"{t} evictions", f"@evictions_{t}") for t in EVICTION_TIERS]
    )
    return p
