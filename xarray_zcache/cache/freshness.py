"""`Freshness`: entries are validated against their object's version before they are
served past the validation interval, one *unit* (one listing of the source) at a time.

The rules, each kept here and nowhere else:

* A unit is fresh until ``validated + interval``. A unit seen for the first time is valid
  as of then: nothing of it can be cached from before (a folder from a release without
  versions is the exception: `VersionBook.legacy`, and its units are validated first).
* A stale unit is validated by one process of the folder (a claim in the book); the
  others wait for it and adopt its result. A validation lists the source once (the
  unit, or only the parts of it that hold cached objects: `Listing.covers`) and
  compares each cached object with its recorded version: changed, deleted, created
  (a negative entry) or of no recorded version → the object's entries are dropped
  (whole object, every range, negative entry). Unchanged objects keep their entries
  and are not re-read. (A changed metadata document is dropped like any object; when
  it is read again, the store drops the array's older chunks: `SourceReads._fetch`.)
* Another process's changes (its validation or fill found an object changed, and
  dropped it on disk) reach this process's memory through the unit's ``changed`` time:
  a newer one than this process has seen drops the unit's entries from memory.
* A fill records the object's version. A fill of a version other than the recorded
  one drops the object's older entries: a part of an object (a shard's index, its
  inner chunks) is never combined with parts of another version — if a range of
  the new version is read while parts of the old one were cached, `ObjectChanged`
  is raised instead of returning bytes the reader would combine with the old parts.
* A validation that fails (the source errs or times out) serves the cached entries
  (stale-if-error) and is retried after ``min(interval, RETRY_AFTER)`` seconds; a
  cached read never raises because of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

from xarray_zcache.cache.request import PART_SEP
from xarray_zcache.cache.versions import UnitState, VersionBook

if TYPE_CHECKING:
    from xarray_zcache.cache.stats import StatsRecorder

__all__ = ["RETRY_AFTER", "TIMEOUT", "Freshness", "Listing", "ObjectChanged", "Unit"]

logger = logging.getLogger("xarray_zcache.cache")

#: seconds before a failed validation is tried again
RETRY_AFTER: Final = 30.0
#: seconds a validation's listing may take before it counts as failed
TIMEOUT: Final = 60.0
#: how often a process waiting for another one's validation looks at the book
_POLL: Final = 0.05


class Listing(NamedTuple):
    """What a validation's listing of the source found."""

    #: {object cache key: version} of the objects listed
    versions: dict[str, str]
    #: requests sent
    requests: int
    #: cache-key prefixes the listing covered (None: the whole unit); cached objects
    #: outside them are neither compared nor dropped
    covers: tuple[str, ...] | None = None


class ObjectChanged(OSError):
    """An object changed at the source while parts of it were cached: the parts were
    dropped and this read is not answered (its caller may hold an old part). Read again."""


class Unit:
    """A group of objects validated by one listing: every object under ``prefix``
    (cache keys), or with ``recursive=False`` only those directly under it.

    ``starts``: the listing is narrowed to names starting with it (a unit of one object,
    the target file of a reference, has its key as ``prefix``)."""

    __slots__ = ("name", "prefix", "recursive", "starts")

    def __init__(self, prefix: str, recursive: bool, starts: str = "") -> None:
        self.prefix = prefix
        self.recursive = recursive
        self.starts = starts
        self.name = ("R" if recursive else "D") + prefix

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


