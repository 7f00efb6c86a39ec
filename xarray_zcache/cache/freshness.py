"""`Freshness`: entries are validated against their object's version before they are
served past the validation interval, one *unit* (one listing of the source) at a time.

The rules, each kept here and nowhere else:

* A unit is fresh until its last validation *ended* + ``interval`` (a listing longer
  than the interval does not start another). With an interval of 0, a unit is fresh for
  its store once a validation that started after the store first read it has ended
  (once per open: `Unit.since`). A unit seen for the first time is valid as of then:
  nothing of it can be cached from before (a folder from a release without versions is
  the exception: `VersionBook.legacy`, and its units are validated first).
* At most one validation of a unit is in flight per folder. In a process, the first
  reader of a stale unit validates it and the others wait for it (`_Flight`, any thread
  or event loop) and adopt its result or its failure. Across processes, the validating
  one holds a claim in the book: a lease of `versions.LEASE` seconds, renewed by a
  thread while the listing runs, released when the validation ends, fails or is
  cancelled; a dead holder's claim lapses (at once on the same host). A waiting reader
  never waits on an abandoned claim longer than the lease, then validates itself
  (``counts``: ``joined``, ``claim_waits``, ``lapsed``, ``dead``). A validation lists
  the source once (the
  unit, or only the parts of it that hold cached objects: `Listing.covers`) and
  compares each cached object with its recorded version: changed, deleted, created
  (a negative entry) or of no recorded version → the object's entries are dropped
  (whole object, every range, negative entry). Unchanged objects keep their entries
  and are not re-read. (A changed metadata document is dropped like any object; when
  it is read again, the store drops the array's older chunks: `SourceReads._fetch`.)
* Versions belong to the bytes: a validation compares the listing with the version of
  the bytes this process filled (`Freshness.held`), else with the folder's recorded
  one, and logs a change of any object another process of the folder recorded.
* Another process's changes (its validation or fill found an object changed, a write or
  delete through zcache) reach this process's memory through the folder's change log
  (`VersionBook.log`), read every half interval and at every adoption (`read_log`),
  and through the unit's ``changed`` time: a newer one than this process has seen
  drops the unit's entries from memory.
* A store pickled to a Dask worker carries the client's confirmation time per unit;
  the worker confirms a unit it confirmed earlier than that before serving it
  (`confirm`).
* A fill records the object's version. A fill of a version other than the recorded
  one drops the object's older entries: a part of an object (a shard's index, its
  inner chunks) is never combined with parts of another version — if a range of
  the new version is read while parts of the old one were cached, `ObjectChanged`
  is raised instead of returning bytes the reader would combine with the old parts.
* An object found changed (by a validation or a fill) is *marked*: when its cached parts
  were superseded (`_marks`; another process's validation: the book's ``seen`` time).
  A byte range filled or served (`served`: a hit, a fill shared) for a reader that
  began reading parts of the object before that (`part_reader`: its shard index was
  read before, cached or not) raises `ObjectChanged`: nothing of the old version may be
  cached any more, but the reader may hold it (the index it is about to apply to the
  new bytes). The mark is infinite while the old parts are dropped.
* A validation that fails (the source errs or times out) serves the cached entries
  (stale-if-error) and is retried after ``min(interval, RETRY_AFTER)`` seconds; a
  cached read never raises because of it. It counts one ``validation_errors``, and the
  listing requests it sent (`Tally`) in ``validation_requests``, as a cancelled one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Final, Literal, NamedTuple, Protocol

from xarray_zcache.cache import versions as _versions
from xarray_zcache.cache.request import PART_SEP
from xarray_zcache.cache.versions import UnitState, VersionBook

if TYPE_CHECKING:
    from xarray_zcache.cache.recorder import StatsRecorder

__all__ = [
    "RETRY_AFTER",
    "TIMEOUT",
    "Freshness",
    "Listing",
    "ObjectChanged",
    "Tally",
    "Unit",
    "part_reader",
]

logger = logging.getLogger("xarray_zcache.cache")

#: seconds before a failed validation is tried again
RETRY_AFTER: Final = 30.0
#: seconds a validation's listing may take before it counts as failed
TIMEOUT: Final = 60.0
#: how often a process waiting for another process's validation looks at the book
_POLL: Final = 0.05
#: object versions of this process's fills kept (`Freshness.held`); beyond, the book's
_HELD_MAX: Final = 1 << 20
#: objects marked superseded kept per cache (the oldest half goes beyond it)
_MARKS_MAX: Final = 65536
#: objects remembered per reader context (`part_reader`; all forgotten beyond it)
_READER_MAX: Final = 4096

#: per reader (an asyncio task and the tasks it starts, or a thread): since when it has
#: been reading parts of each object (cache key -> time)
_PARTS_READ: ContextVar[dict[str, float] | None] = ContextVar("zcache_parts_read", default=None)


def part_reader(key: str, before: float, *, first: bool, head: bool = False) -> float | None:
    """Since when the current reader has been reading parts of object ``key`` (cache
    key), for the check of `Freshness.filled`; call it after the read's gate.

    ``first``: this read starts a read of the object (a shard's index, read from its
    end): the reader begins now, and its first part is not checked (None). ``head``: a
    range from the object's first byte, which starts a read when this reader has begun
    none of ``key`` (a shard's index at its start, ``index_location="start"``) and is
    an inner chunk otherwise (the first one of a shard indexed at its end). Otherwise:
    when this reader's index read of ``key`` began, or None if it read none (a lone
    range read has no earlier part to combine with). ``before`` is unused (kept for
    callers)."""
    seen = _PARTS_READ.get()
    if seen is None or len(seen) >= _READER_MAX:
        seen = {}
        _PARTS_READ.set(seen)
    if first or (head and key not in seen):
        seen[key] = time.time()
        return None
    # a reader begins at its index read (a suffix read: zarr reads a shard's index before
    # every read of its chunks); a range read with none before it in this thread or task
    # holds no earlier part to combine with: nothing to check (None)
    return seen.get(key)


def _changed(key: str) -> ObjectChanged:
    return ObjectChanged(
        f"xarray-zcache: {key.split('/', 1)[-1]!r} changed at the source (another writer "
        "rewrote it) while this read was combining parts of it; the old parts were "
        "dropped. Read again to get the new data."
    )


def _reader_restarts(key: str) -> None:
    """The current reader was told `ObjectChanged` for ``key``: its next read starts anew."""
    seen = _PARTS_READ.get()
    if seen is not None:
        seen.pop(key, None)


class Listing(NamedTuple):
    """What a validation's listing of the source found."""

    #: {object cache key: version} of the objects listed
    versions: dict[str, str]
    #: requests sent
    requests: int
    #: cache-key prefixes the listing covered (None: the whole unit); cached objects
    #: outside them are neither compared nor dropped
    covers: tuple[str, ...] | None = None


