"""The data of the ``/zcache`` page: JSON-able documents, ``api/stats.json``, `snapshot`.

`worker_labels` and `short_address` live in `xarray_zcache.distributed.labels` (the
stats model labels workers too) and are re-exported here.

See `xarray_zcache.distributed.dashboard` for the page and its routes.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any

from xarray_zcache.distributed.common import Aggregator
from xarray_zcache.distributed.labels import short_address, worker_labels

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "MAX_DECISIONS",
    "build_payload",
    "jsonable",
    "short_address",
    "snapshot",
    "worker_labels",
]

#: decisions shown on the page and returned by default
MAX_DECISIONS = 50


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists, string keys, and non-finite floats as ``None``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _dumps(obj: Any) -> str:
    # "</" can't close a <script> element the JSON is embedded in
    return json.dumps(jsonable(obj), allow_nan=False).replace("</", "<\\/")


def build_payload(
    plugin: Aggregator,
    *,
    series: int | None = None,
    decisions: int | None = None,
) -> dict[str, Any]:
    """The document of ``api/stats.json``, from the aggregator's current state.

    Parameters
    ----------
    plugin
        The scheduler's aggregator.
    series
        Keep only the last ``series`` points of the time series (all by default).
    decisions
        Keep only the last ``decisions`` decisions (`MAX_DECISIONS` by default).

    Returns
    -------
    dict
        ``time`` (epoch seconds), ``summary`` (`xarray_zcache.plotting.summary`
        figures), ``cluster`` (``zcache_cluster_stats()``: `ClusterStats.to_dict`,
        which `ClusterStats.from_dict` reads back), ``series`` (oldest first) and
        ``decisions`` (oldest first).
    """
    from xarray_zcache.plotting import summary

    cluster = plugin.cluster_stats()
    points = list(plugin.series)
    log = list(plugin.decisions)
    n_dec = MAX_DECISIONS if decisions is None else decisions
    payload: dict[str, Any] = jsonable(
        {
            "time": time.time(),
            "summary": summary(cluster),
            "cluster": cluster.to_dict(),
            "series": points if series is None else _last(points, series),
            "decisions": _last(log, n_dec),
        }
    )
    return payload


def _last(items: list[Any], n: int) -> list[Any]:
    return items[max(0, len(items) - n) :] if n > 0 else []


def snapshot(client: Client) -> dict[str, Any]:
    """What the page shows, fetched from a client: cluster stats and time series.

    Parameters
    ----------
    client
        A client of a cluster with zcache installed.

    Returns
    -------
    dict
        ``cluster`` (the JSON-able dict of `~xarray_zcache.distributed.ClusterStats`,
        ``ClusterStats.to_dict``) and ``series`` (the time series, oldest first): the
        two arguments of `xarray_zcache.plotting.dashboard`.

    Raises
    ------
    RuntimeError
        If the aggregator is not installed.
    """
    from xarray_zcache.distributed.calls import cluster_stats

    rpc: Any = client.scheduler
    cluster = cluster_stats(client)
    series = client.sync(rpc.zcache_timeseries)  # type: ignore[no-untyped-call]
    return {"cluster": jsonable(cluster.to_dict()), "series": jsonable(list(series or []))}
