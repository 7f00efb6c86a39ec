"""Sequential-scan detection and read-ahead for chunk keys of zarr arrays.

A full read of an array (``ds.t2m.mean().compute()``) misses chunk after chunk in
(roughly) C order; with S3's per-request latency the scan is bound by how many
requests are in flight. When a run of misses of one array is clustered (not
scattered like random access), `ScanPrefetcher` reads the next chunks ahead, with
bounded concurrency, through the store's single-flight fetch: the reader's own
request for a chunk then joins the fetch already in flight or hits the cache.
Read-ahead never changes what a read returns; at most ``depth`` chunks past the end
of what is read are fetched in vain. The read-ahead walks around the end of the array
(Dask reads a full array in interleaved runs, back to front) and stops once it has
passed every chunk.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["ChunkGrid", "ReadAheadTarget", "ScanPrefetcher"]

logger = logging.getLogger("xarray_zcache.prefetch")

_MAX_TRACKED = 1 << 24  # chunks per array whose first read is remembered (1 byte each)


class ReadAheadTarget(Protocol):
    """What the read-ahead needs of a store (`CachedStore` provides it)."""

    def peek(self, key: str) -> bytes | None:
        """The cached bytes of zarr key ``key`` (no request, no stats), or ``None``."""

    def is_cached(self, key: str) -> bool:
        """Whether the whole object ``key`` is cached."""

    def read_ahead_budget(self) -> tuple[int, float]:
        """(memory tier capacity in bytes, disk-writer backlog as a fraction)."""

    async def read_ahead(self, key: str) -> None:
        """Read chunk ``key`` into the cache (a request sent; no reader waits)."""


@dataclass(frozen=True)
class ChunkGrid:
    """How an array's chunk keys map to chunk indices."""

    array: str  # array path within the store ("" for a root array)
    nchunks: tuple[int, ...]
    prefix: str  # "c/" (v3 default encoding) or "" (v2 and v3 "v2" encoding)
    separator: str
    chunk_nbytes: int = 0  # uncompressed size of a chunk: an upper bound of what is stored

    @property
    def total(self) -> int:
        n = 1
        for d in self.nchunks:
            n *= d
        return n

    def key(self, ordinal: int) -> str:
        idx = []
        for d in reversed(self.nchunks):
            ordinal, i = divmod(ordinal, d)
            idx.append(i)
        body = self.separator.join(str(i) for i in reversed(idx)) if idx else "0"
        base = f"{self.array}/" if self.array else ""
        return f"{base}{self.prefix}{body}"

    def ordinal(self, key: str) -> int | None:
        base = f"{self.array}/" if self.array else ""
        if not key.startswith(base + self.prefix):
            return None
        parts = key[len(base) + len(self.prefix) :].split(self.separator)
        if len(parts) != len(self.nchunks):
            return None
        n = 0
        try:
            for part, d in zip(parts, self.nchunks, strict=True):
                i = int(part)
                if not 0 <= i < d:
                    return None
                n = n * d + i
        except ValueError:
            return None
        return n


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def grid_from_metadata(array: str, doc: bytes | dict[str, Any], v2: bool) -> ChunkGrid | None:
    """Parse an array's ``zarr.json`` (v3) or ``.zarray`` (v2) into its chunk grid."""
    try:
        meta = json.loads(doc) if isinstance(doc, bytes) else doc
        if v2:
            shape, chunks = meta["shape"], meta["chunks"]
            sep = meta.get("dimension_separator") or "."
            prefix = ""
        else:
            if meta.get("node_type") != "array":
                return None
            shape = meta["shape"]
            grid = meta["chunk_grid"]
            if grid.get("name") != "regular":
                return None
            chunks = grid["configuration"]["chunk_shape"]
            enc = meta.get("chunk_key_encoding", {"name": "default"})
            sep = enc.get("configuration", {}).get("separator") or (
                "/" if enc.get("name") == "default" else "."
            )
            prefix = "c" + sep if enc.get("name") == "default" else ""
        nchunks = tuple(_ceil_div(int(s), int(c)) for s, c in zip(shape, chunks, strict=True))
        dtype = meta.get("dtype") if v2 else meta.get("data_type")
        try:
            itemsize = np.dtype(dtype).itemsize if isinstance(dtype, str) else 8
        except TypeError:
            itemsize = 8
        nbytes = itemsize * math.prod(int(c) for c in chunks)
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    if not nchunks or any(n <= 0 for n in nchunks):
        return None
    return ChunkGrid(array, nchunks, prefix, sep, nbytes)


