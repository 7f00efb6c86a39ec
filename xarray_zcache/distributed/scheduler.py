"""`ZCacheSchedulerPlugin`: the scheduler-side aggregator of the workers' caches."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from xarray_zcache.cache.stats import CacheStats
from xarray_zcache.store import array_of

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["ZCacheSchedulerPlugin"]

logger = logging.getLogger("xarray_zcache.distributed")

HANDLERS = (
    "zcache_report",
    "zcache_cluster_stats",
    "zcache_worker_stats",
    "zcache_decisions",
    "zcache_timeseries",
)


class _WorkerState:
    __slots__ = ("analytics", "host", "hot", "last_seen", "name", "rates", "stats", "time")

    def __init__(self) -> None:
        self.stats = CacheStats()
        self.hot: dict[str, tuple[int, str]] = {}  # key -> (cumulative count, tier)
        self.rates: dict[str, float] = {}  # key -> accesses/s between the last two reports
        self.time = 0.0
        self.last_seen = 0.0
        self.name = ""
        self.host = ""
        self.analytics: dict[str, Any] = {}


class ZCacheSchedulerPlugin(SchedulerPlugin):
    """Aggregate the zcache reports of all workers and decide cluster-wide promotions.

    Workers (`ZCacheWorkerPlugin`) send their cumulative stats and top-N hot keys
    every report interval. The aggregator keeps the latest snapshot per worker,
    running cluster totals, a bounded time series of cluster figures and a bounded
    log of decisions. Each report costs O(top-N) work, and every structure is
    capped, so it scales to hundreds of workers.

    Decisions: a key whose cluster-wide access rate (summed over workers) reaches
    ``promotion_threshold`` accesses/s is promoted to memory on the workers that
    hold it on disk only; with ``warm=True``, a key hot on at least two workers is
    also pre-warmed on the other workers that read the same array. Commands ride
    on the reply to the next report of each worker, so they arrive within one
    report interval.

    Handlers for clients: ``zcache_cluster_stats``, ``zcache_worker_stats``,
    ``zcache_decisions``, ``zcache_timeseries``.

    Parameters
    ----------
    promotion_threshold
        Cluster-wide accesses per second at which a disk-held key is promoted.
    warm
        Pre-warm keys hot on several workers on the others reading their array.
    history
        Points kept in the time series (one per report interval of any worker, at
        most one per second).
    max_decisions
        Entries kept in the decision log.
    max_keys
        Hot keys kept per worker (reports beyond this are truncated).
    """

    name = "zcache-scheduler"
    idempotent = True

    def __init__(
        self,
        promotion_threshold: float = 1.0,
        warm: bool = False,
        history: int = 3600,
        max_decisions: int = 500,
        max_keys: int = 100,
    ) -> None:
        self.promotion_threshold = promotion_threshold
        self.warm = warm
        self.history = history
        self.max_decisions = max_decisions
        self.max_keys = max_keys
        self.scheduler: Scheduler | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.workers: dict[str, _WorkerState] = {}
        self.totals = CacheStats()
        self.series: deque[dict[str, Any]] = deque(maxlen=self.history)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=self.max_decisions)
        self.pending: dict[str, dict[str, set[str]]] = {}  # worker -> {"promote"|"warm": keys}
        self.promoted: dict[str, set[str]] = {}  # worker -> keys already promoted there
        self.arrays: dict[str, set[str]] = {}  # worker -> arrays it reads (from hot keys)
        self.rejected = 0
        self._last_point = 0.0
        for op in HANDLERS:
            scheduler.handlers[op] = getattr(self, op)
        from xarray_zcache.distributed.dashboard import add_routes

        add_routes(scheduler)  # the /zcache page and its JSON on the dashboard

    async def close(self) -> None:
        if self.scheduler is not None:
            for op in HANDLERS:
                self.scheduler.handlers.pop(op, None)
            from xarray_zcache.distributed.dashboard import remove_routes

            remove_routes(self.scheduler)

    def remove_worker(
        self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        state = self.workers.pop(worker, None)
        if state is not None:
            self._shift_totals(state.stats, CacheStats())
            self._add_point(time.time(), force=True)
        self.pending.pop(worker, None)
        self.promoted.pop(worker, None)
        self.arrays.pop(worker, None)

    # -- worker reports ------------------------------------------------------------------------

    def zcache_report(self, report: dict[str, Any]) -> dict[str, Any]:
        """Take one worker's report; answer with the commands waiting for it."""
        try:
            worker, stats, hot, t = self._parse(report)
        except (KeyError, TypeError, ValueError) as exc:
            self.rejected += 1
            logger.warning("xarray-zcache: rejected a malformed worker report: %s", exc)
            return {"error": f"malformed report: {exc}"}
        if self.scheduler is not None and worker not in self.scheduler.workers:
            return {}  # a worker that already left: ignore its last words
        state = self.workers.get(worker)
        if state is None:
            state = self.workers[worker] = _WorkerState()
        self._shift_totals(state.stats, stats)
        rates: dict[str, float] = {}
        dt = t - state.time if state.time else 0.0
        for key, count, _tier in hot:
            old = state.hot.get(key)
            if old is not None and dt > 0:
                rates[key] = max(0.0, (count - old[0]) / dt)
            else:
                rates[key] = state.rates.get(key, 0.0)
        state.stats = stats
        state.hot = {key: (count, tier) for key, count, tier in hot}
        state.rates = rates
        state.time = t
        state.last_seen = time.time()
        state.name = str(report.get("name", ""))
        state.host = str(report.get("host", ""))
        analytics = report.get("analytics")
        if isinstance(analytics, dict):
            state.analytics = analytics
        if self.warm:
            self.arrays[worker] = {array_of(k) for k in state.hot}
        self._decide(worker)
        self._add_point(time.time())
        commands = self.pending.pop(worker, None) or {}
        return {k: sorted(v) for k, v in commands.items()}

    _SUMMED_GAUGES = (
        "memory_used",
        "memory_capacity",
        "memory_entries",
        "disk_used",
        "disk_capacity",
        "disk_entries",
    )

    def _shift_totals(self, old: CacheStats, new: CacheStats) -> None:
        """Totals += new - old, for counters and summed gauges alike. O(1) in workers."""
        totals = self.totals + (new - old)
        for g in self._SUMMED_GAUGES:
            setattr(totals, g, getattr(self.totals, g) + getattr(new, g) - getattr(old, g))
        totals.hot_keys = []
        totals.disk_path = None
        self.totals = totals

    def _parse(
        self, report: dict[str, Any]
    ) -> tuple[str, CacheStats, list[tuple[str, int, str]], float]:
        if not isinstance(report, dict):
            raise TypeError(f"report must be a dict, got {type(report).__name__}")
        worker = report["worker"]
        if not isinstance(worker, str) or not worker:
            raise ValueError("report['worker'] must be a worker address")
        raw = report["stats"]
        if not isinstance(raw, dict):
            raise TypeError("report['stats'] must be a dict")
        stats = CacheStats.from_dict(raw)
        if not isinstance(stats.hits, dict) or set(stats.hits) != {"memory", "disk"}:
            raise ValueError("report['stats']['hits'] must have 'memory' and 'disk'")
        hot: list[tuple[str, int, str]] = []
        for item in list(report.get("hot", []))[: self.max_keys]:
            key, count, tier = item
            if not isinstance(key, str) or not isinstance(count, int):
                raise TypeError("report['hot'] items must be [key: str, count: int, tier: str]")
            hot.append((key, count, str(tier)))
        t = float(report.get("time", time.time()))
        if not math.isfinite(t):
            raise ValueError("report['time'] must be finite")
        return worker, stats, hot, t

    def _decide(self, reporter: str) -> None:
        """Promotion and warm decisions for the keys the reporting worker just sent."""
        state = self.workers[reporter]
        for key in state.hot:
            rate = self.cluster_rate(key)
            if rate < self.promotion_threshold:
                continue
            holders = [w for w, s in self.workers.items() if key in s.hot]
            for w in holders:
                _count, tier = self.workers[w].hot[key]
                done = self.promoted.setdefault(w, set())
                if tier == "disk" and key not in done:
                    if len(done) > 10 * self.max_keys:
                        done.clear()
                    done.add(key)
                    self._command(w, "promote", key, rate)
            if self.warm and len(holders) >= 2:
                arr = array_of(key)
                for w, arrays in self.arrays.items():
                    if w not in holders and arr in arrays:
                        done = self.promoted.setdefault(w, set())
                        if key not in done:
                            done.add(key)
                            self._command(w, "warm", key, rate)

    def _command(self, worker: str, action: str, key: str, rate: float) -> None:
        self.pending.setdefault(worker, {}).setdefault(action, set()).add(key)
        self.decisions.append(
            {"time": time.time(), "action": action, "worker": worker, "key": key, "rate": rate}
        )

    def cluster_rate(self, key: str) -> float:
        """Accesses per second of ``key`` summed over the workers reporting it hot."""
        return sum(s.rates.get(key, 0.0) for s in self.workers.values())

    def _add_point(self, now: float, force: bool = False) -> None:
        if not force and now - self._last_point < 1.0:
            return
        self._last_point = now
        t = self.totals
        self.series.append(
            {
                "time": now,
                "workers": len(self.workers),
                "hit_rate": t.hit_rate(),
                "hits_memory": t.total_hits(tier="memory"),
                "hits_disk": t.total_hits(tier="disk"),
                "misses": t.total_misses(),
                "bytes_saved": t.bytes_saved,
                "requests_saved": t.requests_saved,
                "memory_used": t.memory_used,
                "disk_used": t.disk_used,
            }
        )

    # -- client queries ------------------------------------------------------------------------

    def hot_keys(self, n: int = 20) -> list[dict[str, Any]]:
        """Cluster-wide hot keys: summed counts, cluster rate, and holders by tier."""
        merged: dict[str, dict[str, Any]] = {}
        for w, s in self.workers.items():
            for key, (count, tier) in s.hot.items():
                m = merged.setdefault(key, {"key": key, "count": 0, "rate": 0.0, "workers": {}})
                m["count"] += count
                m["rate"] += s.rates.get(key, 0.0)
                m["workers"][w] = tier
        return sorted(merged.values(), key=lambda m: -m["count"])[:n]

    def zcache_cluster_stats(self) -> dict[str, Any]:
        """Per-worker stats, totals, hot keys and recent decisions (msgpack-able)."""
        return {
            "workers": {
                w: {
                    "name": s.name,
                    "host": s.host,
                    "last_seen": s.last_seen,
                    "analytics": s.analytics,
                    **s.stats.to_dict(),
                }
                for w, s in self.workers.items()
            },
            "total": self.totals.to_dict(),
            "hot_keys": self.hot_keys(),
            "decisions": list(self.decisions)[-50:],
            "rejected_reports": self.rejected,
            "promotion_threshold": self.promotion_threshold,
        }

    def zcache_worker_stats(self, worker: str) -> dict[str, Any] | None:
        s = self.workers.get(worker)
        return None if s is None else s.stats.to_dict()

    def zcache_decisions(self, n: int = 100) -> list[dict[str, Any]]:
        return list(self.decisions)[-n:]

    def zcache_timeseries(self, n: int | None = None) -> list[dict[str, Any]]:
        points = list(self.series)
        return points if n is None else points[-n:]
