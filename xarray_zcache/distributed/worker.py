"""`ZCacheWorkerPlugin`: one cache per Dask worker, reporting to the scheduler."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes
from distributed.diagnostics.plugin import WorkerPlugin
from tornado.ioloop import PeriodicCallback

from xarray_zcache.cache.coherence import (
    add_invalidation_listener,
    invalidate_local,
    live_caches,
    remove_invalidation_listener,
)
from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.cache.settings import DECODED_FRACTION
from xarray_zcache.config import CacheConfig
from xarray_zcache.distributed.directory import announce_write
from xarray_zcache.distributed.membership import Membership, host_id
from xarray_zcache.distributed.peer import PeerServer, PeerTier
from xarray_zcache.registry import set_worker_cache
from xarray_zcache.sessions import close_sessions

if TYPE_CHECKING:
    from distributed import Worker

__all__ = [
    "SAFE_MEMORY_SHARE",
    "ZCacheWorkerPlugin",
    "worker_config",
    "worker_decoded_size",
    "worker_memory_size",
]

logger = logging.getLogger("xarray_zcache.distributed")

REPORT_OP = "zcache_report"

#: A memory tier above this share of its worker's memory_limit gets a warning: with Dask's
#: own data, it would push the worker past its spill (0.6) and pause (0.8) thresholds.
SAFE_MEMORY_SHARE = 0.25


def worker_config(config: CacheConfig, worker_name: str) -> CacheConfig:
    """The config a worker's cache uses: ``per_worker`` gives it its own disk subfolder."""
    if config.disk_path is None or not config.per_worker:
        return config
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", worker_name)[:100] or "worker"
    return config.with_disk_cache(os.path.join(config.disk_path, f"worker-{safe}"))


def worker_memory_size(
    config: CacheConfig, worker_name: str, memory_limit: int | None
) -> tuple[int, str | None]:
    """The memory tier size of a worker with ``memory_limit`` bytes, and a warning if unsafe.

    ``min(memory_size, memory_fraction x memory_limit)``; ``memory_size`` as is when
    ``memory_fraction`` is ``None`` or the worker has no memory limit. The warning
    (or ``None``) is for a memory tier and decoded tier (`worker_decoded_size`) over
    `SAFE_MEMORY_SHARE` of ``memory_limit`` together.
    """
    size = config.memory_size
    if not memory_limit or memory_limit <= 0:
        return size, None
    if config.memory_fraction is not None:
        size = min(size, int(config.memory_fraction * memory_limit))
    decoded = worker_decoded_size(config, size, memory_limit)
    total = size + decoded
    if total <= SAFE_MEMORY_SHARE * memory_limit:
        return size, None
    tiers = f"the memory tier of cache {config.name!r} ({format_bytes(size)})"
    if decoded:
        tiers += f" with its decoded tier ({format_bytes(decoded)})"
    warning = (
        f"xarray-zcache: worker {worker_name}: {tiers} "
        f"is {100 * total / memory_limit:.0f}% of the worker's "
        f"memory_limit ({format_bytes(memory_limit)}), over the safe {SAFE_MEMORY_SHARE:.0%}: "
        "with the worker's own data it may push the worker past Dask's spill and pause "
        "thresholds. Lower zcache.memory-size (and zcache.decoded-memory-size), or set "
        "zcache.distributed.memory-fraction (e.g. 0.1) to size the tier from each worker's "
        "memory_limit"
    )
    return size, warning


def worker_decoded_size(config: CacheConfig, memory_size: int, memory_limit: int | None) -> int:
    """The decoded tier size of a worker whose memory tier holds ``memory_size`` bytes:
    ``decoded_memory_size`` (at most ``memory_fraction x memory_limit``), or by default
    its fraction of the worker's memory tier."""
    if config.decoded_memory_size is None:
        return int(DECODED_FRACTION * memory_size)
    size = config.decoded_memory_size
    if memory_limit and memory_limit > 0 and config.memory_fraction is not None:
        size = min(size, int(config.memory_fraction * memory_limit))
    return size


