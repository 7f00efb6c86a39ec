"""The data of the ``/zcache`` page: worker labels, JSON-able documents, ``api/stats.json``.

See `xarray_zcache.distributed.dashboard` for the page and its routes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Client

    from xarray_zcache.distributed.scheduler import ZCacheSchedulerPlugin

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
    plugin: ZCacheSchedulerPlugin,
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
    from xarray_zcache.distributed import cluster_stats

    rpc: Any = client.scheduler
    cluster = cluster_stats(client)
    series = client.sync(rpc.zcache_timeseries)  # type: ignore[no-untyped-call]
    return {"cluster": jsonable(cluster.to_dict()), "series": jsonable(list(series or []))}
