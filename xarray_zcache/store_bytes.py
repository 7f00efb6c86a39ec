"""How a `CachedStore` reads whole objects and plain byte ranges through the cache, as
the ``bytes`` object the cache holds: `_get_bytes` (what `get` does for them: the
freshness gate, the read protocol, the read-ahead of sequential scans) and, for the
decoded tier, `get_bytes` and `bytes_now` (without I/O). `get` wraps the bytes in zarr
buffers.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import TYPE_CHECKING

from zarr.core.buffer import default_buffer_prototype

from xarray_zcache.cache.answers import UNANSWERED, _Unanswered
from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.keys import check_byte_range, is_plain_range
from xarray_zcache.prefetch import ScanPrefetcher
from xarray_zcache.registry import on_dask_worker
from xarray_zcache.store_sources import SourceReads
from xarray_zcache.store_validation import SourceValidation

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest
    from zarr.core.buffer import Buffer, BufferPrototype

    from xarray_zcache.cache.request import Read
    from xarray_zcache.references import References

__all__ = ["CachedBytes", "ReadsMemo"]

#: batches of keys whose reads a caller's memo holds (`CachedBytes.bytes_now_many`)
_MEMO_BATCHES = 16
#: such a memo: keys -> (the store, their reads, their units' gates to check)
ReadsMemo = dict[tuple[str, ...], tuple[object, list["Read"], list[tuple[str, list[int]]]]]


class CachedBytes(SourceValidation, SourceReads):
    """Part of `CachedStore` (its state is the store's)."""

    _refs: References | None
    #: the read-ahead per event loop (held weakly: short-lived loops leave nothing)
    _prefetchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ScanPrefetcher]

    if TYPE_CHECKING:  # (defined by `CachedStore`)

        async def get(
            self,
            key: str,
            prototype: BufferPrototype | None = None,
            byte_range: ByteRequest | None = None,
        ) -> Buffer | None: ...

    async def get_bytes(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        """What `get` returns, as the ``bytes`` object the cache holds (no copy): the same
        read protocol, freshness gate and counting (the decoded tier's token)."""
        check_byte_range(byte_range)
        if self._refs is not None or not is_plain_range(byte_range):
            buf = await self.get(key, default_buffer_prototype(), byte_range)
            return None if buf is None else buf.to_bytes()
        return await self._get_bytes(self.cache, key, byte_range)

    def bytes_now(
        self, key: str, cache: HybridCache | None = None
    ) -> tuple[str, bytes | _Unanswered | None]:
        """The cache key of ``key`` and the bytes `get_bytes(key)` would return now, if the
        cache can tell without I/O and without waiting (the freshness gate open, the
        object in memory or known missing; counted as such a read is); otherwise
        `UNANSWERED` (call `get_bytes`). ``cache``: `cache`, if the caller has it."""
        read = self._read(key, None)
        if self._refs is not None:
            return read.key, UNANSWERED
        cache = self.cache if cache is None else cache
        if not self._gate_open(key, cache):  # the gate of `_validated`, without its I/O
            return read.key, UNANSWERED
        return read.key, cache.answer_now(read)

    def bytes_now_many(
        self, keys: list[str], cache: HybridCache | None = None, memo: ReadsMemo | None = None
    ) -> tuple[list[str], list[bytes | _Unanswered | None]]:
        """`bytes_now` of each of ``keys`` (whole objects), in order: the cache keys and the
        answers. The freshness gate is checked once per unit, the memory tier asked and
        the hits counted once for the lot. ``memo``: the caller's memo of the reads of
        batches of keys it asks for again (the same keys: the same reads, unless this
        store or the read's context changed: checked on the first key)."""
        reads, units = self._reads_of(keys, memo)
        cks = [read.key for read in reads]
        if self._refs is not None:
            return cks, [UNANSWERED] * len(keys)
        cache = self.cache if cache is None else cache
        if self._source.supported:
            shut = [i for key, at in units if not self._gate_open(key, cache) for i in at]
            if len(shut) == len(keys):
                return cks, [UNANSWERED] * len(keys)
            if shut:
                closed = set(shut)
                asked = [r for i, r in enumerate(reads) if i not in closed]
                answers = iter(cache.answer_now_many(asked))
                return cks, [UNANSWERED if i in closed else next(answers) for i in range(len(keys))]
        return cks, cache.answer_now_many(reads)

    def _reads_of(
        self, keys: list[str], memo: ReadsMemo | None
    ) -> tuple[list[Read], list[tuple[str, list[int]]]]:
        """The reads of ``keys`` and their units' gates to check: (a key of the unit, the
        positions of its keys)."""
        if memo is None or not keys:
            return [self._read(key, None) for key in keys], self._gates_of(keys)
        first = self._read(keys[0], None)
        batch = tuple(keys)
        held = memo.get(batch)
        if held is not None and held[0] is self and held[1][0] == first:
            return held[1], held[2]
        reads = [first, *(self._read(key, None) for key in keys[1:])]
        units = self._gates_of(keys)
        if len(memo) >= _MEMO_BATCHES:
            memo.clear()
        memo[batch] = (self, reads, units)
        return reads, units

    def _gates_of(self, keys: list[str]) -> list[tuple[str, list[int]]]:
        if not self._source.supported:
            return []
        groups: dict[str, tuple[str, list[int]]] = {}
        for i, key in enumerate(keys):
            unit = self._unit_of(key)[0].name
            group = groups.get(unit)
            if group is None:
                groups[unit] = (key, [i])
            else:
                group[1].append(i)
        return list(groups.values())

    async def _get_bytes(
        self, cache: HybridCache, key: str, byte_range: ByteRequest | None
    ) -> bytes | None:
        began = time.time()
        await self._validated(key, cache)
        reader = self._part_reader(key, byte_range, began)
        read = self._read(key, byte_range)
        pf = self._prefetcher() if byte_range is None and read.kind == "chunk" else None
        missed = False

        async def load() -> bytes | None:
            nonlocal missed
            missed = True
            if pf is not None:
                await pf.observe(key, miss=True)  # may start reading ahead
            return await self._fetch(cache, key, byte_range, began, reader)

        data = await cache.get_or_load(read, load)
        self._served(cache, key, reader)
        if pf is not None and not missed and pf.active:
            await pf.observe(key, miss=False)
        return data

    def _prefetcher(self) -> ScanPrefetcher | None:
        """The read-ahead of this store on the running event loop (None if disabled)."""
        depth = self._config.prefetch_depth
        if depth <= 0:
            return None
        loop = asyncio.get_running_loop()
        pf = self._prefetchers.get(loop)
        if pf is None:
            if on_dask_worker():
                # on a Dask cluster the workers split the scan between them: one worker's
                # read-ahead would fetch chunks that other workers are about to read
                return None
            pf = self._prefetchers[loop] = ScanPrefetcher(self, depth)
        return pf