class _WorkerCache:
    """What the plugin holds on one worker: the cache and its report loop."""

    def __init__(self, worker: Worker, cache: HybridCache, config: CacheConfig) -> None:
        self.worker = worker
        self.cache = cache
        self.config = config
        self.callback: PeriodicCallback | None = None
        self.warned_no_scheduler = False
        self.reports_sent = 0
        self.promotions_applied = 0
        self.warms_applied = 0
        self._reporting = False
        self.peer: PeerTier | None = None
        self.server: PeerServer | None = None

    def hot_keys_with_tier(self) -> list[list[Any]]:
        """Top-N keys with their access counts and where they are held now."""
        out: list[list[Any]] = []
        for key, count in self.cache.hot_keys(self.config.top_n):
            if key in self.cache.memory_tier:
                where = "memory"
            elif self.cache.disk_tier is not None and key in self.cache.disk_tier:
                where = "disk"
            else:
                where = "none"
            out.append([key, count, where])
        return out

    ANALYTICS_EVERY = 15  # reports between two (O(n log n)) access analyses

    def build_report(self) -> dict[str, Any]:
        """The msgpack-able report: cumulative stats, hot keys, identity. O(top-N).

        Every `ANALYTICS_EVERY` reports it also carries the cache's access analytics
        (miss-ratio curve, sizing advice, per-array access patterns; capped).
        """
        report = {
            "worker": self.worker.address,
            "name": str(self.worker.name),
            "host": self.worker.ip,
            "time": time.time(),
            "stats": self.cache.stats().to_vector(),
            "disk_path": None if self.cache.disk_tier is None else str(self.cache.disk_tier.path),
            "membership_version": None if self.peer is None else self.peer.membership.version,
            "hot": self.hot_keys_with_tier(),
        }
        if self.reports_sent % self.ANALYTICS_EVERY == 0:
            from xarray_zcache.keys import array_of

            analytics = self.cache.analytics(group=array_of)
            patterns = sorted(analytics["patterns"].items(), key=lambda kv: -kv[1]["accesses"])
            analytics["patterns"] = dict(patterns[:50])
            report["analytics"] = analytics
        return report

    async def report(self) -> None:
        if self._reporting:  # a slow scheduler: skip rather than pile up reports
            return
        self._reporting = True
        try:
            payload = await asyncio.to_thread(self.build_report)
            try:
                reply = await self.worker.scheduler.zcache_report(report=payload)
            except Exception as exc:  # scheduler gone or overloaded: try again next time
                logger.debug("xarray-zcache: report to the scheduler failed: %s", exc)
                return
            self.reports_sent += 1
            if reply is None:
                if not self.warned_no_scheduler:
                    logger.warning(
                        "xarray-zcache: the scheduler has no zcache aggregator "
                        "(ZCacheSchedulerPlugin); the worker cache works, but cluster "
                        "stats and promotions are off. Use xarray_zcache.distributed.install()."
                    )
                    self.warned_no_scheduler = True
                return
            await self.apply(reply)
        finally:
            self._reporting = False

    async def apply(self, reply: dict[str, Any]) -> None:
        """Carry out the scheduler's commands: promote keys to memory, warm keys."""
        membership = reply.get("membership")
        if isinstance(membership, dict) and self.peer is not None:
            self.peer.update(Membership.from_msg(membership))
        promote = [str(k) for k in reply.get("promote", [])]
        if promote:
            self.promotions_applied += await asyncio.to_thread(self.cache.promote, promote)
        warm = [str(k) for k in reply.get("warm", [])]
        if warm:
            from xarray_zcache.distributed.warm import warm_keys

            self.warms_applied += await warm_keys(self.cache, warm)

    def start(self) -> None:
        self.callback = PeriodicCallback(self.report, self.config.report_interval * 1000)
        self.callback.start()

    def stop(self) -> None:
        if self.callback is not None:
            self.callback.stop()
            self.callback = None


class ZCacheWorkerPlugin(WorkerPlugin):
    """Give each Dask worker its own xarray-zcache cache, reporting to the scheduler.

    On `setup` the worker gets a `HybridCache` built from ``config`` (its disk tier
    shared by the workers of a host, or in a per-worker subfolder with
    ``per_worker=True``), registered so that every `CachedStore` naming the cache
    ``config.name`` binds to it when it runs on this worker. A periodic callback
    sends cumulative stats and the top-N hot keys to the scheduler's
    `ZCacheSchedulerPlugin` every ``report_interval`` and applies the promotions
    and warm-ups the scheduler answers with. `teardown` flushes and closes.

    The plugin is thin and picklable: it carries only the config; the cache and
    callbacks are created in `setup`. Registering it twice is a no-op (``name``
    and ``idempotent`` are class attributes).

    Parameters
    ----------
    config
        The cache settings of the workers (``None``: defaults from dask config).

    Examples
    --------
    >>> client.register_plugin(ZCacheWorkerPlugin(CacheConfig().with_memory_size("1GB")))
    ... # doctest: +SKIP
    """

    name = "zcache-worker"
    idempotent = True

    def __init__(self, config: CacheConfig | None = None) -> None:
        self.config = config if config is not None else CacheConfig()

    async def setup(self, worker: Worker) -> None:
        existing = getattr(worker, "_zcache", None)
        if existing is not None:  # set up twice on one worker: keep the first
            return
        cfg = _sized(worker_config(self.config, str(worker.name)), worker)
        cache = await asyncio.to_thread(HybridCache, cfg)
        cache.start_maintenance()
        set_worker_cache(worker.address, cache, name=self.config.name)
        state = _WorkerCache(worker, cache, cfg)
        worker._zcache = state  # type: ignore[attr-defined]
        _listen_for_writes(worker)
        if cfg.peer_reads:
            await _join_the_cluster_cache(worker, state)
        state.start()

    async def teardown(self, worker: Worker) -> None:
        state: _WorkerCache | None = getattr(worker, "_zcache", None)
        if state is None:
            return
        state.stop()
        with contextlib.suppress(Exception):  # last figures, best effort
            await asyncio.wait_for(state.report(), timeout=5)
        set_worker_cache(worker.address, None, name=self.config.name)
        remove_invalidation_listener(_listener_name(worker))
        # (asks and membership pushes still in flight get an answer, not an error log)
        if "zcache_get" in worker.handlers:
            worker.handlers["zcache_get"] = _closed_get
        if "zcache_membership" in worker.handlers:
            worker.handlers["zcache_membership"] = _closed_membership
        await asyncio.to_thread(state.cache.close)
        if not live_caches():  # the last cache of this process: its s3fs sessions go too
            await asyncio.to_thread(close_sessions)
        worker._zcache = None  # type: ignore[attr-defined]


