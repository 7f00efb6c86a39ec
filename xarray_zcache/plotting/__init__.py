"""Bokeh figures of a cluster's caches, for the ``/zcache`` dashboard page and for notebooks.

Every function here takes plain data, the way the scheduler's aggregator
(`~xarray_zcache.distributed.ZCacheSchedulerPlugin`) hands it out, and returns
Bokeh models; nothing here does I/O. The two inputs are

``stats``
    a `~xarray_zcache.distributed.ClusterStats` (``cluster_stats(client)``): per-worker
    `~xarray_zcache.cache.stats.CacheStats`, the cluster total, hot keys and
    decisions; or the dict of ``ZCacheSchedulerPlugin.zcache_cluster_stats()`` (the
    ``cluster`` of ``/zcache/api/stats.json``), which `ClusterStats.from_dict` reads;
``series``
    the aggregator's time series (``ZCacheSchedulerPlugin.series``): one dict per
    point with ``time`` (epoch seconds), ``workers``, ``hit_rate``,
    ``hits_<tier>`` for each tier, ``misses``, ``bytes_saved``,
    ``requests_saved``, ``memory_used`` and ``disk_used``, cluster-wide and
    cumulative.

`source_data` turns them into the columns of every figure's data source (plain
JSON-able lists). The figures read named `~bokeh.models.ColumnDataSource`
objects (``zcache-source-<name>``), so a page can update them in place from
`source_data` without rebuilding the layout; `layout_key` tells when it must
rebuild instead (the set of workers changed).

The package has four modules: `~xarray_zcache.plotting.data` (headline figures,
source columns, notes: no Bokeh), `~xarray_zcache.plotting.figures` (one figure
each), `~xarray_zcache.plotting.tables` (one table each) and
`~xarray_zcache.plotting.layout` (figures on shared sources, panels, the whole
dashboard). Their public names are all here.

Examples
--------
>>> from bokeh.io import output_notebook, show  # doctest: +SKIP
>>> from xarray_zcache import plotting
>>> from xarray_zcache.distributed.dashboard import snapshot  # doctest: +SKIP
>>> data = snapshot(client)  # doctest: +SKIP
>>> show(plotting.dashboard(data["cluster"], data["series"]))  # doctest: +SKIP
"""

from __future__ import annotations

from xarray_zcache.plotting.data import (
    CAPACITY_TIERS,
    CLUSTER_LABEL,
    EVICTION_TIERS,
    NO_WORKERS_LABEL,
    SOURCE_NAMES,
    decoded_hit_rate,
    evictions,
    layout_key,
    notes,
    source_data,
    summary,
    summary_text,
    worker_labels,
)
from xarray_zcache.plotting.figures import (
    BINARY_TICKS,
    COLORS,
    MIN_WIDTH,
    SIZING,
    bytes_axis,
    bytes_saved_figure,
    capacity_figure,
    decoded_figure,
    evictions_figure,
    hit_rate_figure,
    tier_figure,
)
from xarray_zcache.plotting.layout import dashboard, figures, make_sources, panel
from xarray_zcache.plotting.tables import TABLE_NAMES, decisions_table, hot_keys_table

__all__ = [
    "BINARY_TICKS",
    "CAPACITY_TIERS",
    "CLUSTER_LABEL",
    "COLORS",
    "EVICTION_TIERS",
    "MIN_WIDTH",
    "NO_WORKERS_LABEL",
    "SIZING",
    "SOURCE_NAMES",
    "TABLE_NAMES",
    "bytes_axis",
    "bytes_saved_figure",
    "capacity_figure",
    "dashboard",
    "decisions_table",
    "decoded_figure",
    "decoded_hit_rate",
    "evictions",
    "evictions_figure",
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
