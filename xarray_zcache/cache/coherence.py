"""Writes, deletes and invalidation through the cache: one rule, every cache of the process.

A write or delete invalidates before and after the source's write (a crash
between the two must not leave the old value on disk), in every open cache of
the process (two configs over one dataset are two caches), and drops listings.
`HybridCache` inherits this; it also keeps the process-wide set of open caches,
flushed at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from xarray_zcache.cache.admission import Admission
from xarray_zcache.cache.logs import events
from xarray_zcache.cache.negatives import NEGATIVE_SUFFIX, Listings, NegativeEntries
from xarray_zcache.cache.policy import Invalidations
from xarray_zcache.cache.recorder import StatsRecorder
from xarray_zcache.cache.request import PART_SEP, Read

if TYPE_CHECKING:
    from xarray_zcache.cache.decoded import DecodedTier
    from xarray_zcache.cache.disk import DiskTier
    from xarray_zcache.cache.freshness import Freshness
    from xarray_zcache.cache.memory import MemoryTier
    from xarray_zcache.cache.writer import DiskWriter

__all__ = [
    "Coherence",
    "add_invalidation_listener",
    "invalidate_local",
    "live_caches",
    "remove_invalidation_listener",
]

logger = logging.getLogger("xarray_zcache.cache")
_events = events("xarray_zcache.cache")

_LIVE: weakref.WeakSet[Coherence] = weakref.WeakSet()


@atexit.register
def _flush_all_at_exit() -> None:
    # a short script must still leave its disk tier filled for the next process
    for cache in list(_LIVE):
        try:
            cache.close()
        except Exception:  # pragma: no cover - best effort at exit
            logger.exception("xarray-zcache: flushing the cache at exit failed")


def live_caches() -> list[Coherence]:
    """Every open cache of this process."""
    return [c for c in list(_LIVE) if not c.closed]


# Who else must hear of a write: e.g. the other workers of a Dask cluster. A listener
# takes [(key, is_prefix), ...] and returns a future done once they heard (or None).
Announce = Callable[[list[tuple[str, bool]]], "concurrent.futures.Future[object] | None"]
_listeners: dict[str, Announce] = {}
ANNOUNCE_TIMEOUT = 30.0


def add_invalidation_listener(name: str, listener: Announce) -> None:
    """Tell ``listener`` of every write or delete through a cache of this process."""
    _listeners[name] = listener


def remove_invalidation_listener(name: str) -> None:
    _listeners.pop(name, None)


def invalidate_local(keys: list[tuple[str, bool]]) -> None:
    """Invalidate ``keys`` (``(key, is_prefix)``) in every cache of this process, telling
    no listener (what a cluster broadcast of another process's write calls)."""
    for cache in live_caches():
        for key, prefix in keys:
            _invalidate_in(cache, key, prefix)
        cache._listings.drop("")


def _invalidate_in(cache: Coherence, key: str, prefix: bool) -> None:
    """``cache._invalidate_here``, never raising into the writer: a cache that fails
    (another config's, whose folder vanished) is logged and loses its disk tier."""
    try:
        cache._invalidate_here(key, prefix)
    except Exception as exc:  # pragma: no cover - `_invalidate_here` absorbs disk errors
        logger.warning("xarray-zcache: invalidating %r in %r failed (%s)", key, cache, exc)
        cache._lose_disk(exc, "invalidating an entry")


def _pairs(keys: list[str]) -> list[tuple[str, bool]]:
    return [(k, k.endswith(("/", PART_SEP))) for k in keys]


def _announce(keys: list[str]) -> list[concurrent.futures.Future[object]]:
    futures = []
    for name, listener in list(_listeners.items()):
        try:
            f = listener(_pairs(keys))
        except Exception:
            logger.exception("xarray-zcache: telling %s of a write failed", name)
            continue
        if f is not None:
            futures.append(f)
    return futures


async def _announced(keys: list[str]) -> None:
    futures = _announce(keys)
    if futures:
        done = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        try:
            results = await asyncio.wait_for(done, ANNOUNCE_TIMEOUT)
        except TimeoutError:
            results = [TimeoutError("no answer")]
        _log_failures(results)


def _announced_sync(keys: list[str]) -> None:
    results: list[object] = []
    for f in _announce(keys):
        try:
            results.append(f.result(ANNOUNCE_TIMEOUT))
        except Exception as exc:
            results.append(exc)
    _log_failures(results)


def _log_failures(results: list[object]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            logger.warning(
                "xarray-zcache: other caches of the cluster may not have heard of a write (%s); "
                "they drop the old value at the latest when its TTL or validation runs",
                r,
            )


class Coherence(Admission):
    """The write and invalidation half of `HybridCache` (state is the cache's)."""

    _memory: MemoryTier
    _decoded: DecodedTier
    _disk: DiskTier | None
    _writer: DiskWriter | None
    _negatives: NegativeEntries
    _listings: Listings
    _inv: Invalidations
    _admit_lock: threading.Lock
    _prefetched: set[str]
    _stats: StatsRecorder
    _freshness: Freshness

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _lose_disk(self, exc: BaseException, action: str) -> None:
        raise NotImplementedError

    # -- writes and deletes --------------------------------------------------------------------

    async def write_through(
        self, read: Read, value: bytes, write: Callable[[], Awaitable[None]], *, keep: bool
    ) -> None:
        """Run ``write()`` (the source's write of ``value`` to ``read.key``) through the cache.

        Invalidates before the write (a crash between the write and the
        invalidation after it must not leave the old value on disk) and after it;
        on success admits ``value`` to memory if ``keep`` (memory only: nothing
        orders writers in other processes sharing the disk tier).
        """
        keys = [read.key, read.key + PART_SEP]
        self._drop_safely(keys)
        token = self._inv.begin(read.key)
        try:
            await write()
        except BaseException:
            self._drop_safely(keys)  # the source may hold either value: cache neither
            await _announced(keys)
            raise
        else:
            self._after_write(read, token, value, keep)
            await _announced(keys)
        finally:
            self._inv.end(read.key)

    def write_through_sync(
        self, read: Read, value: bytes, write: Callable[[], None], *, keep: bool
    ) -> None:
        """`write_through` for synchronous callers."""
        keys = [read.key, read.key + PART_SEP]
        self._drop_safely(keys)
        token = self._inv.begin(read.key)
        try:
            write()
        except BaseException:
            self._drop_safely(keys)
            _announced_sync(keys)
            raise
        else:
            self._after_write(read, token, value, keep)
            _announced_sync(keys)
        finally:
            self._inv.end(read.key)

    def _after_write(self, read: Read, token: tuple[int, int], value: bytes, keep: bool) -> None:
        self._drop_safely([read.key, read.key + PART_SEP])
        self._stats.write(len(value))
        if keep:
            self._admit(read.key, token, value, read.kind, own=1, disk=False)

    # -- invalidation --------------------------------------------------------------------------

    def invalidate(self, key: str, *, prefix: bool = False) -> None:
        """Drop ``key`` (or every key starting with it) from every cache of this process.

        Every cache of the process: two configs over the same data are two caches,
        and a write through one must not leave the other serving the old bytes.
        """
        for cache in live_caches():
            _invalidate_in(cache, key, prefix)

    def _invalidate_here(self, key: str, prefix: bool) -> None:
        with self._admit_lock:
            self._decoded.drop(key, prefix=prefix)
            if prefix:
                self._inv.bump_prefix(key)
                self._memory.delete_prefix(key)
                self._negatives.discard_prefix(key)
                if self._writer is not None:
                    self._writer.discard_prefix(key)
            else:
                self._inv.bump(key)
                self._memory.delete(key)
                self._negatives.discard(key)
                if self._writer is not None:
                    self._writer.discard(key)
                    self._writer.discard(key + NEGATIVE_SUFFIX)
            self._prefetched.discard(key)
        # memory is consistent now; a disk that cannot drop the key is dropped itself
        # (never a stale entry served, never an error for the writer)
        disk = self._disk
        try:
            self._freshness.forget(key, prefix=prefix)
            if disk is not None:
                if prefix:
                    disk.delete_prefix(key)
                else:
                    disk.delete(key)
                    disk.delete(key + NEGATIVE_SUFFIX)
        except Exception as exc:
            self._lose_disk(exc, "invalidating an entry")
        self._stats.add("invalidations")
        _events.debug(
            "invalidation",
            "xarray-zcache: invalidated %s%r in %r",
            "every key under " if prefix else "",
            key,
            self,
        )

    async def invalidating(self, keys: list[str], op: Callable[[], Awaitable[None]]) -> None:
        """Run ``op()`` (a delete, or a write whose result is unknown) through the cache.

        ``keys`` are invalidated before and after it (a key ending in ``"/"`` or
        ``PART_SEP`` is a prefix), in every cache of the process, and listings dropped.
        """
        self._drop_safely(keys)
        try:
            await op()
        finally:
            self._drop_safely(keys)
            await _announced(keys)

    def invalidating_sync(self, keys: list[str], op: Callable[[], None]) -> None:
        """`invalidating` for synchronous callers."""
        self._drop_safely(keys)
        try:
            op()
        finally:
            self._drop_safely(keys)
            _announced_sync(keys)

    def _drop_safely(self, keys: list[str]) -> None:
        """`_drop_all`, never raising: the write must reach the source all the same."""
        try:
            self._drop_all(keys)
        except Exception as exc:  # pragma: no cover - every cache absorbs its own errors
            self._lose_disk(exc, "invalidating around a write")

    def _drop_all(self, keys: list[str]) -> None:
        for key in keys:
            self.invalidate(key, prefix=key.endswith(("/", PART_SEP)))
        for cache in live_caches():
            cache._listings.drop("")

    def clear(self, prefix: str = "") -> None:
        """Drop every entry (or every entry whose key starts with ``prefix``) here."""
        self._invalidate_here(prefix, True)
        self._listings.drop(prefix)
        if not prefix:
            self._freshness.clear()

    def drop_object(self, key: str) -> None:
        """Drop object ``key`` here: whole, every part, negative entry (for validation,
        which other processes of the folder learn of through the version book)."""
        self._invalidate_here(key, False)
        self._invalidate_here(key + PART_SEP, True)
        self._listings.drop("")

    def drop_memory(self, prefix: str) -> None:
        """Drop the entries under ``prefix`` from memory only (another process of the
        folder found some of them changed, and dropped them on disk already); this
        process's pending disk writes of them too (they hold the old bytes)."""
        with self._admit_lock:
            self._inv.bump_prefix(prefix)
            self._decoded.drop(prefix, prefix=True)
            self._memory.delete_prefix(prefix)
            self._negatives.discard_prefix(prefix)
            if self._writer is not None:
                self._writer.discard_prefix(prefix)
        self._listings.drop("")

    def drop_memory_object(self, key: str) -> None:
        """`drop_memory` for object ``key``: whole, every part, negative entry."""
        part = key + PART_SEP
        with self._admit_lock:
            self._inv.bump(key)
            self._inv.bump_prefix(part)
            self._memory.delete(key)
            self._memory.delete_prefix(part)
            self._decoded.drop(key)
            self._decoded.drop(part, prefix=True)
            self._negatives.discard(key)
            if self._writer is not None:
                self._writer.discard(key)
                self._writer.discard(key + NEGATIVE_SUFFIX)
                self._writer.discard_prefix(part)
            self._prefetched.discard(key)
        self._listings.drop("")
