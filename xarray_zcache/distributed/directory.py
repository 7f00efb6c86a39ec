"""The scheduler's directory of cache hosts, and the broadcast of writes.

Kept by `ZCacheSchedulerPlugin`: workers join with their cache host (``zcache_join``)
and leave when the scheduler removes them; every change bumps the membership's
version and is pushed to every member worker (``zcache_membership``), and rides
on report replies for any worker that missed the push. A write or delete through
zcache anywhere is announced (``zcache_invalidate``) and broadcast to every other
worker (``zcache_invalidate_local``) before the write returns.

A worker that does not acknowledge a broadcast (its handler failed, it timed out, it
could not be reached) may still hold the old value: it leaves the ownership ring (a
new membership version, pushed to the others before the write returns) so that no
healthy worker asks it for a key any more, and the writer is told its address (and
logs a warning). The keys it missed are kept; they are sent to it again when it
reports (or joins again), and once it acknowledges them it is back in the ring.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from xarray_zcache.distributed.membership import Membership

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["Directory", "announce_write"]

logger = logging.getLogger("xarray_zcache.distributed")

#: seconds a membership push to one worker may take
_PUSH_TIMEOUT = 10.0
#: seconds a worker may take to acknowledge an invalidation (the writer waits 30 s)
INVALIDATE_TIMEOUT = 10.0
#: keys kept per worker that missed them; beyond, its whole process caches are dropped
#: when it comes back (one prefix "" for all)
_MAX_MISSED = 100_000


async def announce_write(scheduler: Any, keys: list[tuple[str, bool]], origin: str | None) -> Any:
    """Announce a write's keys to the scheduler (from the writer's process); a warning
    names the workers that did not acknowledge them."""
    reply = await scheduler.zcache_invalidate(keys=[list(k) for k in keys], origin=origin)
    missed = reply.get("missed") if isinstance(reply, dict) else None
    if missed:
        logger.warning(
            "xarray-zcache: workers %s did not acknowledge the invalidation of a write "
            "(%d keys, e.g. %r) and may hold the old value; they are out of the cluster "
            "cache's ownership ring (no worker asks them) until they acknowledge it",
            ", ".join(str(w) for w in missed),
            len(keys),
            keys[0][0] if keys else "",
        )
    return reply


class Directory:
    """Membership of the cluster's cache hosts, versioned, and write broadcasts."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.membership = Membership()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: workers out of the ring until they acknowledge: address -> (cache host,
        #: the (key, is_prefix) invalidations they missed)
        self.deaf: dict[str, tuple[str, dict[str, bool]]] = {}
        self._retrying: set[str] = set()
        self._misses: dict[str, int] = {}  # worker -> broadcasts missed (a generation)

    def join(self, worker: str, host: str) -> dict[str, Any]:
        if worker in self.deaf:  # joined again: in the ring once it heard what it missed
            self.deaf[worker] = (host, self.deaf[worker][1])
            self.retry(worker)
            return self.membership.to_msg()
        if self.membership.host_of(worker) != host:
            self.membership = self.membership.with_worker(host, worker)
            logger.info("xarray-zcache: %s joined cache host %s", worker, host)
            self._push()
        return self.membership.to_msg()

    def leave(self, worker: str) -> None:
        self.deaf.pop(worker, None)
        self._misses.pop(worker, None)
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
        self._spawn(self._send(self.membership.to_msg(), self._workers()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
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

    async def _tell(self, address: str, pairs: list[list[Any]]) -> bool:
        """Send ``pairs`` to ``address``; whether it acknowledged them."""
        try:
            async with asyncio.timeout(INVALIDATE_TIMEOUT):
                heard = await self.scheduler.rpc(address).zcache_invalidate_local(keys=pairs)
        except Exception as exc:
            logger.debug("xarray-zcache: invalidation at %s failed: %r", address, exc)
            return False
        return isinstance(heard, int) and heard == len(pairs)

    async def invalidate(self, keys: list[Any], origin: str | None = None) -> dict[str, Any]:
        """Broadcast a write's keys to every worker but ``origin``.

        Returns ``{"heard": n, "missed": [addresses]}``: the workers that did not
        acknowledge are out of the ownership ring (the others know it) when this returns.
        """
        pairs = [[str(k), bool(p)] for k, p in keys]
        workers = [w for w in self.scheduler.workers if w != origin]
        if not workers:
            return {"heard": 0, "missed": []}
        acks = await asyncio.gather(*(self._tell(w, pairs) for w in workers))
        missed = [w for w, ok in zip(workers, acks, strict=True) if not ok]
        if missed:
            await self._out_of_ring(missed, pairs)
        return {"heard": len(workers) - len(missed), "missed": missed}

    async def _out_of_ring(self, workers: list[str], pairs: list[list[Any]]) -> None:
        """``workers`` missed ``pairs``: out of the ring until they acknowledge."""
        before = self.membership
        for w in workers:
            host, missed = self.deaf.get(w) or (before.host_of(w), {})
            if host is None:
                continue  # never joined (no peer reads there): nothing to leave
            for k, p in pairs:
                missed[k] = missed.get(k, False) or p
            if len(missed) > _MAX_MISSED:
                missed = {"": True}
            self.deaf[w] = (host, missed)
            self._misses[w] = self._misses.get(w, 0) + 1
            self.membership = self.membership.without_worker(w)
        logger.warning(
            "xarray-zcache: workers %s did not acknowledge the invalidation of a write "
            "(%d keys, e.g. %r); they leave the cluster cache's ownership ring until they do",
            ", ".join(workers),
            len(pairs),
            pairs[0][0] if pairs else "",
        )
        if self.membership is not before:  # the others stop asking them, before the write returns
            await self._send(self.membership.to_msg(), self._workers())

    def retry(self, worker: str) -> None:
        """Send ``worker`` what it missed (in the background), if it is out of the ring."""
        if worker in self.deaf and worker not in self._retrying:
            self._retrying.add(worker)
            self._spawn(self._retry(worker))

    async def _retry(self, worker: str) -> None:
        try:
            found = self.deaf.get(worker)
            if found is None:
                return
            missed = found[1]
            generation = self._misses.get(worker)
            pairs = [[k, p] for k, p in missed.items()]
            if not await self._tell(worker, pairs):
                return
            if worker not in self.deaf or self._misses.get(worker) != generation:
                return  # it missed more meanwhile: the next report sends them all
            host = self.deaf.pop(worker)[0]
            if self.scheduler.workers.get(worker) is None:
                return
            self.membership = self.membership.with_worker(host, worker)
            logger.info(
                "xarray-zcache: %s acknowledged the invalidations it missed; back in the "
                "cluster cache's ownership ring",
                worker,
            )
            self._push()
        finally:
            self._retrying.discard(worker)
