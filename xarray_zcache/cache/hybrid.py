"""The hybrid cache: one owner of the read protocol over a memory tier and a disk tier.

Every read goes through `HybridCache.get_or_load` (or `get_or_load_sync`)::

    memory (whole object, then the part) → pending disk writes → negative entries
      → disk (in a thread; negative entries there too) → [shared tiers] → load()

with single flight per key and event loop, and one admission rule for every tier:
a value is admitted only if its key was not invalidated since the read began
(`Admission._admit`, under the admission lock that `invalidate` also takes). Writes go
through `write_through`/`write_through_sync`, deletes through `delete_through`:
invalidate, write, invalidate again, and (optionally) admit what was written to
memory. New steps (a peer tier, a validation step) plug in with `add_shared_tier`
without touching the callers.

The cache knows nothing about zarr: keys are opaque strings; ``kind`` is a label
(``"metadata"`` or ``"chunk"``) that selects a TTL and a stats bucket.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from xarray_zcache.cache.access import DirectAccess
from xarray_zcache.cache.answers import UNANSWERED, MemoryAnswers, Unanswered, _Unanswered
from xarray_zcache.cache.coherence import _LIVE, Coherence
from xarray_zcache.cache.decoded import DecodedTier
from xarray_zcache.cache.disk import DiskTier
from xarray_zcache.cache.fallback import DiskFallback
from xarray_zcache.cache.flight import SingleFlight
from xarray_zcache.cache.freshness import Freshness
from xarray_zcache.cache.logs import log_created
from xarray_zcache.cache.maintenance import schedule
from xarray_zcache.cache.memory import MemoryTier
from xarray_zcache.cache.negatives import Listings, NegativeEntries
from xarray_zcache.cache.policy import AccessRateTracker, Invalidations
from xarray_zcache.cache.reporting import CacheReporting
from xarray_zcache.cache.request import Read, is_private
from xarray_zcache.cache.settings import CacheSettings
from xarray_zcache.cache.tiers import SharedTier, open_disk_tier
from xarray_zcache.cache.versions import VersionBook
from xarray_zcache.cache.writer import DiskWriter

__all__ = ["UNANSWERED", "HybridCache", "Read", "SharedTier", "Unanswered"]

logger = logging.getLogger("xarray_zcache.cache")

_T = TypeVar("_T")


class HybridCache(DirectAccess, MemoryAnswers, CacheReporting, DiskFallback, Coherence):
    """A memory tier over an optional persistent disk tier, mapping str keys to bytes.

    Fills after a miss go to memory at once and to disk in a background thread;
    `flush` waits for them and runs at `close` and at interpreter exit. All
    methods are thread-safe; disk reads of the async path run in a worker thread.

    Parameters
    ----------
    settings
        A `CacheSettings`, or any object with the same attributes (a `CacheConfig`).

    Attributes
    ----------
    disk_refused : str or None
        Why the disk folder was refused when the cache was opened (it cannot be written;
        a newer xarray-zcache wrote it): the cache runs in memory only. None when the disk
        tier opened or no folder was given (`open_disk_tier`).

    Examples
    --------
    >>> cache = HybridCache(CacheSettings(memory_size=10_000_000))
    >>> cache.get_or_load_sync(Read("ns/a", "chunk"), lambda: b"abc")
    b'abc'
    >>> cache.stats().requests_sent, cache.get_or_load_sync(Read("ns/a", "chunk"), lambda: b"")
    (1, b'abc')
    """

    def __init__(self, settings: Any) -> None:
        self.settings = CacheSettings.of(settings)
        s = self.settings
        self._memory = MemoryTier(s.memory_size, policy=s.eviction_policy)  # type: ignore[arg-type]
        self._disk, self.disk_refused = open_disk_tier(s)
        self._decoded = DecodedTier(s.decoded_capacity())
        super().__init__(s.top_n)
        self._last_hit = 0.0  # time.monotonic() of the last hit: the disk writer yields to hits
        self._writer = (
            None
            if self._disk is None
            else DiskWriter(
                self._disk,
                s.write_queue_size,
                self._count_dropped_write,
                self._lose_disk,
                busy=self._since_last_hit,
            )
        )
        self._negatives = NegativeEntries(s.negative_ttl, self._disk)
        self._listings = Listings(s.listing_ttl)
        self._rates = AccessRateTracker()
        self._inv = Invalidations()
        self._flights = SingleFlight()
        self._shared: list[SharedTier] = []
        disk = self._disk
        book = VersionBook(
            None if disk is None else str(disk.path), had_entries=disk is not None and len(disk) > 0
        )
        book.on_lost = self._lose_disk
        self._freshness = Freshness(self, book, s.validation)
        # one lock orders admissions against invalidations: check-then-put is atomic
        self._admit_lock = threading.Lock()
        self._closed = False
        # named test points ("disk-read", "admit"): called with the key; see tests
        self.hooks: dict[str, Callable[[str], None]] = {}
        _LIVE.add(self)
        log_created(s, self._disk)

    def __repr__(self) -> str:
        disk = self._disk
        return f"<HybridCache {self.settings.name!r} {disk.path if disk is not None else 'memory'}>"

    @property
    def config(self) -> CacheSettings:
        """The settings (kept under this name for callers of the first release)."""
        return self.settings

    @property
    def disk_tier(self) -> DiskTier | None:
        """The disk tier, for inspection by tools and tests (reads go through `get_or_load`)."""
        return self._disk

    @property
    def memory_tier(self) -> MemoryTier:
        """The memory tier, for inspection by tools and tests."""
        return self._memory

    @property
    def decoded_tier(self) -> DecodedTier:
        """The decoded tier (arrays keyed like their encoded entries; see
        `xarray_zcache.cache.decoded`); its capacity is 0 when it is off."""
        return self._decoded

    @property
    def maintenance_interval(self) -> float:
        return self.settings.maintenance_interval

    @property
    def freshness(self) -> Freshness:
        """Validation against the source's versions (see `xarray_zcache.cache.freshness`)."""
        return self._freshness

    def add_shared_tier(self, tier: SharedTier) -> None:
        """Ask ``tier`` after memory and disk, before loading from the source."""
        self._shared.append(tier)

    def _expires(self, kind: str) -> float | None:
        ttl = self.settings.ttl(kind)
        return None if ttl is None else time.time() + ttl

    # -- the read protocol ---------------------------------------------------------------------

    def _may_be_on_disk(self, read: Read) -> bool:
        """A ``stat`` or two in the caller's thread spares a cold miss the thread hop."""
        disk = self._disk
        if disk is None or is_private(read.key):
            return False
        return (
            disk.might_contain(read.key)
            or (read.whole is not None and disk.might_contain(read.whole))
            or self._negatives.maybe_on_disk(read.object_key)
        )

    def _from_disk(self, read: Read) -> tuple[bytes | None, bool]:
        """Disk step (blocking I/O): ``(value, known_missing)``; promotes per policy.

        A disk that fails is dropped (`_lose_disk`) and the read goes on as a miss.
        """
        disk = self._disk
        if disk is None:
            return None, False
        try:
            return self._read_disk(disk, read)
        except Exception as exc:
            self._lose_disk(exc, "reading an entry")
            return None, False

    def _read_disk(self, disk: DiskTier, read: Read) -> tuple[bytes | None, bool]:
        now = time.time()
        if not read.recheck and self._negatives.on_disk(read.object_key, now):
            return None, True
        keys = [read.key] if read.whole is None else [read.whole, read.key]
        for key in keys:
            token = self._inv.begin(key)
            try:
                entry = disk.get_entry(key, now=now)
                if entry is None:
                    continue
                if self.hooks:
                    self._hook("disk-read", key)
                value = entry.value
                if key is read.whole:
                    assert read.cut is not None
                    part = read.cut(value)
                    if part is None:
                        continue
                else:
                    part = value
                # a promotion is an admission: dropped if the key was invalidated since
                # this read began (a write completed meanwhile)
                if (
                    not read.prefetch
                    and self._wants_promotion(key)
                    and self._admit(key, token, value, entry.kind, disk=False, ex=entry.expires)
                ):
                    self._stats.add("promotions")
                return part, False
            finally:
                self._inv.end(key)
        return None, False

    def _hook(self, name: str, key: str) -> None:
        hook = self.hooks.get(name)
        if hook is not None:
            hook(key)

    def _wants_promotion(self, key: str) -> bool:
        threshold = self.settings.promotion_threshold
        return threshold == 0 or self._rates.touch(key) >= threshold

    async def get_or_load(
        self, read: Read, load: Callable[[], Awaitable[bytes | None]]
    ) -> bytes | None:
        """The bytes of ``read``: from a tier, else from ``load()`` (then admitted).

        ``load`` returns ``None`` for a missing object (remembered as a negative
        entry); its exceptions propagate unchanged and nothing is cached.
        """
        answer = self._from_memory_or_negatives(read)
        if answer is UNANSWERED and self._may_be_on_disk(read):
            answer = self._counted(read, await asyncio.to_thread(self._from_disk, read))
        if not isinstance(answer, _Unanswered):
            return answer
        return await self._load_once(read, load)

    def _since_last_hit(self) -> float:
        """Seconds since the last memory hit (the disk writer waits while hits come)."""
        return time.monotonic() - self._last_hit

    def _counted(self, read: Read, found: tuple[bytes | None, bool]) -> bytes | _Unanswered | None:
        """Count what the disk step (`_from_disk`) found."""
        value, missing = found
        if missing:
            self._count_negative(read)
            return None
        if value is not None:
            self._count_hit("disk", read, value)
            return value
        return UNANSWERED

    async def _load_once(
        self, read: Read, load: Callable[[], Awaitable[bytes | None]]
    ) -> bytes | None:
        """Single flight: one load per key and loop, joined only while still valid."""
        while (fut := self._flights.joinable(read.key, self._inv.unchanged)) is not None:
            try:
                value = await asyncio.shield(fut)
            except asyncio.CancelledError:
                if not fut.cancelled():
                    raise  # we were cancelled ourselves
                # the leader was cancelled: take over
                continue
            # joined another load: this read sent nothing (a hit on a read-ahead's fill
            # if a read-ahead led, which `_count_hit` tells from `_prefetched`)
            if value is None:
                self._count_negative(read)
            else:
                self._count_hit("memory", read, value)
            return value
        # another load (a read-ahead) may have filled the entry while we looked on disk
        value = self._from_memory(read)
        if value is not None:
            self._count_hit("memory", read, value)
            return value
        token = self._inv.begin(read.key)
        flight = self._flights.start(read.key, token)
        try:
            value = await self._load_and_admit(read, token, load)
        except asyncio.CancelledError:
            flight.future.cancel()
            raise
        except BaseException as exc:
            flight.future.set_exception(exc)
            flight.future.exception()  # retrieved: waiters re-raise it themselves
            raise
        else:
            flight.future.set_result(value)
            return value
        finally:
            self._flights.finish(read.key, flight)
            self._inv.end(read.key)

    async def _load_and_admit(
        self, read: Read, token: tuple[int, int], load: Callable[[], Awaitable[bytes | None]]
    ) -> bytes | None:
        started_ns = time.time_ns()
        if not read.for_peer and not is_private(read.key):  # private keys: never to peers
            for tier in self._shared:
                answer = await tier.lookup(read)
                if answer is None:
                    continue
                if answer.saved:
                    self._count_hit(tier.name, read, answer.value)
                else:
                    self._stats.add("peer_loads")
                # the owner keeps the cluster's copy on disk: a replica here is kept in
                # memory only, and only for keys read often enough (hot data replicated)
                if self._wants_promotion(read.key):
                    expires = self._replica_expires(read.kind, answer.confirmed)
                    if expires is None or expires > time.time():
                        got = answer.value
                        self._admit(read.key, token, got, read.kind, disk=False, ex=expires)
                return answer.value
        t0 = time.perf_counter()
        try:
            value = await load()
        except BaseException:
            self._stats.add("inner_errors")
            raise
        self._after_load(read, token, value, time.perf_counter() - t0, started_ns)
        return value

    def _replica_expires(self, kind: str, confirmed: float | None) -> float | None:
        """A peer's answer is served here until its owner's confirmation time + the
        validation interval (the bound counts from the owner's), or the kind's TTL."""
        expires = self._expires(kind)
        interval = self._freshness.interval
        if confirmed is None or not interval:  # (None: never validated; 0: once per open)
            return expires
        bound = confirmed + interval
        return bound if expires is None else min(expires, bound)

    def get_or_load_sync(self, read: Read, load: Callable[[], bytes | None]) -> bytes | None:
        """`get_or_load` for synchronous callers (no event loop, no single flight)."""
        answer = self._from_memory_or_negatives(read)
        if answer is UNANSWERED and self._may_be_on_disk(read):
            answer = self._counted(read, self._from_disk(read))
        if not isinstance(answer, _Unanswered):
            return answer
        token = self._inv.begin(read.key)
        started_ns = time.time_ns()
        t0 = time.perf_counter()
        try:
            value = load()
        except BaseException:
            self._stats.add("inner_errors")
            self._inv.end(read.key)
            raise
        try:
            self._after_load(read, token, value, time.perf_counter() - t0, started_ns)
        finally:
            self._inv.end(read.key)
        return value

    def _after_load(
        self,
        read: Read,
        token: tuple[int, int],
        value: bytes | None,
        seconds: float,
        started_ns: int,
    ) -> None:
        self._count_miss(read, len(value or b""), seconds)
        if value is None:
            if read.whole is None:  # zarr leaves all-fill chunks unwritten: remember that too
                self._remember_missing(read, token, started_ns)
            return
        if read.recheck or self._negatives.in_memory(read.key, time.time()):
            self._forget_missing(read.key)  # it exists now
        self._admit(read.key, token, value, read.kind, read=read, started_ns=started_ns)

    def _count_dropped_write(self) -> None:
        self._stats.add("disk_write_failures")

    # -- lifecycle -----------------------------------------------------------------------------

    def start_maintenance(self) -> None:
        """Run `maintain` periodically on the process's maintenance thread."""
        if not self._closed:
            schedule(self)

    def maintain(self) -> None:
        """Drop expired entries, enforce sizes, flush access statistics."""
        now = time.time()
        self._memory.drop_expired(now)
        self._negatives.sweep(now)
        self._listings.sweep(now)
        self._on_disk("maintenance", lambda d: _maintain_disk(d, now), None)

    def flush(self) -> None:
        """Wait for background disk writes and persist access statistics."""
        writer = self._writer
        if writer is not None:
            writer.flush()
        self._on_disk("flushing access statistics", DiskTier.flush, None)

    def close(self) -> None:
        """Flush, stop the disk writer, close the disk index and release the memory the
        memory and decoded tiers hold (a closed cache serves nothing: its stores bind to a
        new one). Idempotent."""
        if self._closed:
            return
        writer = self._writer
        if writer is not None:
            writer.close()
        with self._admit_lock:
            self._closed = True
        self._on_disk("closing", DiskTier.close, None)
        self._freshness.book.close()
        self._memory.clear()
        self._decoded.clear()
        _LIVE.discard(self)

    @property
    def disk_backlog(self) -> float:
        """Fraction of ``write_queue_size`` waiting for the background disk writer."""
        writer = self._writer
        return 0.0 if writer is None else writer.backlog

    @property
    def closed(self) -> bool:
        return self._closed


def _maintain_disk(disk: DiskTier, now: float) -> None:
    disk.drop_expired(now)
    disk.evict()
    disk.prune_tombstones()
    disk.flush()
    disk.save_location_map()
