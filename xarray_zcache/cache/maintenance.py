"""One maintenance thread per process for every cache (not a thread per cache)."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Protocol

from xarray_zcache.cache.background import lower_priority
from xarray_zcache.cache.logs import flush_suppressed

__all__ = ["Maintained", "schedule"]

logger = logging.getLogger("xarray_zcache.cache")


class Maintained(Protocol):
    @property
    def maintenance_interval(self) -> float: ...

    @property
    def closed(self) -> bool: ...

    def maintain(self) -> None: ...


_lock = threading.Lock()
_wake = threading.Condition(_lock)
_due: weakref.WeakKeyDictionary[Maintained, float] = weakref.WeakKeyDictionary()
_thread: threading.Thread | None = None


def _after_fork_in_child() -> None:
    """A forked child has no maintenance thread, and the parent's may have held the lock at
    the fork: the child starts afresh (its caches schedule themselves again)."""
    global _lock, _wake, _due, _thread
    _lock = threading.Lock()
    _wake = threading.Condition(_lock)
    _due = weakref.WeakKeyDictionary()
    _thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def schedule(cache: Maintained) -> None:
    """Run ``cache.maintain()`` every ``cache.maintenance_interval`` seconds until it closes.

    The cache is held weakly: a cache nobody uses any more is not kept alive.
    """
    global _thread
    with _lock:
        _due[cache] = time.monotonic() + cache.maintenance_interval
        if _thread is None:
            _thread = threading.Thread(target=_run, name="zcache-maintenance", daemon=True)
            _thread.start()
        _wake.notify()


def _run() -> None:
    lower_priority()  # readers' threads first (background.py)
    while True:
        with _lock:
            now = time.monotonic()
            ready = [c for c, t in list(_due.items()) if t <= now]
            for c in ready:
                if c.closed:
                    del _due[c]
                else:
                    _due[c] = now + c.maintenance_interval
            wait = min((t for t in _due.values()), default=now + 60) - now
        for c in ready:
            if c.closed:
                continue
            try:
                c.maintain()
            except Exception:
                logger.exception("xarray-zcache: cache maintenance failed")
        flush_suppressed()
        del ready
        with _lock:
            _wake.wait(timeout=max(0.05, wait))