def consolidated_entry(doc: bytes, relative: str, v2: bool) -> dict[str, Any] | None:
    """An array's metadata from a group's consolidated metadata, if it is there."""
    try:
        meta = json.loads(doc)
        if v2:
            entry = meta["metadata"].get(f"{relative}/.zarray")
        else:
            entry = (meta.get("consolidated_metadata") or {}).get("metadata", {}).get(relative)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return entry if isinstance(entry, dict) else None


def candidate_array(key: str) -> tuple[str, bool] | None:
    """The array path a chunk key belongs to, and whether it looks like zarr v2."""
    if key.startswith("c/") or key.startswith("c."):
        return "", False
    if "/c/" in key:
        return key.rsplit("/c/", 1)[0], False
    head, _, tail = key.rpartition("/")
    if tail and all(p.isdigit() for p in tail.split(".")):
        return head, True
    return None


@dataclass
class _Scan:
    grid: ChunkGrid
    misses: deque[int] = field(default_factory=lambda: deque(maxlen=8))
    scanning: bool = False
    step: int = 1  # +1: ascending scan, -1: descending (dask often reduces back to front)
    frontier: int = -1  # furthest ordinal scheduled so far, in the direction of the scan
    walked: int = 0  # chunks the read-ahead has passed (read ahead, or already read)
    # chunks already read once: a miss on one of them is a re-read (an eviction), which
    # says nothing about a scan: random reads of a hot set must not look like one
    seen: bytearray | None = None