class Freshness:
    """The validation gate of one `HybridCache` (thread-safe)."""

    def __init__(self, cache: _Cache, book: VersionBook, interval: float | None) -> None:
        self._cache = cache
        self.book = book
        #: seconds; None: never validate (entries live by their TTL)
        self.interval = interval
        self._fresh_until: dict[str, float] = {}
        self._seen_changed: dict[str, float] = {}

    # -- the gate ---------------------------------------------------------------------------------

    def is_fresh(self, unit: Unit, now: float) -> bool:
        """The fast path: whether ``unit`` may be served without looking further."""
        return self._fresh_until.get(unit.name, 0.0) > now

    def _first_sight(self, unit: Unit, now: float) -> UnitState | None:
        state = self.book.unit(unit.name)
        if state is None and not self.book.legacy:
            state = self.book.start(unit.name, now)
        if state is not None:
            self._seen_changed.setdefault(unit.name, state.changed)
        return state

    def _adopt(self, unit: Unit, state: UnitState, now: float) -> bool:
        """Take ``state`` if it is recent enough; drops memory after others' changes."""
        interval = self.interval
        until = state.validated + interval if interval is not None else float("inf")
        if until <= now:
            return False
        if state.changed > self._seen_changed.get(unit.name, 0.0):
            self._cache.drop_memory(unit.prefix)
            self._seen_changed[unit.name] = state.changed
        self._fresh_until[unit.name] = until
        return True

    def _begin(self, unit: Unit, now: float) -> bool | None:
        """True: fresh now; False: this process validates; None: another one does."""
        state = self._first_sight(unit, now)
        if state is not None and self._adopt(unit, state, now):
            return True
        if self.interval is None:
            self._fresh_until[unit.name] = float("inf")
            return True
        return False if self.book.claim(unit.name, now) else None

    async def ensure(self, unit: Unit, listing: Callable[[], Awaitable[Listing]]) -> None:
        """Make ``unit`` fresh: adopt a recent validation or validate it now."""
        now = time.time()
        if self.is_fresh(unit, now):
            return
        step = self._begin(unit, now)
        waited = 0.0
        while step is None:  # another process (or task) validates: wait for its result
            await asyncio.sleep(_POLL)
            waited += _POLL
            step = self._waiting(unit, waited)
        if step:
            return
        try:
            found = await asyncio.wait_for(listing(), TIMEOUT)
        except Exception as exc:
            self._failed(unit, exc)
            return
        self._apply(unit, found, now)

    def ensure_sync(self, unit: Unit, listing: Callable[[], Listing]) -> None:
        """`ensure` for synchronous callers (a listing without an event loop)."""
        now = time.time()
        if self.is_fresh(unit, now):
            return
        step = self._begin(unit, now)
        waited = 0.0
        while step is None:
            time.sleep(_POLL)
            waited += _POLL
            step = self._waiting(unit, waited)
        if step:
            return
        try:
            found = listing()
        except Exception as exc:
            self._failed(unit, exc)
            return
        self._apply(unit, found, now)

    def _waiting(self, unit: Unit, waited: float) -> bool | None:
        now = time.time()
        state = self.book.unit(unit.name)
        if state is not None and self._adopt(unit, state, now):
            return True
        if waited >= TIMEOUT:  # the other validation is lost: serve what we have
            self._failed(unit, TimeoutError("another process's validation did not finish"))
            return True
        return False if self.book.claim(unit.name, now) else None

    def _failed(self, unit: Unit, exc: BaseException) -> None:
        self.book.release(unit.name)
        self._cache._stats.add("validation_errors")
        retry = RETRY_AFTER if self.interval is None else min(self.interval, RETRY_AFTER)
        self._fresh_until[unit.name] = time.time() + retry
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
        cached = {
            k: v
            for k, v in self._cache.cached_objects(unit.prefix).items()
            if unit.holds(k) and (covers is None or k.startswith(covers))
        }
        recorded = self.book.under(unit.prefix)
        changed = []
        unverified = 0
        for key, has_value in cached.items():
            now_version = current.get(key)
            if not has_value:  # a negative entry: stale once the object exists
                if now_version is not None:
                    changed.append(key)
            elif now_version is None or recorded.get(key) != now_version:
                changed.append(key)
                unverified += now_version is not None and key not in recorded
        for key in changed:
            self._cache.drop_object(key)
        # what the source holds now, as this listing saw it (`seen_since`)
        self.book.saw({k: current[k] for k in changed if k in current}, started)
        stats = self._cache._stats
        stats.add("validations")
        stats.add("validation_requests", requests)
        stats.add("validation_changes", len(changed) - unverified)
        self.book.validated(unit.name, started, started if changed else None)
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
        if self.interval is not None:
            self._fresh_until[unit.name] = started + self.interval
        return len(changed) - unverified, unverified

    def _validated_since(self, unit: Unit, since: float | None) -> bool:
        state = self.book.unit(unit.name)
        return since is not None and state is not None and state.validated >= since

    async def validate_now(
        self,
        unit: Unit,
        listing: Callable[[], Awaitable[Listing]],
        since: float | None = None,
        started: float | None = None,
    ) -> tuple[int, int]:
        """Validate ``unit`` now (errors propagate), unless a validation that started at
        or after ``since`` already did; returns what `_apply` returns. ``started``: when
        the validation counts as started (default: now; one `revalidate` of many units
        gives them all its own start, so that none counts as older than another)."""
        started = time.time() if started is None else started
        if self._validated_since(unit, since):
            return 0, 0
        self._first_sight(unit, started)
        found = await asyncio.wait_for(listing(), TIMEOUT)
        return self._apply(unit, found, started)

    def validate_now_sync(
        self, unit: Unit, listing: Callable[[], Listing], since: float | None = None
    ) -> tuple[int, int]:
        """`validate_now` for synchronous callers."""
        started = time.time()
        if self._validated_since(unit, since):
            return 0, 0
        self._first_sight(unit, started)
        return self._apply(unit, listing(), started)

    def seen_since(self, key: str, version: str | None, began: float) -> float:
        """Since when the source is known to hold ``version`` of object ``key``: when the
        validation that saw it there started (it found the object changed), else
        ``began``."""
        seen = self.book.seen(key) if version is not None else None
        if seen is None or seen[0] != version:
            return began
        return min(began, seen[1])

    # -- fills ------------------------------------------------------------------------------------

    def filled(self, unit: Unit, key: str, version: str, *, part: bool) -> None:
        """Record that object ``key`` was just read from the source at ``version``.

        ``part``: what was read is a byte range of the object. Raises `ObjectChanged`
        when it is, the object's recorded version differs and parts of the old
        version are cached (a reader may be combining them with this one).
        """
        book = self.book
        old = book.version(key)
        if old is not None and old != version:
            mixed = part and self._cache.has_parts(key)
            self._cache.drop_object(key)
            now = time.time()
            book.changed(unit.name, now)
            self._seen_changed[unit.name] = max(self._seen_changed.get(unit.name, 0.0), now)
            book.record(key, version)
            if mixed:
                raise ObjectChanged(
                    f"xarray-zcache: {key.split('/', 1)[-1]!r} changed at the source (another "
                    "writer rewrote it) while parts of its old version were cached; they "
                    "were dropped. Read again to get the new data."
                )
            return
        book.record(key, version)

    def forget(self, key: str, *, prefix: bool) -> None:
        """The entries of ``key`` are gone: so is what was known of its version."""
        self.book.forget(key, prefix=prefix)

    def clear(self) -> None:
        self.book.clear()
        self._fresh_until.clear()
        self._seen_changed.clear()
