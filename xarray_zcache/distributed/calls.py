"""Calls from a client to the scheduler's aggregator: `cluster_stats` and the plain call.

Kept apart from the package's ``__init__`` so that the page's helpers
(`xarray_zcache.distributed.dashboard_json.snapshot`) reach the aggregator without
importing the package (which imports the scheduler plugin, which mounts the page).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xarray_zcache.distributed.clusterstats import ClusterStats

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["cluster_stats", "scheduler_call"]


def _has_handler(dask_scheduler: Any, op: str = "") -> bool:
    return op in dask_scheduler.handlers


def scheduler_call(client: Client, op: str, **kwargs: Any) -> Any:
    """Call a handler of the scheduler (``None`` if the scheduler does not have it).

    Asks first whether the handler exists: calling a missing one makes the scheduler
    log a ``KeyError`` traceback, which blames Dask for a missing `install`.
    """
    if not client.run_on_scheduler(_has_handler, op=op):  # type: ignore[no-untyped-call]
        return None
    scheduler: Any = client.scheduler
    return client.sync(getattr(scheduler, op), **kwargs)  # type: ignore[no-untyped-call]


def cluster_stats(client: Client) -> ClusterStats:
    """Per-worker and total cache figures from the scheduler's aggregator.

    Raises
    ------
    RuntimeError
        If the aggregator is not installed (see `xarray_zcache.distributed.install`).
    """
    raw = scheduler_call(client, "zcache_cluster_stats")
    if raw is None:
        raise RuntimeError(
            "the scheduler has no zcache aggregator: call xarray_zcache.distributed.install(client)"
        )
    return ClusterStats.from_dict(raw)
