"""Answers without I/O: the first steps of the read protocol, for one read or a batch.

Memory (the whole object, then the part), then the pending disk writes, then the negative
entries kept in memory: what `HybridCache.get_or_load` answers in the caller's thread
before it looks on disk. `answer_now_many` asks the memory tier once for a batch of reads
and counts their hits at once (the decoded reads of `store_bytes.py`). A read none of these
steps answers gets `UNANSWERED`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xarray_zcache.cache.memory import MemoryTier
    from xarray_zcache.cache.negatives import NegativeEntries
    from xarray_zcache.cache.request import Read
    from xarray_zcache.cache.writer import DiskWriter

__all__ = ["UNANSWERED", "MemoryAnswers", "Unanswered"]


class _Unanswered:
    """No tier answered yet (a value and ``None``, "missing", are both answers)."""


UNANSWERED = _Unanswered()
#: the type of `UNANSWERED` (for callers' isinstance checks)
Unanswered = _Unanswered


class MemoryAnswers:
    """Part of `HybridCache` (its state is the cache's): reads answered from memory."""

    _memory: MemoryTier
    _writer: DiskWriter | None
    _negatives: NegativeEntries
    _last_hit: float

    if TYPE_CHECKING:  # provided by CacheReporting

        def _count_hit(self, tier: str, read: Read, value: bytes) -> None: ...

        def _count_memory_hits(self, hits: list[tuple[Read, bytes]]) -> None: ...

        def _count_negative(self, read: Read) -> None: ...

    def _from_memory(self, read: Read) -> bytes | None:
        """Memory, then pending disk writes: the whole object (cut), then the entry itself."""
        writer = self._writer
        if read.whole is not None and read.cut is not None:
            whole = self._memory.get(read.whole)
            if whole is None and writer is not None:
                whole = writer.pending(read.whole)
            if whole is not None:
                part = read.cut(whole)
                if part is not None:
                    return part
        value = self._memory.get(read.key)
        if value is None and writer is not None:
            value = writer.pending(read.key)
        return value

    def _known_missing(self, read: Read) -> bool:
        return not read.recheck and self._negatives.in_memory(read.object_key, time.time())

    def memory_hit(self, read: Read) -> bytes | None:
        """The value of ``read`` if memory (or a pending disk write) holds it, counted as a
        memory hit; else ``None``, nothing counted (no disk, no load: never blocks)."""
        value = self._from_memory(read)
        if value is not None:
            self._last_hit = time.monotonic()
            self._count_hit("memory", read, value)
        return value

    def _from_memory_or_negatives(self, read: Read) -> bytes | _Unanswered | None:
        """The first steps, in the caller's thread: memory, then negative entries."""
        value = self.memory_hit(read)
        if value is not None:
            return value
        if self._known_missing(read):
            self._count_negative(read)
            return None
        return UNANSWERED

    def answer_now(self, read: Read) -> bytes | _Unanswered | None:
        """What `get_or_load` would answer for ``read`` from memory or a negative entry,
        counted as that read would be; `UNANSWERED` when it would look further (disk,
        peers, the source). The caller has passed the freshness gate first."""
        return self._from_memory_or_negatives(read)

    def answer_now_many(self, reads: list[Read]) -> list[bytes | _Unanswered | None]:
        """`answer_now` of each of ``reads`` (in order; the caller has passed the freshness
        gate of each): the memory tier asked once, the hits counted at once."""
        if any(r.whole is not None for r in reads):
            return [self.answer_now(r) for r in reads]
        out: list[bytes | _Unanswered | None] = list(self._memory.get_many([r.key for r in reads]))
        if out and None not in out:  # every read a memory hit (a warm read's usual case)
            self._last_hit = time.monotonic()
            self._count_memory_hits(list(zip(reads, out, strict=True)))  # type: ignore[arg-type]
            return out
        # hits and negatives counted in the reads' order, as `answer_now` of each would
        # (the hot-key table prunes by count, ties to the earliest counted)
        writer = self._writer
        hits: list[tuple[Read, bytes]] = []
        any_hit = False
        for i, read in enumerate(reads):
            value = out[i]
            if value is None:  # (the rare case: every chunk of a warm read is in memory)
                value = None if writer is None else writer.pending(read.key)
                if value is None:
                    if not self._known_missing(read):
                        out[i] = UNANSWERED
                        continue
                    if hits:
                        self._count_memory_hits(hits)
                        hits = []
                    self._count_negative(read)
                    continue
                out[i] = value
            hits.append((read, value))  # type: ignore[arg-type]
            any_hit = True
        if any_hit:
            self._last_hit = time.monotonic()
        if hits:
            self._count_memory_hits(hits)
        return out
