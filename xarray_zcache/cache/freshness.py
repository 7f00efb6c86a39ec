"""`Freshness`: entries are validated against their object's version before they are
served past the validation interval, one *unit* (one listing of the source) at a time.

The rules, each kept in this module or in the one it names:

* A unit is fresh until its last validation *ended* + ``interval`` (a listing longer
  than the interval does not start another). With an interval of 0, a unit is fresh for
  its store once a validation that started after the store first read it has ended
  (once per open: `Unit.since`). A unit seen for the first time is valid as of then:
  nothing of it can be cached from before (a folder from a release without versions is
  the exception: `VersionBook.legacy`, and its units are validated first).
* At most one validation of a unit is in flight per folder (`xarray_zcache.cache.claims`):
  the first reader of a stale unit validates it, the others wait for it and adopt its
  result or its failure (``counts``: ``joined``, ``claim_waits``, ``lapsed``,
  ``dead``). A validation lists the source once (the
  unit, or only the parts of it that hold cached objects: `Listing.covers`) and
  compares each cached object with its recorded version: changed, deleted, created
  (a negative entry) or of no recorded version → the object's entries are dropped
  (whole object, every range, negative entry). Unchanged objects keep their entries
  and are not re-read (`xarray_zcache.cache.changes`). (A changed metadata document is
  dropped like any object; when it is read again, the store drops the array's older
  chunks: `SourceReads._fetch`.)
* Versions belong to the bytes: a validation compares the listing with the version of
  the bytes this process filled (`Freshness.held`), else with the folder's recorded
  one, and logs a change of any object another process of the folder recorded
  (`xarray_zcache.cache.changes`, as the next two rules).
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
* An object found changed (by a validation or a fill) is *marked* superseded: a reader
  that began reading parts of it before is told `ObjectChanged`
  (`xarray_zcache.cache.supersession`).
* A validation that fails (the source errs or times out) serves the cached entries
  (stale-if-error) and is retried after ``min(interval, RETRY_AFTER)`` seconds; a
  cached read never raises because of it. It counts one ``validation_errors``, and the
  listing requests it sent (`Tally`) in ``validation_requests``, as a cancelled one does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import Final, Literal

from xarray_zcache.cache import versions as _versions
from xarray_zcache.cache.changes import Changes, _Cache
from xarray_zcache.cache.claims import Claims, Flight
from xarray_zcache.cache.listing import AsyncListing, Listing, SyncListing, Tally, Unit
from xarray_zcache.cache.supersession import (
    ObjectChanged,
    Supersession,
    part_reader,
)
from xarray_zcache.cache.versions import UnitState, VersionBook

__all__ = [
    "RETRY_AFTER",
    "TIMEOUT",
    "AsyncListing",
    "Freshness",
    "Listing",
    "ObjectChanged",
    "SyncListing",
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


_Step = Literal["fresh", "join", "busy", "lead"]


class Freshness(Changes):
    """The validation gate of one `HybridCache` (thread-safe).

    At most one validation of a unit is in flight in the cache folder: in this process,
    the first reader of a stale unit validates it and the others wait for it (`Flight`);
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
        self.counts: Counter[str] = Counter()
        #: this process's validations in flight and the book's claims it holds
        self._claims = Claims(book, self.counts)
        #: when the cached parts of objects were superseded (readers are told)
        self._supersession = Supersession(book)
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

    # -- confirmations carried by pickled stores (what this process holds, the change log,
    # what a validation or a fill found: changes.py) ---------------------------------------------

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
    ) -> tuple[_Step, Flight | None]:
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
        return self._claims.take(unit, now)

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
        flight: Flight,
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
            self._claims.land(unit, flight)

    def _lead_sync(
        self, unit: Unit, flight: Flight, listing: SyncListing, *, raising: bool
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
            self._claims.land(unit, flight)

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

    def clear(self) -> None:
        self._release("", prefix=True)
        self._confirmed.clear()
        self.book.clear()
        self._fresh_until.clear()
        self._seen_changed.clear()
        self._supersession.clear()
