"""`ClusterStats`: the cluster's cache figures, one typed model from the scheduler to the plots.

The scheduler's aggregator builds a `ClusterStats` from its workers' reports and
sends `ClusterStats.to_dict` (msgpack- and JSON-able: what ``zcache_cluster_stats``
answers and ``/zcache/api/stats.json`` holds under ``cluster``). `ClusterStats.from_dict`
is the one place that turns that dict back into the model; `cluster_stats(client)`,
the dashboard and `xarray_zcache.plotting` all take the model.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict

from dask.utils import format_bytes

from xarray_zcache.cache.stats import TIERS, CacheStats
from xarray_zcache.distributed.labels import worker_labels

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ClusterStats",
    "Decision",
    "HotKey",
    "SeriesPoint",
    "as_cluster_stats",
    "series_point",
]


class HotKey(TypedDict):
    """A hot key of the cluster: reads summed over workers, cluster read rate, holders."""

    key: str
    count: int
    rate: float  # reads/s across the cluster in the workers' latest report interval
    peak_rate: float  # the highest such rate the aggregator saw
    workers: dict[str, str]  # worker address -> tier


class Decision(TypedDict):
    """A promotion (``"promote"``) or pre-warm (``"warm"``) decision of the aggregator."""

    time: float
    action: str
    worker: str
    key: str
    rate: float


class SeriesPoint(TypedDict, total=False):
    """A point of the aggregator's time series: cumulative cluster figures.

    ``hits_<tier>`` for every tier of `~xarray_zcache.cache.stats.TIERS`.
    """

    time: float
    workers: int
    hit_rate: float
    misses: int
    bytes_saved: int
    requests_saved: int
    memory_used: int
    disk_used: int


def series_point(now: float, workers: int, total: CacheStats) -> dict[str, Any]:
    """The time series point of the cluster totals ``total`` at ``now`` (see `SeriesPoint`)."""
    point: dict[str, Any] = {"time": now, "workers": workers, "hit_rate": total.hit_rate()}
    for tier in TIERS:
        point[f"hits_{tier}"] = total.total_hits(tier=tier)
    point.update(
        misses=total.total_misses(),
        bytes_saved=total.bytes_saved,
        requests_saved=total.requests_saved,
        memory_used=total.memory_used,
        disk_used=total.disk_used,
    )
    return point


def _number(value: Any, name: str, default: float = 0.0) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"cluster stats: {name} must be a number, not {value!r}")
    return float(value) if math.isfinite(value) else default


def _hot_key(h: Mapping[str, Any]) -> HotKey:
    rate = _number(h.get("rate"), "hot_keys[].rate")
    return {
        "key": str(h.get("key", "")),
        "count": int(_number(h.get("count"), "hot_keys[].count")),
        "rate": rate,
        "peak_rate": max(rate, _number(h.get("peak_rate"), "hot_keys[].peak_rate")),
        "workers": {str(w): str(t) for w, t in (h.get("workers") or {}).items()},
    }


def _decision(d: Mapping[str, Any]) -> Decision:
    return {
        "time": _number(d.get("time"), "decisions[].time"),
        "action": str(d.get("action", "")),
        "worker": str(d.get("worker", "")),
        "key": str(d.get("key", "")),
        "rate": _number(d.get("rate"), "decisions[].rate"),
    }


@dataclasses.dataclass
class ClusterStats:
    """Figures of the whole cluster as the scheduler's aggregator last saw them.

    ``workers`` (and ``names``, ``hosts``, ``last_seen``, ``analytics``) are by
    worker address; ``total`` is the cluster's sum (disk use counted once per
    shared disk folder).
    """

    workers: dict[str, CacheStats]
    names: dict[str, str]
    total: CacheStats
    hot_keys: list[HotKey]
    decisions: list[Decision]
    rejected_reports: int = 0
    analytics: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    hosts: dict[str, str] = dataclasses.field(default_factory=dict)
    last_seen: dict[str, float] = dataclasses.field(default_factory=dict)
    promotion_threshold: float = 1.0

    # -- the wire form -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The msgpack- and JSON-able dict of ``zcache_cluster_stats`` (see `from_dict`).

        ``workers``: address -> `CacheStats.to_dict` plus ``name``, ``host``,
        ``last_seen`` and ``analytics``; ``total``: `CacheStats.to_dict`;
        ``hot_keys``, ``decisions``, ``rejected_reports``, ``promotion_threshold``.
        """
        workers: dict[str, Any] = {}
        for w, s in self.workers.items():
            d = s.to_dict()
            d.update(
                name=self.names.get(w, ""),
                host=self.hosts.get(w, ""),
                last_seen=self.last_seen.get(w, 0.0),
                analytics=self.analytics.get(w, {}),
            )
            workers[w] = d
        return {
            "workers": workers,
            "total": self.total.to_dict(),
            "hot_keys": [dict(h) for h in self.hot_keys],
            "decisions": [dict(d) for d in self.decisions],
            "rejected_reports": self.rejected_reports,
            "promotion_threshold": self.promotion_threshold,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterStats:
        """The model from `to_dict`'s dict (or its JSON); missing parts are empty.

        Raises
        ------
        ValueError
            If ``d`` or its ``workers`` are not dicts, or a figure is not a number.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"cluster stats must be a dict, got {type(d).__name__}")
        raw: Any = d.get("workers") or {}
        if not isinstance(raw, Mapping):
            raise ValueError("cluster stats: 'workers' must be a dict of worker address -> stats")
        workers = {str(w): dict(v or {}) for w, v in raw.items()}
        return cls(
            workers={w: CacheStats.from_dict(v) for w, v in workers.items()},
            names={w: str(v.get("name") or "") for w, v in workers.items()},
            hosts={w: str(v.get("host") or "") for w, v in workers.items()},
            last_seen={w: _number(v.get("last_seen"), "last_seen") for w, v in workers.items()},
            analytics={w: dict(v.get("analytics") or {}) for w, v in workers.items()},
            total=CacheStats.from_dict(d.get("total") or {}),
            hot_keys=[_hot_key(h) for h in d.get("hot_keys") or []],
            decisions=[_decision(x) for x in d.get("decisions") or []],
            rejected_reports=int(_number(d.get("rejected_reports"), "rejected_reports")),
            promotion_threshold=_number(
                d.get("promotion_threshold"), "promotion_threshold", default=1.0
            )
            or 1.0,
        )

    # -- figures -------------------------------------------------------------------------------

    def disk_usage(self) -> tuple[int, int, int | None]:
        """Disk use and capacity counting each (host, folder) once, and the number of folders.

        The workers of one host share a disk folder by default, and each reports the
        whole folder: summing over workers would count it once per worker. When a
        worker with a disk tier does not say which folder it uses (no ``disk_path``),
        the cluster totals are returned as they are, and the number of folders as ``None``.
        """
        folders: dict[tuple[str, str], tuple[int, int]] = {}
        for addr, s in self.workers.items():
            if not s.disk_path:
                if s.disk_capacity:
                    return self.total.disk_used, self.total.disk_capacity, None
                continue  # no disk tier
            where = (self.hosts.get(addr) or addr, s.disk_path)
            used, cap = folders.get(where, (0, 0))
            folders[where] = (max(used, s.disk_used), max(cap, s.disk_capacity))
        return (
            sum(u for u, _ in folders.values()),
            sum(c for _, c in folders.values()),
            len(folders),
        )

    def recommendations(self) -> list[str]:
        """Cache-size advice per worker from the miss-ratio curves of their recent reads."""
        return [
            f"{self.names.get(w) or w}: {line}"
            for w, a in sorted(self.analytics.items())
            for line in a.get("recommendations", [])
        ]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per worker plus a ``total`` row."""
        import pandas as pd

        def row(s: CacheStats) -> dict[str, Any]:
            return {
                "hit_rate": s.hit_rate(),
                **{f"hits_{tier}": s.total_hits(tier=tier) for tier in TIERS},
                "peer_served": s.peer_served,
                "peer_fallbacks": s.peer_fallbacks,
                "misses": s.total_misses(),
                "requests_saved": s.requests_saved,
                "bytes_saved": s.bytes_saved,
                "memory_used": s.memory_used,
                "memory_capacity": s.memory_capacity,
                "decoded_hits": s.decoded_hits,
                "decoded_used": s.decoded_used,
                "decoded_capacity": s.decoded_capacity,
                "disk_used": s.disk_used,
                "disk_capacity": s.disk_capacity,
                "promotions": s.promotions,
                "corruptions": s.corruptions,
            }

        rows = {w: row(s) for w, s in sorted(self.workers.items())}
        rows["total"] = row(self.total)
        return pd.DataFrame.from_dict(rows, orient="index")

    def __str__(self) -> str:
        t = self.total
        lines = [
            f"ClusterStats: {len(self.workers)} workers, hit rate {t.hit_rate():.1%}, "
            f"{t.requests_saved} requests and {format_bytes(t.bytes_saved)} saved",
        ]
        for w, s in sorted(self.workers.items()):
            lines.append(
                f"  {w}: hit rate {s.hit_rate():.1%}, memory {format_bytes(s.memory_used)}, "
                f"decoded {format_bytes(s.decoded_used)}, disk {format_bytes(s.disk_used)}"
            )
        return "\n".join(lines)

    def labels(self) -> dict[str, str]:
        """Worker address -> its display label, the same as on the ``/zcache`` page."""
        return worker_labels({w: self.names.get(w, "") for w in self.workers})

    def _repr_html_(self) -> str:
        table = self.to_dataframe()
        labels = self.labels()
        table.index = [labels.get(w, w) for w in table.index]  # named as on the /zcache page
        sizes = ("memory_used", "memory_capacity", "decoded_used", "decoded_capacity")
        for col in ("bytes_saved", *sizes, "disk_used", "disk_capacity"):
            table[col] = table[col].map(format_bytes)
        table["hit_rate"] = table["hit_rate"].map("{:.1%}".format)
        hot = "".join(
            f"<tr><td>{h['count']}</td><td>{h['rate']:.2f}/s now, "
            f"{h['peak_rate']:.2f}/s peak</td>"
            f"<td><code>{html.escape(h['key'])}</code></td></tr>"
            for h in self.hot_keys[:10]
        )
        return (
            "<div><strong>xarray-zcache cluster</strong>"
            + str(table.to_html())
            + (f"<details><summary>hot keys</summary><table>{hot}</table></details>" if hot else "")
            + "</div>"
        )


def as_cluster_stats(stats: ClusterStats | Mapping[str, Any]) -> ClusterStats:
    """``stats`` itself, or the model of a ``zcache_cluster_stats`` dict (via `from_dict`)."""
    return stats if isinstance(stats, ClusterStats) else ClusterStats.from_dict(stats)
