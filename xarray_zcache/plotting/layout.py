"""Figures on shared data sources, put together: `figures`, `panel` and the whole `dashboard`."""

from __future__ import annotations

import html
from typing import Any

from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource
from bokeh.models.layouts import LayoutDOM
from bokeh.models.widgets.markups import Div
from bokeh.models.widgets.tables import DataTable

from xarray_zcache.distributed.clusterstats import as_cluster_stats
from xarray_zcache.plotting.data import Series, Stats, notes, source_data, summary_text
from xarray_zcache.plotting.figures import (
    MIN_WIDTH,
    SIZING,
    bytes_saved_figure,
    capacity_figure,
    decoded_figure,
    evictions_figure,
    hit_rate_figure,
    tier_figure,
)
from xarray_zcache.plotting.tables import decisions_table, hot_keys_table

__all__ = ["dashboard", "figures", "make_sources", "panel"]


def make_sources(stats: Stats, series: Series) -> dict[str, ColumnDataSource]:
    """Named data sources (``zcache-source-<name>``) holding `source_data`.

    Parameters
    ----------
    stats
        The aggregator's cluster stats (a `ClusterStats`, or its dict).
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
        The aggregator's cluster stats (a `ClusterStats`, or its dict).
    series
        The aggregator's time series points, oldest first.

    Returns
    -------
    dict
        ``hit_rate``, ``saved``, ``memory``, ``decoded``, ``disk``, ``tiers``,
        ``decoded_reads``, ``evictions``, ``hot_keys``, ``decisions`` -> Bokeh model
        (the two tables with their `notes` above them). They share data sources:
        show them together (in one layout), or use `panel` for one on its own.
    """
    stats = as_cluster_stats(stats)  # once, not once per figure
    src = make_sources(stats, series)
    return {
        "hit_rate": hit_rate_figure(src["series"], src["recent"]),
        "saved": bytes_saved_figure(src["series"]),
        "memory": capacity_figure(src["workers"], "memory"),
        "decoded": capacity_figure(src["workers"], "decoded"),
        "disk": capacity_figure(src["workers"], "disk"),
        "tiers": tier_figure(src["tiers"]),
        "decoded_reads": decoded_figure(src["tiers"]),
        "evictions": evictions_figure(src["tiers"]),
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
        ``"hit_rate"``, ``"saved"``, ``"memory"``, ``"decoded"``, ``"disk"``,
        ``"tiers"``, ``"decoded_reads"``, ``"evictions"``, ``"hot_keys"`` or
        ``"decisions"``.
    stats
        The aggregator's cluster stats (a `ClusterStats`, or its dict).
    series
        The aggregator's time series points, oldest first.

    Returns
    -------
    bokeh.models.LayoutDOM
    """
    stats = as_cluster_stats(stats)
    builders: dict[str, Any] = {
        "hit_rate": lambda s: hit_rate_figure(s["series"], s["recent"]),
        "saved": lambda s: bytes_saved_figure(s["series"]),
        "memory": lambda s: capacity_figure(s["workers"], "memory"),
        "decoded": lambda s: capacity_figure(s["workers"], "decoded"),
        "disk": lambda s: capacity_figure(s["workers"], "disk"),
        "tiers": lambda s: tier_figure(s["tiers"]),
        "decoded_reads": lambda s: decoded_figure(s["tiers"]),
        "evictions": lambda s: evictions_figure(s["tiers"]),
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
        The aggregator's cluster stats (a `ClusterStats`, or its dict).
    series
        The aggregator's time series points, oldest first.
    with_summary
        Start with a line of headline figures (`summary_text`); the web page shows
        its own, as plain HTML, and leaves it out.

    Returns
    -------
    bokeh.models.LayoutDOM
    """
    stats = as_cluster_stats(stats)
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
        _row(
            f["tiers"],
            column(f["memory"], f["decoded"], f["disk"], sizing_mode=SIZING, min_width=MIN_WIDTH),
        ),
        _row(f["decoded_reads"], f["evictions"]),
        _heading("Hot keys"),
        f["hot_keys"],
        _heading("Promotion decisions"),
        f["decisions"],
    ]
    return column(*parts, sizing_mode=SIZING, name="zcache-dashboard")
