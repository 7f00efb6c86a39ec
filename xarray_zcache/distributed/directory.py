"""The scheduler's directory of cache hosts, and the broadcast of writes.

Kept by `ZCacheSchedulerPlugin`: workers join with their cache host (``zcache_join``)
and leave when the scheduler removes them; every change bumps the membership's
version and is pushed to every member worker (``zcache_membership``), and rides
on report replies for any worker that missed the push. A write or delete through
zcache anywhere is announced (``zcache_invalidate``) and broadcast to every other
worker (``zcache_invalidate_local``) before the write returns.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from xarray_zcache.distributed.membership import Membership

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["Directory"]

logger = logging.getLogger("xarray_zcache.distributed")

#: seconds a membership push to one worker may take
_PUSH_TIMEOUT = 10.0


class Directory:
    """Membership of the cluster's cache hosts, versioned, and write broadcasts."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.membership = Membership()
        self._tasks: set[asyncio.Task[Any]] = set()

    def join(self, worker: str, host: str) -> dict[str, Any]:
        if self.membership.host_of(worker) != host:
            self.membership = self.membership.with_worker(host, worker)
            logger.info("xarray-zcache: %s joined cache host %s", worker, host)
            self._push()
        return self.membership.to_msg()

    def leave(self, worker: str) -> None:
        before = self.membership
        self.membership = before.without_worker(worker)
        if self.membership is not before:
            logger.info("xarray-zcache: %s left the cache hosts", worker)
            self._push()

    def reply_extras(self, known_version: object) -> dict[str, Any]:
        """Membership for a worker whose version is older (ridden on report replies)."""
        if isinstance(known_version, int) and known_version >= self.membership.version:
            return {}
        return {"membership": self.membership.to_msg()}

    def _workers(self) -> list[str]:
        return [w for ws in self.membership.hosts.values() for w in ws]

    def _push(self) -> None:
        task = asyncio.ensure_future(self._send(self.membership.to_msg(), self._workers()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, membership: dict[str, Any], workers: list[str]) -> None:
        """Push ``membership`` to ``workers``; one that cannot be reached (it is closing,
        restarting) gets it later on a report reply (`reply_extras`): not an error."""

        async def one(address: str) -> None:
            try:
                async with asyncio.timeout(_PUSH_TIMEOUT):
                    await self.scheduler.rpc(address).zcache_membership(membership=membership)
            except Exception as exc:
                logger.debug("xarray-zcache: membership push to %s failed: %r", address, exc)

        await asyncio.gather(*(one(w) for w in workers))

    async def invalidate(self, keys: list[Any], origin: str | None = None) -> int:
        """Broadcast a write's keys to every worker but ``origin``; returns how many heard."""
        pairs = [[str(k), bool(p)] for k, p in keys]
        workers = [w for w in self.scheduler.workers if w != origin]
        if not workers:
            return 0
        msg = {"op": "zcache_invalidate_local", "keys": pairs}
        replies = await self.scheduler.broadcast(msg=msg, workers=workers, on_error="ignore")
        return len(replies)