class ScanPrefetcher:
    """Detects sequential scans of zarr arrays and reads ahead of them.

    One per `CachedStore` (per process). Not thread-safe on its own: it is only
    used from the store's event loop.

    Parameters
    ----------
    store
        The store whose misses are observed and through which chunks are read.
    depth
        How many chunks ahead of the current position to read (and the maximum
        number of read-ahead requests in flight).
    min_run
        Misses of one array, clustered within ``4 * min_run`` chunks, that make a scan.
    """

    def __init__(self, store: ReadAheadTarget, depth: int = 16, min_run: int = 4) -> None:
        self.store = store
        self.depth = depth
        self.min_run = min_run
        self._scans: OrderedDict[str, _Scan | None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem: asyncio.Semaphore | None = None
        self.issued = 0
        self._scanning: set[str] = set()

    @property
    def active(self) -> bool:
        """Whether some array is being scanned (hits then matter too)."""
        return bool(self._scanning)

    def _grid(self, array: str, v2: bool) -> ChunkGrid | None:
        """The array's chunk grid from metadata already in the cache (never a request).

        zarr has read the array's metadata before its chunks: either its own
        document or the consolidated metadata of a group above it.
        """
        cached = self.store.peek
        own = cached(f"{array}/.zarray" if v2 else f"{array}/zarr.json" if array else "zarr.json")
        if own is not None:
            return grid_from_metadata(array, own, v2)
        parts = array.split("/") if array else []
        for i in range(len(parts) - 1, -1, -1):
            group = "/".join(parts[:i])
            doc = (
                cached(f"{group}/.zmetadata" if group else ".zmetadata")
                if v2
                else cached(f"{group}/zarr.json" if group else "zarr.json")
            )
            if doc is not None:
                entry = consolidated_entry(doc, "/".join(parts[i:]), v2)
                if entry is not None:
                    return grid_from_metadata(array, entry, v2)
        return None

    async def _scan_for(self, array: str, v2: bool) -> _Scan | None:
        if array in self._scans:
            self._scans.move_to_end(array)
            return self._scans[array]
        grid = self._grid(array, v2)
        scan = None if grid is None else _Scan(grid)
        if scan is not None and scan.grid.total <= _MAX_TRACKED:
            scan.seen = bytearray(scan.grid.total)
        self._scans[array] = scan
        if len(self._scans) > 256:
            self._scans.popitem(last=False)
        return scan

    async def observe(self, key: str, miss: bool) -> None:
        """Record a read of chunk ``key`` (a miss or a hit); read ahead if it is a scan."""
        where = candidate_array(key)
        if where is None:
            return
        scan = await self._scan_for(*where)
        if scan is None:
            return
        ordinal = scan.grid.ordinal(key)
        if ordinal is None:
            return
        if miss and not scan.scanning:
            if scan.seen is not None:
                if scan.seen[ordinal]:
                    scan.misses.clear()  # a re-read: not a scan
                    return
                scan.seen[ordinal] = 1
            scan.misses.append(ordinal)
            recent = list(scan.misses)[-self.min_run :]
            if len(recent) >= self.min_run and max(recent) - min(recent) < 4 * self.min_run:
                ups = sum(b > a for a, b in itertools.pairwise(recent))
                scan.step = 1 if 2 * ups >= len(recent) - 1 else -1
                scan.frontier = ordinal
                scan.scanning = True
                self._scanning.add(scan.grid.array)
        if not scan.scanning:
            return
        if miss and scan.seen is not None and not scan.seen[ordinal]:
            # a chunk the read-ahead has not reached: the reader jumped past it
            scan.seen[ordinal] = 1
            scan.frontier = ordinal
        if self._ahead(scan, ordinal) < self.depth // 2:
            self._read_ahead(scan, ordinal)

    @staticmethod
    def _ahead(scan: _Scan, ordinal: int) -> int:
        """How far the frontier is ahead of ``ordinal``, walking in the scan's direction
        and around the end of the array."""
        return ((scan.frontier - ordinal) * scan.step) % scan.grid.total

    def _read_ahead(self, scan: _Scan, ordinal: int) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.depth)
        capacity, backlog = self.store.read_ahead_budget()
        # read no further ahead than a quarter of the memory tier holds: read-ahead
        # must not evict what is about to be used
        depth = self.depth
        if scan.grid.chunk_nbytes:
            depth = min(depth, capacity // (4 * scan.grid.chunk_nbytes))
        if depth < 2 or backlog > 0.5:
            return  # (and never outrun the disk writer: its queue would drop writes)
        total, step = scan.grid.total, scan.step
        # The walk goes around the end of the array: Dask reads a full array in runs
        # (back to front: 39..20, then 191..160, then 19..16, ...), so the chunks past
        # the end are the next run's. It never gets more than ``depth`` chunks ahead of
        # the last read, and ends once it has passed every chunk of the array.
        while self._ahead(scan, ordinal) < depth and scan.walked < total:
            n = (scan.frontier + step) % total
            scan.frontier = n
            scan.walked += 1
            if scan.seen is not None:
                if scan.seen[n]:
                    continue  # read (or read ahead) already
                scan.seen[n] = 1
            key = scan.grid.key(n)
            if self.store.is_cached(key):
                continue
            task = asyncio.ensure_future(self._fetch(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if scan.walked >= total:
            # every chunk of the array read or read ahead: the scan is over
            scan.scanning = False
            scan.misses.clear()
            self._scanning.discard(scan.grid.array)

    async def _fetch(self, key: str) -> None:
        assert self._sem is not None
        async with self._sem:
            try:
                await self.store.read_ahead(key)
                self.issued += 1
            except Exception as exc:  # read-ahead is best effort; errors are never cached
                logger.debug("xarray-zcache: read-ahead of %r failed: %s", key, exc)
