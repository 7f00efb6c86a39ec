"""How the validation gate (`xarray_zcache.cache.freshness`) learns that cached objects
changed, and drops them: what a validation's listing found (`_apply`), a fill of another
version (`filled`), the folder's change log of other processes' changes (`read_log`);
and the versions of the bytes this process holds (`held`), which the listings are
compared with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Final, Protocol

from xarray_zcache.cache.supersession import Supersession, _changed, _reader_restarts

if TYPE_CHECKING:
    from xarray_zcache.cache.listing import Listing, Unit
    from xarray_zcache.cache.recorder import StatsRecorder
    from xarray_zcache.cache.versions import VersionBook

__all__ = ["Changes"]

logger = logging.getLogger("xarray_zcache.cache")

#: object versions of this process's fills kept (`Freshness.held`); beyond, the book's
_HELD_MAX: Final = 1 << 20


class _Cache(Protocol):
    """What the gate needs of its `HybridCache`."""

    _stats: StatsRecorder

    def cached_objects(self, prefix: str) -> dict[str, bool]: ...
    def has_parts(self, key: str) -> bool: ...
    def drop_object(self, key: str) -> None: ...
    def drop_memory(self, prefix: str) -> None: ...
    def drop_memory_object(self, key: str) -> None: ...


class Changes:
    """Part of `Freshness` (its state is the gate's)."""

    _cache: _Cache
    book: VersionBook
    interval: float | None
    counts: Counter[str]
    _seen_changed: dict[str, float]
    _supersession: Supersession
    _mine: dict[str, str]
    _mine_lock: threading.Lock
    _log_seq: int
    _log_next: float

    if TYPE_CHECKING:  # (defined by `Freshness`: the gate)

        def _confirm_at(self, unit: Unit, at: float) -> None: ...
        def _set_until(self, unit: Unit, until: float) -> None: ...

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

    # -- what a validation found ------------------------------------------------------------------

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
        self._supersession.mark(superseded, dropping=True)
        for key in changed:
            self._cache.drop_object(key)
        self._supersession.mark(superseded)
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

    def seen_since(self, key: str, version: str | None, began: float) -> float:
        """Since when the source is known to hold ``version`` of object ``key``: when the
        validation that saw it there started (it found the object changed), else
        ``began``."""
        seen = self.book.seen(key) if version is not None else None
        if seen is None or seen[0] != version:
            return began
        return min(began, seen[1])

    # -- fills ------------------------------------------------------------------------------------

    def superseded(self, key: str) -> float:
        """See `Supersession.superseded`."""
        return self._supersession.superseded(key)

    def served(self, key: str, reader: float) -> None:
        """See `Supersession.served`."""
        self._supersession.served(key, reader)

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
        mixed = part and reader is not None and self._supersession.superseded(key) > reader
        if old is not None and old != version:
            mixed = mixed or (part and self._cache.has_parts(key))
            self._supersession.mark([key], dropping=True)
            self._cache.drop_object(key)
            now = time.time()
            book.changed(unit.name, now)
            self._seen_changed[unit.name] = max(self._seen_changed.get(unit.name, 0.0), now)
            self._supersession.mark([key])
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
