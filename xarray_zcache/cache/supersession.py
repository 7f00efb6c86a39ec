"""Supersession: a reader is never given parts of two versions of one object.

A fill of a version other than the recorded one drops the object's older entries
(`Freshness.filled`). An object found changed (by a validation or a fill) is *marked*:
when its cached parts were superseded (`Supersession`; another process's validation:
the book's ``seen`` time). A byte range filled or served (`Supersession.served`: a hit,
a fill shared) for a reader that began reading parts of the object before that
(`part_reader`: its shard index was read before, cached or not) raises `ObjectChanged`:
nothing of the old version may be cached any more, but the reader may hold it (the index
it is about to apply to the new bytes). The mark is infinite while the old parts are
dropped.
"""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from xarray_zcache.cache.versions import VersionBook

__all__ = ["ObjectChanged", "Supersession", "part_reader"]

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


class ObjectChanged(OSError):
    """An object changed at the source while parts of it were cached: the parts were
    dropped and this read is not answered (its caller may hold an old part). Read again."""


class Supersession:
    """When the cached parts of objects were last superseded by a new version, as this
    process saw it (thread-safe); and the check of the parts served to a reader."""

    def __init__(self, book: VersionBook) -> None:
        self.book = book
        #: object -> when its cached parts were last superseded (a changed version)
        self._marks: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, keys: list[str], *, dropping: bool = False) -> None:
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

    def clear(self) -> None:
        self._marks.clear()
