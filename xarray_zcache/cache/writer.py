"""The background disk writer: fills reach the disk tier without slowing the reader."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from xarray_zcache.cache.background import lower_priority
from xarray_zcache.cache.disk.entry import Fill
from xarray_zcache.cache.logs import events
from xarray_zcache.cache.units import format_bytes

if TYPE_CHECKING:
    from xarray_zcache.cache.disk import DiskTier

__all__ = [
    "BATCH_BYTES",
    "BATCH_ENTRIES",
    "MAX_DEFER_S",
    "QUIET_S",
    "YIELD_BACKLOG",
    "DiskWriter",
    "PendingWrite",
]

#: The writer stores what is queued in batches (``DiskTier.put_many``: two index transactions
#: per batch instead of two per entry) of at most this many entries ...
BATCH_ENTRIES: Final = 256
#: ... and about this many bytes of values (a batch holds the index write lock while its files
#: are renamed into place; the values themselves are written before, outside any lock).
BATCH_BYTES: Final = 32 * 2**20
#: The writer yields to cache hits: it starts a batch only once no hit came for this long
#: (a warm read right after a cold one does not share the CPU and the GIL with the cold
#: read's disk writes; they are written, coalesced, when the reads pause) ...
QUIET_S: Final = 0.05
#: ... but never waits longer than this for a batch ...
MAX_DEFER_S: Final = 2.0
#: ... nor while the queue is fuller than this fraction of its byte limit (writes would be
#: dropped), nor while someone waits in ``flush`` or ``close``.
YIELD_BACKLOG: Final = 0.5

logger = logging.getLogger("xarray_zcache.cache")
_events = events("xarray_zcache.cache")


@dataclasses.dataclass(frozen=True, slots=True)
class PendingWrite:
    """A value admitted to the cache, waiting to be written to the disk tier."""

    key: str
    value: bytes
    kind: str
    namespace: str
    expires: float | None
    started_ns: int  # when the fetch began: the disk tier drops it if invalidated since


class DiskWriter:
    """A bounded queue of disk writes and the thread that performs them.

    Until written, a value stays readable here (`pending`), so a read between the
    admission and the write does not miss. The queue is bounded in bytes: when it
    is full, writes are dropped (the memory tier still holds the value) and
    counted through ``on_drop``. A write that raises (the folder vanished) is
    passed to ``on_error``, which may `abandon` the writer. `flush` waits for the
    queue; `close` stops the thread. One lock guards the pending map; the disk
    write runs outside it.

    ``busy``, if given, returns how long ago the cache last served a hit (seconds):
    the writer defers a batch while hits are recent (`QUIET_S`), so that the hashing,
    file writes and index commits of a cold read's fills do not compete with a warm
    read for the GIL; deferred writes coalesce into one batch. It never defers longer
    than `MAX_DEFER_S`, nor with the queue over `YIELD_BACKLOG` of its limit, nor while
    `flush` or `close` waits. Misses (waiting on the source) do not count: the writer
    runs while a cold read waits for its requests.
    """

    def __init__(
        self,
        disk: DiskTier,
        limit: int,
        on_drop: Callable[[], None],
        on_error: Callable[[BaseException, str], None] | None = None,
        busy: Callable[[], float] | None = None,
    ) -> None:
        self._disk = disk
        self._busy = busy
        self._urgent = 0  # callers waiting in flush/close: no deferral
        self._limit = limit
        self._on_drop = on_drop
        self._on_error = on_error
        self._lock = threading.Lock()
        self._pending: dict[str, PendingWrite] = {}
        self._bytes = 0
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._warned_full = False
        #: ``put_many`` calls made, and the entries they carried (statistics, for tests)
        self.batches = 0
        self.batched_entries = 0
        #: batches started late because hits were being served (statistics, for tests)
        self.deferred = 0

    @property
    def backlog(self) -> float:
        """Fraction of the byte limit waiting to be written."""
        return self._bytes / max(1, self._limit)

    def pending(self, key: str) -> bytes | None:
        """The value waiting to be written under ``key``, if any."""
        item = self._pending.get(key)
        return None if item is None else item.value

    def __contains__(self, key: str) -> bool:
        return key in self._pending

    def submit(self, item: PendingWrite) -> bool:
        """Queue ``item``; return False if it was dropped (queue full or closed)."""
        with self._lock:
            if self._closed:
                return False
            if self._pending and self._bytes + len(item.value) > self._limit:
                # never block a reader on the disk: drop this write, memory still has it
                # (an empty queue takes any admitted object, however large)
                if not self._warned_full:
                    self._warned_full = True
                    logger.warning(
                        "xarray-zcache: the background disk writer is behind (%s queued); "
                        "dropping disk writes until it catches up (raise zcache.write-queue-size)",
                        format_bytes(self._bytes),
                    )
                self._on_drop()
                return False
            old = self._pending.get(item.key)
            if old is not None:
                self._bytes -= len(old.value)
            self._pending[item.key] = item
            self._bytes += len(item.value)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="zcache-disk-writer", daemon=True
                )
                self._thread.start()
        self._queue.put(item.key)
        return True

    def discard(self, key: str) -> None:
        """Forget the pending write of ``key`` (it was invalidated)."""
        with self._lock:
            old = self._pending.pop(key, None)
            if old is not None:
                self._bytes -= len(old.value)

    def discard_prefix(self, prefix: str) -> None:
        """Forget the pending writes of every key starting with ``prefix``."""
        with self._lock:
            for k in [k for k in self._pending if k.startswith(prefix)]:
                self._bytes -= len(self._pending.pop(k).value)

    def _run(self) -> None:
        lower_priority()  # readers' threads first (background.py)
        while True:
            keys = self._next_batch()
            try:
                self._write([k for k in dict.fromkeys(keys) if k is not None])
            except Exception as exc:
                if self._on_error is None:
                    logger.exception(
                        "xarray-zcache: background disk write of %d entries failed", len(keys)
                    )
                else:
                    try:
                        self._on_error(exc, "writing an entry to disk")
                    except Exception:  # pragma: no cover - the handler logs its own errors
                        logger.exception("xarray-zcache: handling a failed disk write failed")
            finally:
                for _ in keys:
                    self._queue.task_done()
            if keys[-1] is None:
                return

    def _next_batch(self) -> list[str | None]:
        """The next queued keys: at least one (waits for it), then, once hits pause
        (`_yield_to_hits`), whatever is queued already, up to ``BATCH_ENTRIES`` keys or
        ``BATCH_BYTES`` of values (the stop marker ends it)."""
        keys = [self._queue.get()]
        if keys[-1] is not None:
            self._yield_to_hits()
        nbytes = 0
        while keys[-1] is not None and len(keys) < BATCH_ENTRIES and nbytes < BATCH_BYTES:
            item = self._pending.get(keys[-1])
            nbytes += 0 if item is None else len(item.value)
            try:
                keys.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return keys

    def _yield_to_hits(self) -> None:
        """Wait while the cache serves hits (see the class docstring), within the bounds."""
        busy = self._busy
        if busy is None:
            return
        deadline = time.monotonic() + MAX_DEFER_S
        deferred = False
        while not self._urgent and not self._closed and self.backlog < YIELD_BACKLOG:
            quiet = busy()
            now = time.monotonic()
            if quiet >= QUIET_S or now >= deadline:
                break
            deferred = True
            time.sleep(min(QUIET_S - quiet, deadline - now))
        if deferred:
            self.deferred += 1

    def _write(self, keys: list[str]) -> None:
        """Store the pending values of ``keys`` (distinct) with one ``put_many``."""
        items = [item for item in map(self._pending.get, keys) if item is not None]
        if not items:
            return  # invalidated, or written by an earlier queue entry
        self.batches += 1
        self.batched_entries += len(items)
        try:
            stored = self._disk.put_many(
                [
                    Fill(
                        item.key,
                        item.value,
                        item.namespace,
                        item.kind,
                        item.expires,
                        item.started_ns,
                    )
                    for item in items
                ]
            )
        finally:
            with self._lock:  # written or failed: the value is no longer pending either way
                for item in items:
                    if self._pending.get(item.key) is item:
                        del self._pending[item.key]
                        self._bytes -= len(item.value)
        for item, ok in zip(items, stored, strict=True):
            if not ok and len(item.value) <= self._disk.capacity:
                self._on_drop()
            _events.debug(
                "disk fill",
                "xarray-zcache: %s %r on disk (%d bytes)",
                "filled" if ok else "did not store",
                item.key,
                len(item.value),
            )

    def flush(self) -> None:
        """Wait until every queued write is done (the writer stops yielding to hits)."""
        if self._thread is not None:
            with self._lock:
                self._urgent += 1
            try:
                self._queue.join()
            finally:
                with self._lock:
                    self._urgent -= 1

    def abandon(self) -> None:
        """Stop without writing what is queued (the disk tier is gone); never blocks.

        Safe from the writer's own thread. Later submissions are dropped.
        """
        with self._lock:
            self._closed = True
            self._pending.clear()
            self._bytes = 0
        if self._thread is not None:
            self._queue.put(None)

    def close(self) -> None:
        """Flush, then stop the thread; later submissions are dropped."""
        self.flush()
        with self._lock:
            self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
