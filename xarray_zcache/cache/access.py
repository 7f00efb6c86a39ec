"""Direct access to a cache, beside the read protocol: reads the cache passes on
unanswered, lookups without stats, listings, and the scheduler's promotions."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Sized
from typing import TYPE_CHECKING, TypeVar

from xarray_zcache.cache.admission import Admission
from xarray_zcache.cache.negatives import NEGATIVE_SUFFIX
from xarray_zcache.cache.request import PART_SEP

if TYPE_CHECKING:
    from xarray_zcache.cache.disk import DiskEntry, DiskTier
    from xarray_zcache.cache.memory import MemoryTier
    from xarray_zcache.cache.negatives import Listings, NegativeEntries
    from xarray_zcache.cache.policy import Invalidations
    from xarray_zcache.cache.recorder import StatsRecorder
    from xarray_zcache.cache.request import Read
    from xarray_zcache.cache.writer import DiskWriter

__all__ = ["DirectAccess"]

_T = TypeVar("_T")


class DirectAccess(Admission):
    """Part of `HybridCache` (its state is the cache's)."""

    _memory: MemoryTier
    _disk: DiskTier | None
    _writer: DiskWriter | None
    _negatives: NegativeEntries
    _listings: Listings
    _inv: Invalidations
    _admit_lock: threading.Lock
    _stats: StatsRecorder

    if TYPE_CHECKING:  # provided by CacheReporting and HybridCache

        def _count_miss(self, read: Read, nbytes: int, seconds: float) -> None: ...

        def _on_disk(self, action: str, op: Callable[[DiskTier], _T], default: _T) -> _T: ...

    async def load_uncached(self, read: Read, load: Callable[[], Awaitable[_T]]) -> _T:
        """A request the cache passes on unanswered (e.g. an odd byte range): counted as sent."""
        t0 = time.perf_counter()
        try:
            value = await load()
        except BaseException:
            self._stats.add("inner_errors")
            raise
        self._count_miss(
            read, len(value) if isinstance(value, Sized) else 0, time.perf_counter() - t0
        )
        return value

    def load_uncached_sync(self, read: Read, load: Callable[[], _T]) -> _T:
        """`load_uncached` for synchronous callers."""
        t0 = time.perf_counter()
        try:
            value = load()
        except BaseException:
            self._stats.add("inner_errors")
            raise
        self._count_miss(
            read, len(value) if isinstance(value, Sized) else 0, time.perf_counter() - t0
        )
        return value

    # -- side tables: listings, lookups without stats ------------------------------------------

    def get_listing(self, key: str) -> tuple[str, ...] | None:
        """A cached listing under ``key``, or ``None`` if absent or expired."""
        return self._listings.get(key)

    def put_listing(self, key: str, names: tuple[str, ...], generation: int) -> None:
        """Cache a listing taken when `listing_generation` was ``generation``."""
        self._listings.put(key, names, generation)

    def listing_generation(self) -> int:
        return self._listings.generation

    def peek(self, key: str) -> bytes | None:
        """The cached value of ``key`` from any tier, without stats or recency changes."""
        value = self._memory.peek(key)
        writer = self._writer
        if value is None and writer is not None:
            value = writer.pending(key)
        if value is None:
            value = self._on_disk(
                "reading an entry", lambda d: d.get(key) if d.might_contain(key) else None, None
            )
        return value

    def contains(self, key: str) -> bool:
        """Whether ``key`` is cached in any tier (no stats, no recency change)."""
        writer = self._writer
        if key in self._memory or (writer is not None and key in writer):
            return True
        return self._on_disk("looking up an entry", lambda d: key in d, False)

    def cached_objects(self, prefix: str) -> dict[str, bool]:
        """The objects with entries under ``prefix`` in any tier (no stats): object key ->
        True if a value (whole or a part) is cached, False if only "missing" is."""
        found: dict[str, bool] = {}

        def note(key: str) -> None:
            if key.endswith(NEGATIVE_SUFFIX):
                found.setdefault(key[: -len(NEGATIVE_SUFFIX)], False)
            else:
                found[key.split(PART_SEP, 1)[0]] = True

        in_memory = self._memory.keys()
        for key in in_memory:
            if key.startswith(prefix):
                note(key)
        for key in self._negatives.keys_under(prefix):
            found.setdefault(key, False)
        none: list[str] = []
        for key in self._on_disk("listing entries", lambda d: d.keys_under(prefix), none):
            note(key)
        return found

    def has_parts(self, key: str) -> bool:
        """Whether a value of object ``key`` (whole or a part) is cached here (no stats)."""
        part = key + PART_SEP
        negative = key + NEGATIVE_SUFFIX
        in_memory = self._memory.keys()
        if any(k == key or (k.startswith(part) and k != negative) for k in in_memory):
            return True
        none: list[str] = []
        on_disk = self._on_disk("listing entries", lambda d: d.keys_under(key), none)
        return any(k != negative for k in on_disk)

    def known_missing(self, key: str) -> bool:
        """Whether a fresh negative entry says ``key`` is missing (memory only, no stats)."""
        return self._negatives.in_memory(key, time.time())

    # -- cluster hooks -------------------------------------------------------------------------

    def promote(self, keys: list[str]) -> int:
        """Promote ``keys`` held on disk to memory now (kind and expiry kept); return how many."""
        n = 0
        for key in keys:
            if key in self._memory:
                continue
            token = self._inv.begin(key)
            try:
                entry = self._on_disk("reading an entry", _entry_of(key), None)
                if entry is not None and self._admit(
                    key, token, entry.value, entry.kind, disk=False, ex=entry.expires
                ):
                    self._stats.add("promotions")
                    n += 1
            finally:
                self._inv.end(key)
        return n


def _entry_of(key: str) -> Callable[[DiskTier], DiskEntry | None]:
    return lambda disk: disk.get_entry(key)