def _closed_get(**_: Any) -> dict[str, str]:
    """A peer's ask after this worker's cache closed: it reads the source itself."""
    return {"status": "closed"}


def _closed_membership(**_: Any) -> int:
    return -1


def _sized(cfg: CacheConfig, worker: Worker) -> CacheConfig:
    """``cfg`` with the memory tier sized for ``worker`` (`worker_memory_size`), logged."""
    manager = getattr(worker, "memory_manager", None)
    limit = getattr(manager, "memory_limit", None)
    who = (
        str(worker.name)
        if str(worker.name) == worker.address
        else f"{worker.name} ({worker.address})"
    )
    size, warning = worker_memory_size(cfg, who, limit)
    if warning is not None:
        logger.warning("%s", warning)
    logger.info(
        "xarray-zcache: worker %s: memory tier %s, decoded tier %s (zcache.memory-size %s, "
        "zcache.distributed.memory-fraction %s, worker memory_limit %s)",
        who,
        format_bytes(size),
        format_bytes(worker_decoded_size(cfg, size, limit)),
        format_bytes(cfg.memory_size),
        cfg.memory_fraction,
        format_bytes(limit) if limit else "none",
    )
    sized = cfg if size == cfg.memory_size else cfg.with_memory_size(size)
    decoded = worker_decoded_size(cfg, size, limit)
    if cfg.decoded_memory_size is not None and decoded != cfg.decoded_memory_size:
        sized = sized.with_decoded_memory_size(decoded)
    return sized


def _listener_name(worker: Worker) -> str:
    return f"dask-scheduler {worker.scheduler.address}"


def _listen_for_writes(worker: Worker) -> None:
    """Writes through zcache in this process reach the other workers, via the scheduler.

    One listener per scheduler and process (in-process clusters share it); the
    other workers' broadcasts arrive through ``zcache_invalidate_local``.
    """
    loop = worker.loop.asyncio_loop  # type: ignore[attr-defined]
    address = worker.address

    def announce(keys: list[tuple[str, bool]]) -> concurrent.futures.Future[object]:
        coro = announce_write(worker.scheduler, keys, address)
        return asyncio.run_coroutine_threadsafe(coro, loop)

    add_invalidation_listener(_listener_name(worker), announce)

    def invalidate_local_handler(keys: list[Any] | None = None, **_: Any) -> int:
        pairs = [(str(k), bool(p)) for k, p in keys or ()]
        invalidate_local(pairs)
        return len(pairs)

    worker.handlers["zcache_invalidate_local"] = invalidate_local_handler


async def _join_the_cluster_cache(worker: Worker, state: _WorkerCache) -> None:
    """Serve peers, ask owners, and join the scheduler's membership as a cache host."""
    cache, cfg = state.cache, state.config
    disk = cache.disk_tier
    host = host_id(worker.ip, None if disk is None else str(disk.path), worker.address, False)
    state.peer = peer = PeerTier(worker, cache, host, cfg.peer_timeout)
    state.server = server = PeerServer(cache)
    cache.add_shared_tier(peer)
    worker.handlers["zcache_get"] = server.handle_get

    def membership_handler(membership: dict[str, Any] | None = None, **_: Any) -> int:
        if isinstance(membership, dict):
            peer.update(Membership.from_msg(membership))
        return peer.membership.version

    worker.handlers["zcache_membership"] = membership_handler
    try:
        reply = await worker.scheduler.zcache_join(worker=worker.address, host=host)
    except Exception as exc:  # no aggregator: every worker reads the source itself
        logger.debug("xarray-zcache: joining the cluster cache failed: %r", exc)
        return
    if isinstance(reply, dict) and reply:
        peer.update(Membership.from_msg(reply))


def worker_cache_state(worker: Worker) -> _WorkerCache | None:
    """The plugin's state on ``worker`` (``None`` without the plugin)."""
    return getattr(worker, "_zcache", None)
