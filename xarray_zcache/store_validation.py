"""How a `CachedStore` keeps its entries fresh: which unit (one listing) a zarr key
belongs to, the gate every read passes, and `revalidate` (validate everything now).

The rules of freshness are the cache's (`xarray_zcache.cache.freshness`); this module
only maps zarr keys to units and units to listings of the wrapped store:

* a chunk belongs to its array: one recursive listing of the array's folder (one
  request per 1,000 objects on S3) validates its metadata and every chunk — or, when
  that is cheaper, listings of only the chunk-grid rows that hold cached chunks and of
  the array's documents (`xarray_zcache.listing_plan`);
* a metadata document in a sub-folder belongs to that folder's recursive unit (the
  array's, or a group's: a listing of the group's documents only); one at the root
  belongs to the root's own objects (one non-recursive listing: the root's documents,
  never every chunk of the dataset).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from xarray_zcache import store_versions
from xarray_zcache.cache.listing import AsyncListing, Listing, SyncListing, Tally, Unit
from xarray_zcache.keys import array_of, file_key, key_kind, parse_entry_key
from xarray_zcache.listing_plan import Plan, grid_of, plan

if TYPE_CHECKING:
    from xarray_zcache.cache.hybrid import HybridCache
    from xarray_zcache.config import CacheConfig
    from xarray_zcache.store_versions import SourceVersions

__all__ = ["SourceValidation", "ValidationReport"]

#: keys whose unit is remembered per store (the gate's fast path is then two dict lookups)
_MEMO_SIZE = 65536
#: {(open, unit name): the unit's start} of the opens read in this process (`_opened_at`)
_OPENS: dict[tuple[str, str], float] = {}
#: listings of one plan sent at once
_CONCURRENT_LISTINGS = 16


@dataclasses.dataclass(frozen=True, slots=True)
class ValidationReport:
    """What `CachedStore.revalidate` did."""

    #: units validated (one listing each: an array, or the root's documents)
    units: int
    #: cached objects checked against the source
    objects: int
    #: objects found changed, deleted or created, and dropped
    changed: int
    #: listing requests sent to the source
    requests: int
    seconds: float
    #: objects dropped for want of a recorded version (bytes written through zcache, a
    #: peer's replica): read again when asked for, not known to have changed
    unverified: int = 0
    #: why nothing was validated (a store without versions: TTLs rule its entries)
    note: str = ""

    def __add__(self, other: ValidationReport) -> ValidationReport:
        return ValidationReport(
            self.units + other.units,
            self.objects + other.objects,
            self.changed + other.changed,
            self.requests + other.requests,
            self.seconds + other.seconds,
            self.unverified + other.unverified,
            self.note or other.note,
        )

    def __str__(self) -> str:
        if self.note and not self.units:
            return self.note
        text = (
            f"validated {self.objects} cached objects in {self.units} units with "
            f"{self.requests} listing requests in {self.seconds:.2f} s: {self.changed} changed"
        )
        return text + (f" ({self.unverified} unverified)" if self.unverified else "")


class SourceValidation:
    """Part of `CachedStore` (its state is the store's)."""

    _namespace: str
    _source: SourceVersions
    _units: dict[str, tuple[Unit, str]]
    _unit_memo: dict[str, tuple[Unit, str]]
    #: validate each object alone (the targets of references), not by array folders
    _object_units: bool = False
    _bindings: dict[str | None, HybridCache]
    _config: CacheConfig
    #: {unit name: when the validation that confirmed it started} in the process that
    #: pickled this store (a Dask client): units confirmed here before are confirmed
    #: again before they are served (one version per array read, on a cluster too)
    _confirmed_by: Mapping[str, float] = MappingProxyType({})
    #: this open of the store (`CachedStore`: kept by its pickled copies)
    _opened: str = ""

    def _confirmations(self) -> dict[str, float]:
        """When the units of this store's data were last confirmed in this process
        (pickled with the store, see `_confirmed_by`); creates no cache."""
        caches = list(self._bindings.values())
        if not caches:  # (a copy that has read nothing yet: the process's cache, if open)
            from xarray_zcache import registry

            found_cache = registry._caches.get(self._config)
            caches = [] if found_cache is None or found_cache.closed else [found_cache]
        mine = self._namespace + "/"
        found: dict[str, float] = {}
        for cache in caches:
            for name, at in cache.freshness.confirmations().items():
                if name[1:].startswith(mine) and at > found.get(name, 0.0):
                    found[name] = at
        for name, at in self._confirmed_by.items():  # (carried on, if pickled again)
            if at > found.get(name, 0.0):
                found[name] = at
        return found

    @property
    def cache(self) -> HybridCache:
        raise NotImplementedError

    @property
    def _files(self) -> bool:
        raise NotImplementedError

    def _ck(self, key: str) -> str:
        raise NotImplementedError

    def _no_versions_note(self) -> str:
        what = type(self._source.store).__name__
        if self._namespace.startswith("icechunk:"):
            return f"{what}: a read-only Icechunk snapshot never changes; nothing to validate"
        return (
            f"{what} exposes no object versions: nothing validated, its entries live by "
            "their TTLs (see CacheConfig.with_ttl)"
        )

    def _unit_of(self, key: str) -> tuple[Unit, str]:
        """The unit of zarr key ``key`` and the folder its listing covers."""
        memo = self._unit_memo
        found = memo.get(key)
        if found is None:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            found = memo[key] = self._find_unit(key)
        return found

    def _find_unit(self, key: str) -> tuple[Unit, str]:
        k = file_key(key) if self._files else key
        if self._object_units:  # one unit per object: listed alone (`Unit.starts`)
            folder, name = k.rpartition("/")[::2]
            found = self._units.get("O" + k)
            if found is None:
                unit = self._opened_at(Unit(self._ck(k), False, starts=name))
                found = self._units["O" + k] = (unit, folder)
            return found
        if key_kind(k) == "chunk":
            folder = array_of(k)
            recursive = True
        else:
            folder = k.rpartition("/")[0]
            recursive = folder != ""
        name = ("R" if recursive else "D") + folder
        found = self._units.get(name)
        if found is None:
            prefix = self._ck(folder) + "/" if folder else self._namespace + "/"
            found = self._units[name] = (self._opened_at(Unit(prefix, recursive)), folder)
        return found

    def _opened_at(self, unit: Unit) -> Unit:
        """``unit``, starting (`Unit.since`, what an interval of 0 counts from: "once per
        open") when this open first read it in this process: every copy of one open
        (Dask unpickles a store per task) shares one start, so one copy's validation
        serves the others. (On a worker, that is once per open per worker process; the
        client's own confirmations are `_confirmed_by`'s.)"""
        key = (self._opened, unit.name)
        since = _OPENS.get(key)
        if since is None:
            if len(_OPENS) >= _MEMO_SIZE:
                _OPENS.clear()
            since = _OPENS[key] = unit.since
        unit.since = since
        return unit

    def _plan(self, unit: Unit, folder: str) -> Plan | None:
        """The listings that validate ``unit``'s cached objects (None: list it whole)."""
        if not unit.recursive:
            return None
        prefix = unit.prefix
        rests = []
        # (and the objects other processes of the folder recorded: their memory's)
        recorded = self.cache.freshness.book.under(prefix)
        for ck in {**self.cache.cached_objects(prefix), **dict.fromkeys(recorded, True)}:
            if "\x01" in ck or "\x02" in ck:
                continue
            parsed = parse_entry_key(self._namespace, ck)
            if parsed is None:
                return None
            if self._unit_of(parsed[0])[0] is unit:  # (not an array below a group)
                rests.append(ck[len(prefix) :])
        grid = grid_of(folder, lambda key: self.cache.peek(self._ck(key)))
        return plan(rests, grid, store_versions.PAGE)

    def _listed(
        self, unit: Unit, found: list[tuple[dict[str, str], int]], chosen: Plan | None
    ) -> Listing:
        versions = {self._ck(k): v for part, _ in found for k, v in part.items()}
        requests = sum(n for _, n in found)
        covers = None if chosen is None else tuple(unit.prefix + c for c in chosen.covers)
        return Listing(versions, requests, covers)

    @staticmethod
    def _slices(folder: str, chosen: Plan | None, unit: Unit) -> list[tuple[str, bool, str]]:
        if chosen is None:
            return [(folder, unit.recursive, unit.starts)]
        return [
            (f"{folder}/{s.folder}" if s.folder else folder, s.recursive, s.starts)
            for s in chosen.slices
        ]

    def _versions_now(self, unit: Unit, folder: str) -> AsyncListing:
        async def slice_listing(
            tally: Tally, s: tuple[str, bool, str]
        ) -> tuple[dict[str, str], int]:
            try:
                part = await self._source.listing(*s)
            except BaseException as exc:
                # (failed or cancelled: the pages it sent, the failing one included;
                # at least its first; local listings send none)
                tally.requests += 0 if self._files else store_versions.requests_sent(exc, 1)
                raise
            tally.requests += part[1]
            return part

        async def listing(tally: Tally) -> Listing:
            chosen = self._plan(unit, folder)
            slices = self._slices(folder, chosen, unit)
            found: list[tuple[dict[str, str], int]] = []
            for i in range(0, len(slices), _CONCURRENT_LISTINGS):
                batch = slices[i : i + _CONCURRENT_LISTINGS]
                try:  # (a failing slice cancels the others of its batch, counted)
                    async with asyncio.TaskGroup() as group:
                        tasks = [group.create_task(slice_listing(tally, s)) for s in batch]
                except BaseExceptionGroup as errors:
                    raise errors.exceptions[0] from None
                found += [t.result() for t in tasks]
            return self._listed(unit, found, chosen)

        return listing

    def _listing_sync(self, unit: Unit, folder: str) -> SyncListing:
        def listing(tally: Tally) -> Listing:
            chosen = self._plan(unit, folder)
            slices = self._slices(folder, chosen, unit)
            found = []
            for s in slices:
                try:
                    part = self._source.listing_sync(*s)
                except BaseException as exc:
                    tally.requests += 0 if self._files else store_versions.requests_sent(exc, 1)
                    raise
                tally.requests += part[1]
                found.append(part)
            return self._listed(unit, found, chosen)

        return listing

    async def _validated(self, key: str, cache: HybridCache | None = None) -> None:
        """The gate: entries of ``key``'s unit are validated first if due."""
        if not self._source.supported:
            return
        unit, folder = self._unit_of(key)
        freshness = (cache or self.cache).freshness
        since = self._confirmed_by.get(unit.name)
        if since is not None and freshness.confirmed(unit) < since:
            await freshness.confirm(unit, self._versions_now(unit, folder), since)
        if freshness.is_fresh(unit, time.time()):
            return
        await freshness.ensure(unit, self._versions_now(unit, folder))

    def _gate_open(self, key: str, cache: HybridCache) -> bool:
        """Whether `_validated` would pass ``key`` without a request now (its unit is fresh)."""
        if not self._source.supported:
            return True
        unit = self._unit_of(key)[0]
        freshness = cache.freshness
        since = self._confirmed_by.get(unit.name)
        if since is not None and freshness.confirmed(unit) < since:
            return False
        return freshness.is_fresh(unit, time.time())

    def _confirmed(self, key: str, cache: HybridCache) -> float | None:
        """When the cached entries of ``key``'s unit were last confirmed at the source
        (the start of its last validation, or its first sight), or None: versions are
        not validated (no versions at the source, or no validation interval)."""
        if not self._source.supported or cache.freshness.interval is None:
            return None
        unit = self._unit_of(key)[0]
        state = cache.freshness.book.unit(unit.name)
        return None if state is None else state.validated

    def _validated_sync(self, key: str) -> None:
        """`_validated` for synchronous callers (stores with a synchronous listing)."""
        if not self._source.supported:
            return
        unit, folder = self._unit_of(key)
        freshness = self.cache.freshness
        since = self._confirmed_by.get(unit.name)
        if since is not None and freshness.confirmed(unit) < since:
            freshness.confirm_sync(unit, self._listing_sync(unit, folder), since)
        if freshness.is_fresh(unit, time.time()):
            return

        freshness.ensure_sync(unit, self._listing_sync(unit, folder))

    def _seen_since(self, key: str, version: str | None, began: float) -> float:
        """See `Freshness.seen_since`."""
        return self.cache.freshness.seen_since(self._ck(key), version, began)

    def _filled(
        self, key: str, version: str | None, *, part: bool, reader: float | None = None
    ) -> None:
        """Record the version of what was just read of ``key`` (see `Freshness.filled`)."""
        if version is not None:
            unit = self._unit_of(key)[0]
            self.cache.freshness.filled(unit, self._ck(key), version, part=part, reader=reader)

    def _units_under(self, prefix: str) -> tuple[list[str], list[tuple[Unit, str]]]:
        """Cached objects under cache-key ``prefix`` and the units they belong to."""
        objects = [
            ck for ck in self.cache.cached_objects(prefix) if "\x01" not in ck and "\x02" not in ck
        ]
        units: dict[str, tuple[Unit, str]] = {}
        for ck in objects:
            parsed = parse_entry_key(self._namespace, ck)
            if parsed is not None:
                unit, folder = self._unit_of(parsed[0])
                units[unit.name] = (unit, folder)
        return objects, list(units.values())

    async def _revalidate_under(self, prefix: str, since: float) -> None:
        """Validate every unit with cached objects under cache-key ``prefix``, except
        those validated since ``since`` (by the gate, or another changed document)."""
        freshness = self.cache.freshness
        for unit, folder in self._units_under(prefix)[1]:
            await freshness.validate_now(unit, self._versions_now(unit, folder), since)

    def _revalidate_under_sync(self, prefix: str, since: float) -> None:
        freshness = self.cache.freshness
        for unit, folder in self._units_under(prefix)[1]:
            freshness.validate_now_sync(unit, self._listing_sync(unit, folder), since)

    async def revalidate(
        self, progress: Callable[[int, int], None] | None = None
    ) -> ValidationReport:
        """Validate every cached entry of this store against the source now.

        One listing per unit (array) with cached entries; changed, deleted and created
        objects are dropped from every tier, unchanged ones are kept and marked
        validated for every process of the cache folder. ``progress(done, total)``
        is called after each unit. A store without versions is not validated: the
        report says so (`ValidationReport.note`), its entries live by their TTLs.
        Raises if a listing fails.
        """
        if not self._source.supported:
            return ValidationReport(0, 0, 0, 0, 0.0, note=self._no_versions_note())
        cache = self.cache
        t0 = time.perf_counter()
        before = cache.stats()
        objects, units = self._units_under(self._namespace + "/")
        changed = unverified = 0
        started = time.time()
        for done, (unit, folder) in enumerate(units, 1):
            listing = self._versions_now(unit, folder)
            found = await cache.freshness.validate_now(unit, listing, started=started)
            changed += found[0]
            unverified += found[1]
            if progress is not None:
                progress(done, len(units))
        delta = cache.stats() - before
        return ValidationReport(
            units=len(units),
            objects=len(objects),
            changed=changed,
            requests=delta.validation_requests,
            seconds=time.perf_counter() - t0,
            unverified=unverified,
        )
