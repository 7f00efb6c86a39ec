"""xarray-zcache on a Dask cluster: per-worker caches, a scheduler aggregator, client helpers.

Examples
--------
>>> import xarray_zcache.distributed as zd
>>> zd.install(client, CacheConfig().with_memory_size("1GB"))  # doctest: +SKIP
>>> zd.cluster_stats(client)  # doctest: +SKIP
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from xarray_zcache.config import CacheConfig
from xarray_zcache.distributed.calls import cluster_stats
from xarray_zcache.distributed.calls import scheduler_call as _scheduler_call
from xarray_zcache.distributed.clusterstats import ClusterStats
from xarray_zcache.distributed.scheduler import ZCacheSchedulerPlugin
from xarray_zcache.distributed.worker import ZCacheWorkerPlugin

if TYPE_CHECKING:
    from collections.abc import Mapping

    from distributed import Client

    from xarray_zcache.store_validation import ValidationReport

__all__ = [
    "ClusterStats",
    "ZCacheSchedulerPlugin",
    "ZCacheWorkerPlugin",
    "clear",
    "cluster_stats",
    "dashboard_link",
    "install",
    "revalidate",
]


def install(
    client: Client,
    config: CacheConfig | str | None = None,
    *,
    promotion_threshold: float = 1.0,
    warm: bool = False,
) -> None:
    """Install zcache on a cluster: the scheduler aggregator and a cache on every worker.

    Idempotent (installing again is a no-op), and workers that join later get a
    cache too. Can be called before or after the workers start.

    Parameters
    ----------
    client
        A connected `distributed.Client`.
    config
        The workers' cache settings: a `CacheConfig`, a configured cache name, or
        ``None`` for the defaults. Stores opened with a config of the same *name*
        use the worker's cache on the workers.
    promotion_threshold
        Cluster-wide accesses/s at which a disk-held key is promoted to memory.
    warm
        Pre-warm keys hot on several workers on the others reading their array.
    """
    from xarray_zcache.registry import resolve_config

    cfg = resolve_config(config)
    client.register_plugin(
        ZCacheSchedulerPlugin(
            promotion_threshold=promotion_threshold,
            warm=warm,
            placement=cfg.placement and cfg.peer_reads,
        )
    )
    client.register_plugin(ZCacheWorkerPlugin(cfg))
    _announce_writes_from(client)
    if cfg.peer_reads:
        _wait_for_membership(client)


def _wait_for_membership(client: Client, timeout: float = 10.0) -> None:
    """Wait until every worker knows the scheduler's current cache hosts (pushes are async)."""
    import time

    def scheduler_version(dask_scheduler: Any) -> int:
        plugin = dask_scheduler.plugins.get(ZCacheSchedulerPlugin.name)
        return -1 if plugin is None else int(plugin.directory.membership.version)

    def worker_version(dask_worker: Any) -> int:
        from xarray_zcache.distributed.worker import worker_cache_state

        state = worker_cache_state(dask_worker)
        if state is None or state.peer is None:
            return -1
        return int(state.peer.membership.version)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        want = client.run_on_scheduler(scheduler_version)  # type: ignore[no-untyped-call]
        have = client.run(worker_version)
        if want >= 0 and all(v >= want for v in have.values()):
            return
        time.sleep(0.05)


def _announce_writes_from(client: Client) -> None:
    """Writes through zcache in this (client) process reach the workers' caches at once."""
    import asyncio

    from xarray_zcache.cache.coherence import (
        add_invalidation_listener,
        remove_invalidation_listener,
    )
    from xarray_zcache.distributed.directory import announce_write

    scheduler: Any = client.scheduler
    loop: Any = client.loop
    if scheduler is None or loop is None:
        return

    name = f"dask-scheduler {scheduler.address}"
    held = weakref.ref(client)  # (the listener must not keep a closed client alive)

    def announce(keys: list[tuple[str, bool]]) -> Any:
        live = held()
        if live is None or live.status in ("closing", "closed") or loop.asyncio_loop is None:
            # the client closed: nobody to tell any more (its workers are gone or were
            # told by their own plugin); a leftover listener must not fail later writes
            remove_invalidation_listener(name)
            return None
        coro = announce_write(scheduler, keys, None)
        return asyncio.run_coroutine_threadsafe(coro, loop.asyncio_loop)

    add_invalidation_listener(name, announce)


