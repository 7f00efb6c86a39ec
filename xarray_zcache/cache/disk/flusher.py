"""Writing access statistics off the hit path: a thread that runs a flush when poked.

A hit records its access in memory (:mod:`.access`); every second or thousand hits the
batch is written to the index. At a million entries that ``UPDATE`` of ~1,000 scattered rows
takes tens of milliseconds: run on the hit path, it was most of the cache's own work per hit
(amortized). The hit now only pokes this thread.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from xarray_zcache.cache.disk.access import AccessLog
from xarray_zcache.cache.disk.index import Recovered
from xarray_zcache.cache.disk.schema import BUSY_TIMEOUT_MS, IndexUnavailable, txn

if TYPE_CHECKING:
    from xarray_zcache.cache.disk.index import Index
    from xarray_zcache.cache.disk.log import Warner

logger = logging.getLogger("xarray_zcache.disk")

#: The idle thread checks this often whether its owner is gone (then it ends).
_IDLE_CHECK_S: Final = 30.0
#: Busy timeout for opportunistic access-stat flushes (hits poke the flusher thread).
_OPPORTUNISTIC_BUSY_MS: Final = 0


class Flusher:
    """Runs ``flush`` on a daemon thread (started at the first poke) each time it is poked.

    Pokes that arrive while a flush runs make one more flush, not one each. The thread holds
    its owner only weakly: an owner that is dropped without :meth:`stop` ends it.
    """

    def __init__(self, flush: Callable[[], None], name: str = "zcache-disk-stats") -> None:
        self._flush = weakref.WeakMethod(flush)  # type: ignore[arg-type]
        self._name = name
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        #: flushes run (statistics, for tests)
        self.runs = 0

    def poke(self) -> None:
        """Ask for a flush soon (returns at once)."""
        with self._lock:
            if self._stopped:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            if not self._wake.wait(_IDLE_CHECK_S):
                if self._flush() is None:
                    return  # the owner is gone
                continue
            self._wake.clear()
            flush = self._flush()
            if self._stopped or flush is None:
                return
            try:
                flush()
            except Exception:  # pragma: no cover - the flush logs its own errors
                logger.exception("xarray-zcache: writing access statistics failed")
            del flush
            self.runs += 1

    def stop(self) -> None:
        """End the thread (after the flush it is running, if any). Idempotent."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class StatsFlush:
    """Writing a tier's pending access statistics to its index (a part of ``TierCore``)."""

    _index: Index
    _access: AccessLog
    _warn: Warner

    @property
    def _closed(self) -> bool:
        return self._index.closed

    def flush(self) -> None:
        """Write pending access statistics (last access, hit counts) to the index."""
        self._flush(blocking=True)

    def _flush_in_background(self) -> None:
        self._flush(blocking=False)

    def _flush(self, *, blocking: bool) -> None:
        lock = self._index.lock
        if blocking:
            lock.acquire()
        elif not lock.acquire(blocking=False):
            return  # another thread is writing; try again on a later hit
        try:
            if self._closed:
                return
            batch = self._access.take()
            if not batch:
                return

            def write(conn: sqlite3.Connection) -> None:
                if not blocking:
                    conn.execute(f"PRAGMA busy_timeout={_OPPORTUNISTIC_BUSY_MS}")
                try:
                    with txn(conn):
                        AccessLog.write(conn, batch)
                finally:
                    if not blocking:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

            try:
                self._index.run_locked("writing access statistics", write, retry=False)
            except (Recovered, IndexUnavailable):
                pass  # statistics of a damaged or unavailable index are not worth keeping
            except sqlite3.Error as exc:
                self._access.requeue(batch)
                if blocking or not isinstance(exc, sqlite3.OperationalError):
                    self._warn.error(exc, "writing access statistics")
            except (OSError, RuntimeError) as exc:
                self._warn.error(exc, "writing access statistics")
        finally:
            lock.release()
