"""Rate-limited debug records for per-chunk events (misses, fills, evictions, ...).

A scan of 100k chunks must not write 100k log records: `EventLog.debug` writes at
most `limit` records per event kind per `window` seconds (defaults: 20 per second,
`set_rate_limit` changes them for every `EventLog`), counts the rest, and writes one
summary ``"xarray-zcache: 1234 more <kind> events suppressed"`` with the next record
of that kind after the window (or at `flush_suppressed`, which maintenance runs).
Nothing is formatted or counted unless the logger is enabled for DEBUG.

Loggers: ``xarray_zcache.cache`` (the cache: creation, misses, fills, evictions,
invalidations), ``xarray_zcache.disk`` (the disk tier), ``xarray_zcache.store``
(opening stores), ``xarray_zcache.distributed`` (workers, peers), ``xarray_zcache.cli``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from xarray_zcache.cache.settings import CacheSettings

__all__ = ["EventLog", "events", "flush_suppressed", "log_created", "set_rate_limit"]

DEFAULT_LIMIT: Final = 20
DEFAULT_WINDOW: Final = 1.0

_limit = DEFAULT_LIMIT
_window = DEFAULT_WINDOW
_all: weakref.WeakSet[EventLog] = weakref.WeakSet()


def set_rate_limit(records: int = DEFAULT_LIMIT, seconds: float = DEFAULT_WINDOW) -> None:
    """At most ``records`` debug records per event kind every ``seconds``, for every logger.

    Raises
    ------
    ValueError
        If ``records`` is not an int >= 0 or ``seconds`` not a number > 0.
    """
    global _limit, _window
    if isinstance(records, bool) or not isinstance(records, int) or records < 0:
        raise ValueError(f"records: invalid value {records!r}; expected an int >= 0")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ValueError(f"seconds: invalid value {seconds!r}; expected a number of seconds > 0")
    _limit, _window = records, float(seconds)
    for log in list(_all):
        log.reset()


def flush_suppressed() -> None:
    """Write the pending "(k more suppressed)" summaries of windows that have ended."""
    for log in list(_all):
        log.flush()


class EventLog:
    """Debug records of ``logger``, rate-limited per event kind (see the module docstring)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._lock = threading.Lock()
        # kind -> [window start (monotonic), records written, records suppressed]
        self._kinds: dict[str, list[float]] = {}
        _all.add(self)

    def enabled(self) -> bool:
        """Whether debug records would be written (check before costly arguments)."""
        return self.logger.isEnabledFor(logging.DEBUG)

    def debug(self, kind: str, msg: str, *args: object) -> None:
        """Write ``msg % args`` at DEBUG unless ``kind`` is over its rate limit."""
        if not self.logger.isEnabledFor(logging.DEBUG):
            return
        now = time.monotonic()
        with self._lock:
            state = self._kinds.get(kind)
            suppressed = 0
            if state is None or now - state[0] >= _window:
                suppressed = 0 if state is None else int(state[2])
                state = self._kinds[kind] = [now, 0, 0]
            emit = state[1] < _limit
            state[1 if emit else 2] += 1
        if suppressed:
            self._summary(kind, suppressed)
        if emit:
            self.logger.debug(msg, *args, stacklevel=2)

    def _summary(self, kind: str, n: int) -> None:
        self.logger.debug(
            "xarray-zcache: %d more %s events suppressed (at most %d records per %g s; "
            "xarray_zcache.cache.logs.set_rate_limit changes it)",
            n,
            kind,
            _limit,
            _window,
        )

    def flush(self) -> None:
        """Summarize the kinds whose window ended with records suppressed."""
        now = time.monotonic()
        with self._lock:
            done = [
                (kind, int(s[2]))
                for kind, s in self._kinds.items()
                if s[2] and now - s[0] >= _window
            ]
            for kind, _ in done:
                del self._kinds[kind]
        for kind, n in done:
            self._summary(kind, n)

    def reset(self) -> None:
        with self._lock:
            self._kinds.clear()


_by_name: dict[str, EventLog] = {}
_by_name_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child gets its own event logs (a parent's thread may have held a lock)."""
    global _by_name, _by_name_lock
    _by_name = {}
    _by_name_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def events(name: str) -> EventLog:
    """The `EventLog` of logger ``name`` (one per name: rate limits are per logger and kind)."""
    with _by_name_lock:
        log = _by_name.get(name)
        if log is None:
            log = _by_name[name] = EventLog(logging.getLogger(name))
        return log


class _Disk(Protocol):
    """What `log_created` tells of a disk tier (a `~xarray_zcache.cache.disk.DiskTier`: the
    disk tier logs through this module, so this module does not import it)."""

    @property
    def path(self) -> object: ...

    @property
    def capacity(self) -> int: ...


def log_created(settings: CacheSettings, disk: _Disk | None) -> None:
    """INFO once per cache: its name, memory size, disk folder and size, policy."""
    log = logging.getLogger("xarray_zcache.cache")
    if not log.isEnabledFor(logging.INFO):
        return
    from xarray_zcache.cache.units import format_bytes

    where = "memory only" if disk is None else f"disk {disk.path} ({format_bytes(disk.capacity)})"
    log.info(
        "xarray-zcache: cache %r created: memory %s, %s, eviction policy %s, max object %s",
        settings.name,
        format_bytes(settings.memory_size),
        where,
        settings.eviction_policy,
        format_bytes(settings.max_object_size),
    )
