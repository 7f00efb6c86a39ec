"""`HybridCache.answer_now_many`: what the tiers answer now, without I/O, for a batch of
reads (`BatchAnswers`), and `UNANSWERED`, the answer "no tier answered yet"."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xarray_zcache.cache.memory import MemoryTier
    from xarray_zcache.cache.request import Read
    from xarray_zcache.cache.writer import DiskWriter

__all__ = ["UNANSWERED", "BatchAnswers", "Unanswered"]


class _Unanswered:
    """No tier answered yet (a value and ``None``, "missing", are both answers)."""


UNANSWERED = _Unanswered()
#: the type of `UNANSWERED` (for callers' isinstance checks)
Unanswered = _Unanswered


class BatchAnswers:
    """Part of `HybridCache` (its state is the cache's)."""

    _memory: MemoryTier
    _writer: DiskWriter | None
    _last_hit: float

    if TYPE_CHECKING:  # (defined by `HybridCache` and `CacheReporting`)

        def answer_now(self, read: Read) -> bytes | _Unanswered | None: ...

        def _known_missing(self, read: Read) -> bool: ...

        def _count_negative(self, read: Read) -> None: ...

        def _count_memory_hits(self, hits: list[tuple[Read, bytes]]) -> None: ...

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
        writer = self._writer
        for i, read in enumerate(reads):
            if out[i] is None:  # (the rare case: every chunk of a warm read is in memory)
                value = None if writer is None else writer.pending(read.key)
                if value is not None:
                    out[i] = value
                elif not self._known_missing(read):
                    out[i] = UNANSWERED
                else:
                    self._count_negative(read)
        hits = [
            (r, v)
            for r, v in zip(reads, out, strict=True)
            if v is not None and not isinstance(v, _Unanswered)
        ]
        if hits:
            self._last_hit = time.monotonic()
            self._count_memory_hits(hits)
        return out
