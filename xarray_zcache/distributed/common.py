"""What the scheduler's aggregator and the ``/zcache`` page share.

The plugin's name and the part of the aggregator the page reads (`Aggregator`);
the workers' display labels (`worker_labels`, `short_address`) are re-exported from
`~xarray_zcache.distributed.labels`, which the stats model imports without this
module. It imports nothing else of the package at run time, so that
`~xarray_zcache.distributed.scheduler` (which mounts the page) and
`~xarray_zcache.distributed.dashboard` (which finds the aggregator) need not import
each other.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from xarray_zcache.distributed.labels import short_address, worker_labels

if TYPE_CHECKING:
    from xarray_zcache.distributed.clusterstats import ClusterStats, Decision

__all__ = ["PLUGIN_NAME", "Aggregator", "short_address", "worker_labels"]

#: the name the scheduler plugin (`~xarray_zcache.distributed.ZCacheSchedulerPlugin`)
#: is registered under
PLUGIN_NAME = "zcache-scheduler"


@runtime_checkable
class Aggregator(Protocol):
    """The scheduler's aggregator as the page and its JSON read it, once it started.

    `~xarray_zcache.distributed.ZCacheSchedulerPlugin` is one (its ``series`` and
    ``decisions`` exist from its ``start`` on: a plugin that did not start is none).
    """

    @property
    def series(self) -> Collection[dict[str, Any]]:
        """The time series, oldest first."""

    @property
    def decisions(self) -> Collection[Decision]:
        """The decision log, oldest first."""

    def cluster_stats(self) -> ClusterStats:
        """The cluster's figures now."""
