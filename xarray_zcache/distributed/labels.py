"""The workers' display labels: `worker_labels` and `short_address`.

One label names a worker everywhere: in the stats model
(`~xarray_zcache.distributed.clusterstats`), the ``/zcache`` page and its figures, the
notebook. This module imports nothing of the package, so the stats model and the
page's shared pieces (`~xarray_zcache.distributed.common`) both import it without
importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["short_address", "worker_labels"]


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
