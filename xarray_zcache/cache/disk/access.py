"""Access statistics (last access, hit count) of disk hits, kept in memory, written in batches.

A hit must not cost an SQL write: hits are recorded here and written on ``flush``, ``close``,
before an eviction (so that LRU order is right), about once a second while hits arrive, or when
:data:`FLUSH_MAX_PENDING` keys are pending. Those last two are written by a thread of their
own (:mod:`.flusher`): the hit that finds a flush due only pokes it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Final

from xarray_zcache.cache.disk.rows import sql_safe

FLUSH_INTERVAL_S: Final = 1.0
FLUSH_MAX_PENDING: Final = 1000
#: After an opportunistic flush found the index busy, wait this long before trying again.
FLUSH_RETRY_S: Final = 0.1
#: Pending access records kept when the index cannot be written; beyond that they are dropped.
PENDING_HARD_LIMIT: Final = 100_000

Batch = dict[str, tuple[float, int]]


class AccessLog:
    """Pending ``key -> (last access, hits)``; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Batch = {}
        self._last_flush = time.monotonic()
        self._retry_at = 0.0

    def record(self, key: str, t: float) -> bool:
        """Note a hit at ``t``; returns whether a flush is due."""
        with self._lock:
            rec = self._pending.get(key)
            if rec is None:
                self._pending[key] = (t, 1)
            else:
                self._pending[key] = (t if t > rec[0] else rec[0], rec[1] + 1)
            mono = time.monotonic()
            return mono - self._last_flush >= FLUSH_INTERVAL_S or (
                len(self._pending) >= FLUSH_MAX_PENDING and mono >= self._retry_at
            )

    def take(self) -> Batch:
        with self._lock:
            batch = self._pending
            self._pending = {}
            self._last_flush = time.monotonic()
        return batch

    def requeue(self, batch: Batch) -> None:
        """Put back a batch that could not be written (the index is busy or full)."""
        with self._lock:
            self._retry_at = time.monotonic() + FLUSH_RETRY_S
            if len(self._pending) + len(batch) > PENDING_HARD_LIMIT:
                return  # the index is unwritable for long: drop these statistics
            for key, (t, n) in batch.items():
                rec = self._pending.get(key)
                self._pending[key] = (t, n) if rec is None else (max(t, rec[0]), n + rec[1])

    def forget(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._pending.pop(key, None)

    @staticmethod
    def write(conn: sqlite3.Connection, batch: Batch) -> None:
        """Write ``batch`` (inside the caller's transaction), in key order: consecutive updates
        then walk the key index in order (fewer pages touched in a large index)."""
        conn.executemany(
            "UPDATE entries SET last_access = MAX(last_access, ?), hits = hits + ? WHERE key = ?",
            [(t, n, key) for key, (t, n) in sorted(batch.items()) if sql_safe(key)],
        )
