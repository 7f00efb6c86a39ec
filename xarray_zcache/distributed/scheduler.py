"""`ZCacheSchedulerPlugin`: the scheduler-side aggregator of the workers' caches."""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from xarray_zcache.cache.stats import MAX, CacheStats
from xarray_zcache.distributed.clusterstats import ClusterStats, Decision, HotKey, series_point
from xarray_zcache.distributed.common import PLUGIN_NAME
from xarray_zcache.distributed.directory import Directory
from xarray_zcache.distributed.placement import Placer
from xarray_zcache.keys import array_of

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["ZCacheSchedulerPlugin"]

logger = logging.getLogger("xarray_zcache.distributed")

HANDLERS = (
    "zcache_report",
    "zcache_join",
    "zcache_invalidate",
    "zcache_cluster_stats",
    "zcache_worker_stats",
    "zcache_decisions",
    "zcache_timeseries",
)


_N = len(CacheStats.WIRE_PATHS)
#: the disk gauges: the workers of a host share a disk folder, counted once in the totals
_DISK_FIELDS = ("disk_used", "disk_capacity", "disk_entries")
_DISK = tuple(CacheStats.wire_index(name) for name in _DISK_FIELDS)
#: the gauges whose cluster value is the largest of the workers' (not their sum)
_MAX = tuple(i for i, how in enumerate(CacheStats.WIRE_COMBINE) if how == MAX)


class _WorkerState:
    __slots__ = (
        "analytics",
        "arrays",
        "disk_path",
        "host",
        "hot",
        "last_seen",
        "name",
        "rates",
        "time",
        "vec",
    )

    def __init__(self) -> None:
        self.vec: list[int] = [0] * _N
        self.hot: dict[str, tuple[int, str]] = {}  # key -> (cumulative count, tier)
        self.rates: dict[str, float] = {}  # key -> accesses/s between the last two reports
        self.arrays: set[str] = set()
        self.time = 0.0
        self.last_seen = 0.0
        self.name = ""
        self.host = ""
        self.disk_path: str | None = None
        self.analytics: dict[str, Any] = {}

    @property
    def stats(self) -> CacheStats:
        return CacheStats.from_vector(self.vec)


