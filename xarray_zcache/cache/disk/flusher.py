"""Writing access statistics off the hit path: a thread that runs a flush when poked.

A hit records its access in memory (:mod:`.access`); every second or thousand hits the
batch is written to the index. At a million entries that ``UPDATE`` of ~1,000 scattered rows
takes tens of milliseconds: run on the hit path, it was most of the cache's own work per hit
(amortized). The hit now only pokes this thread.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Final

logger = logging.getLogger("xarray_zcache.disk")

#: The idle thread checks this often whether its owner is gone (then it ends).
_IDLE_CHECK_S: Final = 30.0


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