class Tally:
    """The listing requests one validation has sent so far (counted even when the
    validation fails or is cancelled half-way)."""

    __slots__ = ("requests",)

    def __init__(self) -> None:
        self.requests = 0


#: a validation's listing: sends its requests (adding them to the tally as it goes)
AsyncListing = Callable[[Tally], Awaitable[Listing]]
SyncListing = Callable[[Tally], Listing]


class ObjectChanged(OSError):
    """An object changed at the source while parts of it were cached: the parts were
    dropped and this read is not answered (its caller may hold an old part). Read again."""


class Unit:
    """A group of objects validated by one listing: every object under ``prefix``
    (cache keys), or with ``recursive=False`` only those directly under it.

    ``starts``: the listing is narrowed to names starting with it (a unit of one object,
    the target file of a reference, has its key as ``prefix``).

    A store makes its own units when it first reads them (``since``); with an interval
    of 0 a unit is fresh for the rest of its store's life once a validation that started
    after ``since`` has ended (``until``: validation once per open)."""

    __slots__ = ("name", "prefix", "recursive", "since", "starts", "until")

    def __init__(self, prefix: str, recursive: bool, starts: str = "") -> None:
        self.prefix = prefix
        self.recursive = recursive
        self.starts = starts
        self.name = ("R" if recursive else "D") + prefix
        self.since = time.time()
        self.until = 0.0

    def holds(self, key: str) -> bool:
        if not key.startswith(self.prefix):
            return False
        rest = key[len(self.prefix) :]
        if "\x01" in rest or "\x02" in rest:  # listings, digests: not objects
            return False
        return self.recursive or "/" not in rest.split(PART_SEP, 1)[0]

    def __repr__(self) -> str:
        return f"Unit({self.prefix!r}, recursive={self.recursive})"