def dashboard_link(client: Client) -> str:
    """The URL of the ``/zcache`` page on the cluster's Dask dashboard.

    Built from ``client.dashboard_link`` (which ends in ``/status``, or in what the
    ``distributed.dashboard.link`` setting says) and the path the scheduler
    mounted the page at, so it respects the dashboard's ``http_prefix``. The
    JSON for scripts is at ``dashboard_link(client) + "/api/stats.json"``.

    Parameters
    ----------
    client
        A client of a cluster with zcache installed (see `install`).

    Returns
    -------
    str
        E.g. ``"http://127.0.0.1:8787/zcache"``.

    Raises
    ------
    RuntimeError
        If the scheduler has no dashboard, or zcache is not installed on it.
    """
    from urllib.parse import urlsplit

    from xarray_zcache.distributed.dashboard import page_path

    try:
        link = client.dashboard_link
    except (KeyError, AttributeError, TypeError):
        link = None
    if not link:
        raise RuntimeError("the scheduler has no dashboard (no HTTP server)")
    path = client.run_on_scheduler(page_path)  # type: ignore[no-untyped-call]
    if not path:
        raise RuntimeError(
            "the scheduler has no /zcache page: call xarray_zcache.distributed.install(client)"
        )
    base = str(link).split("?", 1)[0].split("#", 1)[0]
    if base.endswith("/status"):
        base = base[: -len("status")]
    elif not base.endswith("/"):
        base += "/"
    # the page's path is "{http_prefix}zcache"; the link may already include the prefix
    prefix = str(path)[: -len("zcache")]
    if urlsplit(base).path.endswith(prefix):
        return base + "zcache"
    return base.rstrip("/") + str(path)


def decisions(client: Client, n: int = 100) -> list[dict[str, Any]]:
    """The aggregator's most recent promotion / warm decisions."""
    return list(_scheduler_call(client, "zcache_decisions", n=n) or [])


def _clear_worker_cache(dask_worker: Any, prefix: str) -> int:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    if state is None:
        return 0
    state.cache.clear(prefix)
    state.cache.reset_stats()
    return 1


def clear(client: Client, prefix: str = "") -> int:
    """Drop every cached entry (or those under ``prefix``) on every worker.

    Returns the number of worker caches cleared. The disk tiers are shared by the
    workers of a host, so their entries are gone for all of them.
    """
    results = client.run(_clear_worker_cache, prefix=prefix)
    return sum(results.values())


def _revalidate_task(url: str, storage_options: dict[str, Any] | None) -> Any:
    """A task: validate this worker's cached entries of ``url`` now (None: no cache)."""
    from distributed import get_worker
    from zarr.core.sync import sync

    from xarray_zcache.backend import open_store
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(get_worker())
    if state is None:
        return None
    store = open_store(url, storage_options=storage_options, cache_config=state.config)
    return sync(store.revalidate())


def revalidate(
    client: Client, url: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, ValidationReport]:
    """Validate every worker's cached entries of the dataset at ``url`` against the
    source now (`CachedStore.revalidate` on each worker), instead of within the
    validation interval: changed, deleted and created objects are dropped everywhere.

    Runs as one task per worker (it waits for a free thread there). Returns each
    worker's `ValidationReport` (workers without a cache are left out). Every worker
    lists what it caches: one listing per unit with cached entries.
    """
    import uuid

    opts = None if storage_options is None else dict(storage_options)
    token = uuid.uuid4().hex
    workers = sorted(client.scheduler_info()["workers"])  # type: ignore[no-untyped-call]
    futures = [
        client.submit(
            _revalidate_task,
            url,
            opts,
            key=f"zcache-revalidate-{token}-{i}",
            workers=[w],
            allow_other_workers=False,
            pure=False,
        )
        for i, w in enumerate(workers)
    ]
    results = client.gather(futures)  # type: ignore[no-untyped-call]
    return {w: r for w, r in zip(workers, results, strict=True) if r is not None}
