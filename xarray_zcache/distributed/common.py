"""What the scheduler's aggregator, its stats model and the ``/zcache`` page share.

The plugin's name, the part of the aggregator the page reads (`Aggregator`) and the
workers' display labels (`worker_labels`). It imports nothing of the package at
run time, so that `~xarray_zcache.distributed.scheduler` (which mounts the page),
`~xarray_zcache.distributed.clusterstats` (which labels workers) and
`~xarray_zcache.distributed.dashboard` (which finds the aggregator) need not import
each other.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

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


def short_address(address: str) -> str:
    """``"tcp://10.0.0.5:40123"`` -> ``"10.0.0.5:40123"`` (the address without its protocol)."""
    return address.split("://", 1)[-1]


def worker_labels(workers: Mapping[str, Any]) -> dict[str, str]:
    """One short, unique display label per worker, by address.

    The same label names a worker everywhere: in the figures, in the tables of the
    page and of the notebook. It is the worker's name when it has one
    (``"worker 0"`` for the numeric names of LocalCluster and most deployments),
    else its address without the protocol (``"10.0.0.5:40123"``); workers whose
    names collide get their short address.

    Parameters
    ----------
    workers
        Worker address -> a dict with the worker's ``name`` (the ``workers`` of the
        aggregator's cluster stats), or -> the name itself.

    Returns
    -------
    dict
        Worker address -> label, in name order (numeric names by value).
    """
    names: dict[str, str] = {}
    for addr, w in workers.items():
        name = w.get("name") if isinstance(w, Mapping) else w
        names[addr] = "" if name is None else str(name)

    def order(addr: str) -> tuple[int, int, str, str]:
        name = names[addr]
        return (0, int(name), "", addr) if name.isdigit() else (1, 0, name, addr)

    labels: dict[str, str] = {}
    for addr in sorted(names, key=order):
        name = names[addr]
        if not name or name == addr:
            labels[addr] = short_address(addr)
        else:
            labels[addr] = f"worker {name}" if name.isdigit() else name
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    out = {a: (lab if counts[lab] == 1 else short_address(a)) for a, lab in labels.items()}
    if len(set(out.values())) < len(out):  # short addresses collide (different protocols)
        out = {a: (lab if counts[lab] == 1 else a) for a, lab in labels.items()}
    return out