class _Cache(Protocol):
    """What the gate needs of its `HybridCache`."""

    _stats: StatsRecorder

    def cached_objects(self, prefix: str) -> dict[str, bool]: ...
    def has_parts(self, key: str) -> bool: ...
    def drop_object(self, key: str) -> None: ...
    def drop_memory(self, prefix: str) -> None: ...
    def drop_memory_object(self, key: str) -> None: ...


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Flight:
    """A validation of one unit in flight in this process: the tasks and threads that
    need the unit meanwhile wait for it here (whatever their event loop)."""

    __slots__ = ("_lock", "_waiters", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def finish(self) -> None:
        with self._lock:
            self.done.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # (its loop is closed)
                loop.call_soon_threadsafe(_wake, fut)

    async def wait(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self.done.is_set():
                return True
            self._waiters.append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        return True


_Step = Literal["fresh", "join", "busy", "lead"]


class Freshness:
    """The validation gate of one `HybridCache` (thread-safe).

    At most one validation of a unit is in flight in the cache folder: in this process,
    the first reader of a stale unit validates it and the others wait for it (`_Flight`);
    across processes, the book's claim (a lease, renewed while the listing runs)
    decides. ``counts`` says how often this process waited (``joined``: for its own
    validation in flight, ``claim_waits``: for another process's claim) and took over a
    claim (``lapsed``, ``dead``)."""

    def __init__(self, cache: _Cache, book: VersionBook, interval: float | None) -> None:
        self._cache = cache
        self.book = book
        #: seconds; None: never validate (entries live by their TTL); 0: once per open
        self.interval = interval
        self._fresh_until: dict[str, float] = {}
        self._seen_changed: dict[str, float] = {}
        #: object -> when its cached parts were last superseded (a changed version)
        self._marks: dict[str, float] = {}
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._keeper: threading.Thread | None = None
        self.counts: Counter[str] = Counter()
        #: {object key: version} of what this process filled: the version of the bytes
        #: its memory holds (a validation compares the listing with it, not the book's)
        self._mine: dict[str, str] = {}
        self._mine_lock = threading.Lock()
        #: {unit name: start of the validation this process's entries were last
        #: confirmed by} (travels with a pickled store: `confirm`)
        self._confirmed: dict[str, float] = {}
        #: the change log of the folder, read up to here (`read_log`)
        self._log_seq = book.last_change()
        self._log_next = 0.0

    # -- the versions of what this process holds, and the folder's change log -------------------

    def _hold(self, key: str, version: str) -> None:
        with self._mine_lock:
            held = self._mine
            held.pop(key, None)
            held[key] = version
            if len(held) > _HELD_MAX:  # (the oldest half: read again at worst)
                for k in list(held)[: len(held) // 2]:
                    del held[k]

    def _release(self, key: str, *, prefix: bool) -> None:
        with self._mine_lock:
            if not prefix:
                self._mine.pop(key, None)
            elif not key:
                self._mine.clear()
            else:
                for k in [k for k in self._mine if k.startswith(key)]:
                    del self._mine[k]

    def held(self, key: str) -> str | None:
        """The version of the bytes of object ``key`` this process filled (None: none)."""
        return self._mine.get(key)

    def read_log(self, now: float) -> int:
        """Drop from memory what other processes of the folder logged as changed (their
        validations, fills of a new version, writes and deletes through zcache) since
        this process last looked: one query. Returns how many rows were applied."""
        interval = self.interval
        # (with an interval of 0, once per open: read when a unit is validated or adopted)
        self._log_next = float("inf") if not interval else now + interval / 2
        seq, found = self.book.changes_since(self._log_seq)
        self._log_seq = seq
        cache = self._cache
        if found is None:  # rows this process never read were pruned: drop everything
            self.counts["log_gaps"] += 1
            cache.drop_memory("")
            self._release("", prefix=True)
            return 1
        for key, prefix in found:
            if prefix:
                cache.drop_memory(key)
            else:
                cache.drop_memory_object(key)
            self._release(key, prefix=prefix)
        if found:
            self.counts["log_rows"] += len(found)
        return len(found)

    def confirmed(self, unit: Unit) -> float:
        """When the validation that last confirmed ``unit`` here started (0: none)."""
        return self._confirmed.get(unit.name, 0.0)

    def confirmations(self) -> dict[str, float]:
        """`confirmed` of every unit (what a pickled store carries to a worker)."""
        return dict(self._confirmed)

    def _confirm_at(self, unit: Unit, at: float) -> None:
        if at > self._confirmed.get(unit.name, 0.0):
            self._confirmed[unit.name] = at

    async def confirm(self, unit: Unit, listing: AsyncListing, since: float) -> None:
        """Serve ``unit`` only from entries confirmed by a validation that started at or
        after ``since`` (another process's, e.g. the Dask client's that built the
        computation): read the change log, then adopt such a validation of the folder
        or validate now. A failure serves what is cached (stale-if-error)."""
        if self.interval is None or self.confirmed(unit) >= since:
            return
        self.read_log(time.time())
        try:
            await self.validate_now(unit, listing, since)
        except Exception as exc:
            self._failed(unit, exc, None)
            return
        self._confirm_at(unit, since)

    def confirm_sync(self, unit: Unit, listing: SyncListing, since: float) -> None:
        """`confirm` for synchronous callers."""
        if self.interval is None or self.confirmed(unit) >= since:
            return
        self.read_log(time.time())
        try:
            self.validate_now_sync(unit, listing, since)
        except Exception as exc:
            self._failed(unit, exc, None)
            return
        self._confirm_at(unit, since)

    # -- the gate ---------------------------------------------------------------------------------

    def is_fresh(self, unit: Unit, now: float) -> bool:
        """The fast path: whether ``unit`` may be served without looking further (the
        folder's change log is read first every half interval)."""
        if now >= self._log_next:
            self.read_log(now)
        if self.interval == 0:
            return unit.until > now
        return self._fresh_until.get(unit.name, 0.0) > now

    def _set_until(self, unit: Unit, until: float) -> None:
        if self.interval == 0:
            unit.until = until
        else:
            self._fresh_until[unit.name] = until

    def _first_sight(self, unit: Unit, now: float) -> UnitState | None:
        state = self.book.unit(unit.name)
        if state is None and not self.book.legacy:
            state = self.book.start(unit.name, now)
            self._confirm_at(unit, state.validated)
        if state is not None:
            self._seen_changed.setdefault(unit.name, state.changed)
        return state

    def _adopt(self, unit: Unit, state: UnitState, now: float) -> bool:
        """Take ``state`` if it is recent enough; drops memory after others' changes.
        The interval counts from the end of the last validation; with an interval of 0,
        a validation that started after the unit's store first read it counts."""
        interval = self.interval
        if interval is None:
            until = float("inf")
        elif interval == 0:
            until = float("inf") if state.validated >= unit.since else 0.0
        else:
            until = state.ended + interval
        if until <= now:
            return False
        # what the adopted validation (or a write through zcache) dropped elsewhere in
        # the folder is dropped from this process's memory before anything is served
        self.read_log(now)
        self._confirm_at(unit, state.validated)
        if state.changed > self._seen_changed.get(unit.name, 0.0):
            self._cache.drop_memory(unit.prefix)
            self._seen_changed[unit.name] = state.changed
        self._set_until(unit, until)
        return True

    def _step(
        self, unit: Unit, *, gate: bool = True, since: float | None = None
    ) -> tuple[_Step, _Flight | None]:
        """One look at ``unit``: fresh; "join" this process's validation in flight;
        "busy": another process holds the claim; "lead": this caller validates (the
        claim is taken and the flight registered). Not ``gate`` (`validate_now`): fresh
        only if a validation that started at or after ``since`` (if given) is recorded."""
        now = time.time()
        if gate:
            if self.is_fresh(unit, now):
                return "fresh", None
            state = self._first_sight(unit, now)
            if state is not None and self._adopt(unit, state, now):
                return "fresh", None
            if self.interval is None:
                self._set_until(unit, float("inf"))
                return "fresh", None
        else:
            if self._validated_since(unit, since):
                return "fresh", None
            self._first_sight(unit, now)
        with self._lock:
            flight = self._flights.get(unit.name)
            if flight is not None:
                return "join", flight
            why = self.book.claim(unit.name, now)
            if why is None:
                return "busy", None
            flight = self._flights[unit.name] = _Flight()
            self._held.add(unit.name)
            if self._keeper is None:
                self._keeper = threading.Thread(
                    target=self._keep_leases, name="zcache-leases", daemon=True
                )
                self._keeper.start()
        if why != "free":
            self.counts[why] += 1
            logger.info(
                "xarray-zcache: the claim to validate %s was taken over (its holder %s)",
                unit.prefix,
                "stopped renewing it" if why == "lapsed" else "is gone",
            )
        return "lead", flight

    def _keep_leases(self) -> None:
        """Renew the claims this process holds (a thread: a busy event loop or a
        synchronous listing must not let them lapse) until it holds none."""
        while True:
            time.sleep(_versions.LEASE / 3)
            with self._lock:
                held = list(self._held)
                if not held:
                    self._keeper = None
                    return
            for name in held:
                if not self.book.renew(name, time.time()):
                    logger.debug("xarray-zcache: the claim of %s was lost", name)

    def _land(self, unit: Unit, flight: _Flight) -> None:
        """End this process's validation of ``unit`` (done, failed or cancelled)."""
        with self._lock:
            if self._flights.get(unit.name) is flight:
                del self._flights[unit.name]
            self._held.discard(unit.name)
        self.book.release(unit.name)
        flight.finish()

    def _gave_up(self, unit: Unit) -> None:
        self._failed(unit, TimeoutError("another validation of it did not finish"), None)

    async def ensure(self, unit: Unit, listing: AsyncListing) -> None:
        """Make ``unit`` fresh: adopt a recent validation, wait for the one in flight,
        or validate it now."""
        if self.is_fresh(unit, time.time()):
            return
        deadline = time.monotonic() + TIMEOUT + _versions.LEASE
        counted: set[str] = set()
        while True:
            step, flight = self._step(unit)
            if step == "fresh":
                return
            if step in ("join", "busy") and step not in counted:
                counted.add(step)
                self.counts["joined" if step == "join" else "claim_waits"] += 1
            if step == "join" and flight is not None:
                if not await flight.wait(max(0.0, deadline - time.monotonic())):
                    return self._gave_up(unit)
            elif step == "busy":
                if time.monotonic() > deadline:
                    return self._gave_up(unit)
                await asyncio.sleep(_POLL)
            elif flight is not None:
                await self._lead(unit, flight, listing, raising=False)
                return

    def ensure_sync(self, unit: Unit, listing: SyncListing) -> None:
        """`ensure` for synchronous callers (a listing without an event loop)."""
        if self.is_fresh(unit, time.time()):
            return
        deadline = time.monotonic() + TIMEOUT + _versions.LEASE
        counted: set[str] = set()
        while True:
            step, flight = self._step(unit)
            if step == "fresh":
                return
            if step in ("join", "busy") and step not in counted:
                counted.add(step)
                self.counts["joined" if step == "join" else "claim_waits"] += 1
            if step == "join" and flight is not None:
                if not flight.done.wait(max(0.0, deadline - time.monotonic())):
                    return self._gave_up(unit)
            elif step == "busy":
                if time.monotonic() > deadline:
                    return self._gave_up(unit)
                time.sleep(_POLL)
            elif flight is not None:
                self._lead_sync(unit, flight, listing, raising=False)
                return

    async def _lead(
        self,
        unit: Unit,
        flight: _Flight,
        listing: AsyncListing,
        *,
        raising: bool,
        started: float | None = None,
    ) -> tuple[int, int]:
        began = time.time() if started is None else started
        tally = Tally()
        try:
            try:
                found = await asyncio.wait_for(listing(tally), TIMEOUT)
            except Exception as exc:
                self._failed(unit, exc, tally, counted=not raising)
                if raising:
                    raise
                return 0, 0
            except BaseException:  # cancelled: what it sent is counted, the claim released
                self._cache._stats.add("validation_requests", tally.requests)
                raise
            return self._apply(unit, found, began)  # (before the waiters wake)
        finally:
            self._land(unit, flight)

    def _lead_sync(
        self, unit: Unit, flight: _Flight, listing: SyncListing, *, raising: bool
    ) -> tuple[int, int]:
        began = time.time()
        tally = Tally()
        try:
            try:
                found = listing(tally)
            except Exception as exc:
                self._failed(unit, exc, tally, counted=not raising)
                if raising:
                    raise
                return 0, 0
            except BaseException:
                self._cache._stats.add("validation_requests", tally.requests)
                raise
            return self._apply(unit, found, began)  # (before the waiters wake)
        finally:
            self._land(unit, flight)

    def _failed(
        self, unit: Unit, exc: BaseException, tally: Tally | None, *, counted: bool = True
    ) -> None:
        """A validation of ``unit`` failed: one error, the requests it sent counted, and
        (``counted``: for the gate) the cached entries served until the retry."""
        stats = self._cache._stats
        if tally is not None:
            stats.add("validation_requests", tally.requests)
        if not counted:  # (`validate_now`: the caller gets the exception)
            return
        stats.add("validation_errors")
        retry = RETRY_AFTER if not self.interval else min(self.interval, RETRY_AFTER)
        self._set_until(unit, time.time() + retry)
        logger.warning(
            "xarray-zcache: validating %s failed (%s: %s); its cached entries are served "
            "as they are (stale-if-error) and validation is tried again in %.0f s",
            unit.prefix,
            type(exc).__name__,
            exc,
            retry,
        )

    # -- a validation -----------------------------------------------------------------------------

    def _apply(self, unit: Unit, found: Listing, started: float) -> tuple[int, int]:
        """Drop what ``found`` (the source's versions now) says is not current; returns
        how many objects changed at the source (changed, deleted, created) and how many
        were dropped for want of a recorded version (written through zcache, a peer's
        replica): they are read again, but nothing says they changed."""
        current, requests, covers = found

        def covered(k: str) -> bool:
            return unit.holds(k) and (covers is None or k.startswith(covers))

        cached = {k: v for k, v in self._cache.cached_objects(unit.prefix).items() if covered(k)}
        recorded = self.book.under(unit.prefix)
        held = self._mine
        changed = []
        superseded = []  # changed from a known version: readers of older parts are told
        unverified = 0
        for key, has_value in cached.items():
            now_version = current.get(key)
            if not has_value:  # a negative entry: stale once the object exists
                if now_version is not None:
                    changed.append(key)
                continue
            # the version of the bytes this process holds (its fill), else the folder's
            mine = held.get(key) or recorded.get(key)
            if now_version is None or mine != now_version:
                changed.append(key)
                unverified += now_version is not None and mine is None
                if mine is not None:
                    superseded.append(key)
        # objects other processes of the folder hold (in their memory only, perhaps):
        # a change is logged for them (`read_log`), not counted here
        elsewhere = [
            k for k, v in recorded.items() if k not in cached and covered(k) and current.get(k) != v
        ]
        # (an object without a known version, e.g. the book could not record it, is
        # dropped and read again, but no reader is told it changed: nothing says it did)
        self._mark(superseded, dropping=True)
        for key in changed:
            self._cache.drop_object(key)
        self._mark(superseded)
        for key in elsewhere:
            self.forget(key, prefix=False)
        # what the source holds now, as this listing saw it (`seen_since`)
        self.book.saw({k: current[k] for k in changed if k in current}, started)
        stats = self._cache._stats
        stats.add("validations")
        stats.add("validation_requests", requests)
        stats.add("validation_changes", len(changed) - unverified)
        ended = time.time()
        self.book.validated(unit.name, started, started if changed else None, ended)
        self._confirm_at(unit, started)
        if changed:
            self._seen_changed[unit.name] = max(self._seen_changed.get(unit.name, 0.0), started)
            logger.info(
                "xarray-zcache: %d of %d cached objects under %s changed at the source "
                "(and %d had no recorded version); they were dropped",
                len(changed) - unverified,
                len(cached),
                unit.prefix,
                unverified,
            )
        if self.interval is not None:  # (the interval counts from the end)
            self._set_until(unit, float("inf") if self.interval == 0 else ended + self.interval)
        return len(changed) - unverified, unverified

    def _validated_since(self, unit: Unit, since: float | None) -> bool:
        state = self.book.unit(unit.name)
        return since is not None and state is not None and state.validated >= since

    async def validate_now(
        self,
        unit: Unit,
        listing: AsyncListing,
        since: float | None = None,
        started: float | None = None,
    ) -> tuple[int, int]:
        """Validate ``unit`` now (errors propagate), unless a validation that started at
        or after ``since`` already did; returns what `_apply` returns. ``started``: when
        the validation counts as started (default: now; one `revalidate` of many units
        gives them all its own start, so that none counts as older than another). A
        validation of the unit in flight is waited for first (one at a time)."""
        deadline = time.monotonic() + TIMEOUT + _versions.LEASE
        while True:
            step, flight = self._step(unit, gate=False, since=since)
            if step == "fresh":
                return 0, 0
            if step == "join" and flight is not None:
                await flight.wait(max(0.0, deadline - time.monotonic()))
            elif step == "busy":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another validation of {unit.prefix} did not finish")
                await asyncio.sleep(_POLL)
            elif flight is not None:
                return await self._lead(unit, flight, listing, raising=True, started=started)
            if time.monotonic() > deadline:
                raise TimeoutError(f"another validation of {unit.prefix} did not finish")

    def validate_now_sync(
        self, unit: Unit, listing: SyncListing, since: float | None = None
    ) -> tuple[int, int]:
        """`validate_now` for synchronous callers."""
        deadline = time.monotonic() + TIMEOUT + _versions.LEASE
        while True:
            step, flight = self._step(unit, gate=False, since=since)
            if step == "fresh":
                return 0, 0
            if step == "join" and flight is not None:
                flight.done.wait(max(0.0, deadline - time.monotonic()))
            elif step == "busy":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another validation of {unit.prefix} did not finish")
                time.sleep(_POLL)
            elif flight is not None:
                return self._lead_sync(unit, flight, listing, raising=True)
            if time.monotonic() > deadline:
                raise TimeoutError(f"another validation of {unit.prefix} did not finish")

    def seen_since(self, key: str, version: str | None, began: float) -> float:
        """Since when the source is known to hold ``version`` of object ``key``: when the
        validation that saw it there started (it found the object changed), else
        ``began``."""
        seen = self.book.seen(key) if version is not None else None
        if seen is None or seen[0] != version:
            return began
        return min(began, seen[1])

    # -- fills ------------------------------------------------------------------------------------

    def _mark(self, keys: list[str], *, dropping: bool = False) -> None:
        """The cached parts of ``keys`` were just superseded (dropped for a new version).
        ``dropping``: they are about to be, meanwhile every reader is told (a part of
        the new version may be served before the drop has ended)."""
        if not keys:
            return
        now = float("inf") if dropping else time.time()
        with self._lock:
            marks = self._marks
            if len(marks) + len(keys) > _MARKS_MAX:
                for k in sorted(marks, key=marks.__getitem__)[: len(marks) // 2]:
                    del marks[k]
            marks.update(dict.fromkeys(keys, now))

    def superseded(self, key: str) -> float:
        """When the cached parts of object ``key`` were last superseded by a new version
        (0: never seen): by this process, or by a validation of another one (the book's
        ``seen``: when it started)."""
        mark = self._marks.get(key, 0.0)
        seen = self.book.seen(key)
        return mark if seen is None else max(mark, seen[1])

    def served(self, key: str, reader: float) -> None:
        """A byte range of object ``key`` was just served (cached, or filled for this
        reader or another one reading the same range) to a reader that began reading
        the object at ``reader`` (`part_reader`): raises `ObjectChanged` if parts of the
        object were superseded since (in this process: a dictionary look-up)."""
        if self._marks.get(key, 0.0) > reader:
            _reader_restarts(key)
            raise _changed(key)

    def filled(
        self, unit: Unit, key: str, version: str, *, part: bool, reader: float | None = None
    ) -> None:
        """Record that object ``key`` was just read from the source at ``version``.

        ``part``: what was read is a byte range of the object. Raises `ObjectChanged`
        when it is, the object's recorded version differs and parts of the old
        version are cached (a reader may be combining them with this one), or when
        the reader began reading parts of the object (``reader``: `part_reader`)
        before parts of it were superseded (its earlier parts may be of the old
        version, though none is cached any more).
        """
        book = self.book
        old = self._mine.get(key) or book.version(key)
        # (before a change found now marks it: this fill itself is of the new version)
        mixed = part and reader is not None and self.superseded(key) > reader
        if old is not None and old != version:
            mixed = mixed or (part and self._cache.has_parts(key))
            self._mark([key], dropping=True)
            self._cache.drop_object(key)
            now = time.time()
            book.changed(unit.name, now)
            self._seen_changed[unit.name] = max(self._seen_changed.get(unit.name, 0.0), now)
            self._mark([key])
        book.record(key, version)
        self._hold(key, version)
        if mixed:
            _reader_restarts(key)
            raise _changed(key)

    def forget(self, key: str, *, prefix: bool) -> None:
        """The entries of ``key`` are gone: so is what was known of its version, here
        and (through the change log) in every process of the folder."""
        self._release(key, prefix=prefix)
        self.book.forget(key, prefix=prefix)

    def clear(self) -> None:
        self._release("", prefix=True)
        self._confirmed.clear()
        self.book.clear()
        self._fresh_until.clear()
        self._seen_changed.clear()
        self._marks.clear()