class ZCacheSchedulerPlugin(SchedulerPlugin):
    """Aggregate the zcache reports of all workers and decide cluster-wide promotions.

    Workers (`ZCacheWorkerPlugin`) send their cumulative counters (a flat vector, see
    `CacheStats.to_vector`) and top-N hot keys every report interval. The aggregator
    keeps the latest state per worker, running cluster totals, per-key cluster access
    rates and holders, a bounded time series of cluster figures and a bounded log of
    decisions. A report costs O(top-N) work whatever the number of workers, and
    every structure is capped, so it scales to hundreds of workers (see
    ``benchmarks/aggregator.py``).

    Decisions: a key whose cluster-wide access rate (summed over workers) reaches
    ``promotion_threshold`` accesses/s is promoted to memory on the workers that
    hold it on disk only; with ``warm=True``, a key hot on at least two workers is
    also pre-warmed on the other workers that read the same array. A worker's
    commands are decided when it reports and ride on the reply to that report, so
    they reach it within one report interval of the key getting hot.

    Handlers for clients: ``zcache_cluster_stats``, ``zcache_worker_stats``,
    ``zcache_decisions``, ``zcache_timeseries``.

    Parameters
    ----------
    promotion_threshold
        Cluster-wide accesses per second at which a disk-held key is promoted.
    warm
        Pre-warm keys hot on several workers on the others reading their array.
    history
        Points kept in the time series (at most one per second).
    max_decisions
        Entries kept in the decision log.
    max_keys
        Hot keys taken per report (reports beyond this are truncated).
    placement
        Send the root tasks that read zarr chunks through zcache towards the workers
        of the chunks' owning cache host (loose restrictions, see
        ``xarray_zcache/distributed/placement.py``).
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(
        self,
        promotion_threshold: float = 1.0,
        warm: bool = False,
        history: int = 3600,
        max_decisions: int = 500,
        max_keys: int = 100,
        placement: bool = False,
    ) -> None:
        self.promotion_threshold = promotion_threshold
        self.warm = warm
        self.history = history
        self.max_decisions = max_decisions
        self.max_keys = max_keys
        self.placement = placement
        self.scheduler: Scheduler | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.workers: dict[str, _WorkerState] = {}
        self._totals: list[int] = [0] * _N
        self.series: deque[dict[str, Any]] = deque(maxlen=self.history)
        self.decisions: deque[Decision] = deque(maxlen=self.max_decisions)
        self.pending: dict[str, dict[str, set[str]]] = {}  # worker -> {"promote"|"warm": keys}
        self.done: dict[str, set[str]] = {}  # worker -> keys already promoted/warmed there
        self.key_rate: dict[str, float] = {}  # key -> cluster accesses/s
        self.key_peak: dict[str, float] = {}  # key -> highest cluster accesses/s seen
        self.key_holders: dict[str, dict[str, str]] = {}  # key -> {worker: tier}
        self.hot_now: list[str] = []  # the cluster's hottest keys (refreshed each second)
        self.rejected = 0
        self._last_point = 0.0
        self.directory = Directory(scheduler)
        self.placer = Placer()
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

    @property
    def totals(self) -> CacheStats:
        """Cluster totals: counters and memory use summed over workers, disk use over disks.

        The workers of a host share one disk folder by default: its use is counted
        once per (host, folder), not once per worker. O(workers).
        """
        vec = list(self._totals)
        for i in _MAX:
            vec[i] = max((s.vec[i] for s in self.workers.values()), default=0)
        t = CacheStats.from_vector(vec)
        disks: dict[tuple[str, str], list[int]] = {}
        for s in self.workers.values():
            if s.disk_path is not None:
                disks[(s.host, s.disk_path)] = [s.vec[i] for i in _DISK]
        if disks:
            for j, name in enumerate(_DISK_FIELDS):
                setattr(t, name, sum(d[j] for d in disks.values()))
        return t

    def remove_worker(
        self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        self.directory.leave(worker)
        state = self.workers.pop(worker, None)
        if state is not None:
            self._totals = [a - b for a, b in zip(self._totals, state.vec, strict=True)]
            self._set_hot(worker, state, {}, {})
            self._add_point(time.time(), force=True)
        self.pending.pop(worker, None)
        self.done.pop(worker, None)

    def update_graph(self, scheduler: Scheduler, *, tasks: list[Any], **kwargs: Any) -> None:
        """New tasks: with placement on, root tasks reading chunks go towards their owners."""
        if self.placement:
            self.placer.place(scheduler, tasks, self.directory.membership)

    # -- the cluster as one cache: membership and write broadcasts ----------------------------

    def zcache_join(self, worker: str = "", host: str = "") -> dict[str, Any]:
        """A worker's cache joins as (part of) cache host ``host``; answers the membership."""
        if self.scheduler is not None and worker not in self.scheduler.workers:
            return {}
        return self.directory.join(str(worker), str(host))

    async def zcache_invalidate(self, keys: list[Any], origin: str | None = None) -> dict[str, Any]:
        """A write or delete went through zcache at ``origin``: tell every other worker.

        Answers ``{"heard": n, "missed": [workers that did not acknowledge]}``; those
        are out of the ownership ring until they do (see `Directory.invalidate`).
        """
        return await self.directory.invalidate(list(keys), origin)

    # -- worker reports ------------------------------------------------------------------------

    def zcache_report(self, report: dict[str, Any]) -> dict[str, Any]:
        """Take one worker's report; answer with the commands waiting for it."""
        try:
            worker, vec, hot, t = self._parse(report)
        except (KeyError, TypeError, ValueError) as exc:
            self.rejected += 1
            logger.warning("xarray-zcache: rejected a malformed worker report: %s", exc)
            return {"error": f"malformed report: {exc}"}
        if self.scheduler is not None and worker not in self.scheduler.workers:
            return {}  # a worker that already left: ignore its last words
        state = self.workers.get(worker)
        if state is None:
            state = self.workers[worker] = _WorkerState()
        totals = self._totals
        old = state.vec
        for i in range(_N):
            totals[i] += vec[i] - old[i]
        state.vec = vec
        dt = t - state.time if state.time else 0.0
        old_hot, old_rates = state.hot, state.rates
        new_hot: dict[str, tuple[int, str]] = {}
        new_rates: dict[str, float] = {}
        for key, count, tier in hot:
            new_hot[key] = (count, tier)
            prev = old_hot.get(key)
            if prev is not None and dt > 0:
                new_rates[key] = (count - prev[0]) / dt if count > prev[0] else 0.0
            else:
                new_rates[key] = old_rates.get(key, 0.0)
        self._set_hot(worker, state, new_hot, new_rates)
        state.time = t
        state.last_seen = time.time()
        state.name = str(report.get("name", ""))
        state.host = str(report.get("host", ""))
        disk_path = report.get("disk_path")
        state.disk_path = disk_path if isinstance(disk_path, str) else None
        analytics = report.get("analytics")
        if isinstance(analytics, dict):
            state.analytics = analytics
        self._decide(worker, state)
        self._add_point(time.time())
        commands = self.pending.pop(worker, None) or {}
        reply: dict[str, Any] = {k: sorted(v) for k, v in commands.items()}
        reply.update(self.directory.reply_extras(report.get("membership_version")))
        self.directory.retry(worker)  # (out of the ring: sends it what it missed)
        return reply

    def _set_hot(
        self,
        worker: str,
        state: _WorkerState,
        hot: dict[str, tuple[int, str]],
        rates: dict[str, float],
    ) -> None:
        """Replace a worker's hot keys, keeping per-key cluster rates and holders in step."""
        key_rate, holders = self.key_rate, self.key_holders
        old_rates, old_hot = state.rates, state.hot
        for key in old_rates.keys() - hot.keys():  # keys no longer hot here
            h = holders.get(key)
            if h is not None:
                h.pop(worker, None)
            if h:
                key_rate[key] = key_rate.get(key, 0.0) - old_rates[key]
            else:
                key_rate.pop(key, None)
                holders.pop(key, None)
                self.key_peak.pop(key, None)
        for key, (_count, tier) in hot.items():
            delta = rates[key] - old_rates.get(key, 0.0)
            if delta or key not in key_rate:
                key_rate[key] = key_rate.get(key, 0.0) + delta
                if key_rate[key] > self.key_peak.get(key, 0.0):
                    self.key_peak[key] = key_rate[key]
            prev = old_hot.get(key)
            if prev is None or prev[1] != tier:
                h = holders.get(key)
                if h is None:
                    holders[key] = {worker: tier}
                else:
                    h[worker] = tier
        state.hot = hot
        state.rates = rates
        if self.warm:
            state.arrays = {array_of(k) for k in hot}

    def _parse(
        self, report: dict[str, Any]
    ) -> tuple[str, list[int], list[tuple[str, int, str]], float]:
        if not isinstance(report, dict):
            raise TypeError(f"report must be a dict, got {type(report).__name__}")
        worker = report["worker"]
        if not isinstance(worker, str) or not worker:
            raise ValueError("report['worker'] must be a worker address")
        raw = report["stats"]
        if not isinstance(raw, list | tuple) or len(raw) != _N:
            raise ValueError(f"report['stats'] must be a list of {_N} numbers")
        vec = list(raw)
        for x in vec:
            if not isinstance(x, int) or isinstance(x, bool):
                raise ValueError("report['stats'] must hold integers only")
        hot: list[tuple[str, int, str]] = []
        for item in list(report.get("hot", ()))[: self.max_keys]:
            key, count, tier = item
            if not isinstance(key, str) or not isinstance(count, int):
                raise TypeError("report['hot'] items must be [key: str, count: int, tier: str]")
            hot.append((key, count, str(tier)))
        t = float(report.get("time", time.time()))
        if not math.isfinite(t):
            raise ValueError("report['time'] must be finite")
        return worker, vec, hot, t

    def _decide(self, worker: str, state: _WorkerState) -> None:
        """Commands for the reporting worker only: O(top-N) per report.

        Every worker holding a hot key reports within one interval, and is then
        told to promote it: promotion reaches all holders without scanning them.
        """
        # remember decisions only for keys still hot here (bounded by top-N)
        done = self.done.get(worker, set()) & state.hot.keys()
        self.done[worker] = done
        for key, (_count, tier) in state.hot.items():
            if tier != "disk" or key in done:
                continue
            rate = self.key_rate.get(key, 0.0)
            if rate >= self.promotion_threshold:
                done.add(key)
                self._command(worker, "promote", key, rate)
        if self.warm:
            for key in self.hot_now:
                holders = self.key_holders.get(key, {})
                if worker in holders or key in done or len(holders) < 2:
                    continue
                if array_of(key) in state.arrays:
                    done.add(key)
                    self._command(worker, "warm", key, self.key_rate.get(key, 0.0))

    def _command(self, worker: str, action: str, key: str, rate: float) -> None:
        self.pending.setdefault(worker, {}).setdefault(action, set()).add(key)
        self.decisions.append(
            Decision(time=time.time(), action=action, worker=worker, key=key, rate=rate)
        )

    def cluster_rate(self, key: str) -> float:
        """Accesses per second of ``key`` summed over the workers reporting it hot."""
        return self.key_rate.get(key, 0.0)

    def _add_point(self, now: float, force: bool = False) -> None:
        if not force and now - self._last_point < 1.0:
            return
        self._last_point = now
        # the cluster's hottest keys, for warm decisions (once a second, not per report)
        rates = self.key_rate
        self.hot_now = [
            k
            for k in heapq.nlargest(100, rates, key=rates.__getitem__)
            if rates[k] >= self.promotion_threshold
        ]
        self.series.append(series_point(now, len(self.workers), self.totals))

    # -- client queries ------------------------------------------------------------------------

    def hot_keys(self, n: int = 20) -> list[HotKey]:
        """Cluster-wide hot keys: summed counts, cluster rate (now and peak), holders by tier."""
        merged: dict[str, HotKey] = {}
        for w, s in self.workers.items():
            for key, (count, tier) in s.hot.items():
                m = merged.get(key)
                if m is None:
                    m = merged[key] = HotKey(key=key, count=0, rate=0.0, peak_rate=0.0, workers={})
                m["count"] += count
                m["rate"] += s.rates.get(key, 0.0)
                m["workers"][w] = tier
        top = sorted(merged.values(), key=lambda m: -m["count"])[:n]
        for m in top:
            m["peak_rate"] = max(m["rate"], self.key_peak.get(m["key"], 0.0))
        return top

    def cluster_stats(self) -> ClusterStats:
        """Per-worker stats, totals, hot keys and recent decisions."""
        workers: dict[str, CacheStats] = {}
        for w, state in self.workers.items():
            stats = workers[w] = state.stats
            stats.disk_path = state.disk_path
            stats.hot_keys = [(k, c) for k, (c, _) in sorted(state.hot.items(), key=by_count)]
        return ClusterStats(
            workers=workers,
            names={w: s.name for w, s in self.workers.items()},
            hosts={w: s.host for w, s in self.workers.items()},
            last_seen={w: s.last_seen for w, s in self.workers.items()},
            analytics={w: s.analytics for w, s in self.workers.items()},
            total=self.totals,
            hot_keys=self.hot_keys(),
            decisions=list(self.decisions)[-50:],
            rejected_reports=self.rejected,
            promotion_threshold=self.promotion_threshold,
        )

    def zcache_cluster_stats(self) -> dict[str, Any]:
        """`cluster_stats` as a msgpack-able dict (`ClusterStats.to_dict`)."""
        return self.cluster_stats().to_dict()

    def zcache_worker_stats(self, worker: str) -> dict[str, Any] | None:
        s = self.workers.get(worker)
        return None if s is None else s.stats.to_dict()

    def zcache_decisions(self, n: int = 100) -> list[Decision]:
        return list(self.decisions)[-n:]

    def zcache_timeseries(self, n: int | None = None) -> list[dict[str, Any]]:
        points = list(self.series)
        return points if n is None else points[-n:]


def by_count(item: tuple[str, tuple[int, str]]) -> int:
    """Sort key of a worker's hot keys: most counted first."""
    return -item[1][0]
