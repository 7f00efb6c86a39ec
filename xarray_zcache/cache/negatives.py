"""Negative entries ("this key is missing") and cached listings.

A negative entry remembers that the inner store answered "missing" for a key
(a metadata probe, or a chunk zarr left unwritten because it holds only the fill
value) for at most ``ttl`` seconds. It is kept in memory and, so that a new
process does not probe again, on disk as an empty payload under
``key + NEGATIVE_SUFFIX``. Listings are kept in memory only.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xarray_zcache.cache.disk import DiskTier

__all__ = ["NEGATIVE_SUFFIX", "Listings", "NegativeEntries"]

from xarray_zcache.cache.request import PART_SEP

# a part of the object (see PART_SEP): dropped whenever the object is invalidated
NEGATIVE_SUFFIX = PART_SEP + "missing"
_MAX_ENTRIES = 100_000


class NegativeEntries:
    """Keys known to be missing, with their expiry; thread-safe."""

    def __init__(self, ttl: float, disk: DiskTier | None) -> None:
        self.ttl = ttl
        self._disk = disk
        self._lock = threading.Lock()
        self._expires: dict[str, float] = {}

    def drop_disk(self) -> None:
        """Stop looking on disk (the cache lost its disk tier)."""
        self._disk = None

    def in_memory(self, key: str, now: float) -> bool:
        """Whether a fresh negative entry for ``key`` is held in memory (no I/O)."""
        expires = self._expires.get(key)
        if expires is None:
            return False
        if expires <= now:
            with self._lock:
                self._expires.pop(key, None)
            return False
        return True

    def maybe_on_disk(self, key: str) -> bool:
        """Cheap pre-check (a ``stat``): whether a negative entry may be on disk."""
        disk = self._disk
        return self.ttl > 0 and disk is not None and disk.might_contain(key + NEGATIVE_SUFFIX)

    def on_disk(self, key: str, now: float) -> bool:
        """Whether a fresh negative entry for ``key`` is on disk (reads a file)."""
        disk = self._disk
        if self.ttl <= 0 or disk is None:
            return False
        entry = disk.get_entry(key + NEGATIVE_SUFFIX, now=now)
        if entry is None:
            return False  # (the disk tier drops it once expired)
        expires = now + self.ttl if entry.expires is None else min(entry.expires, now + self.ttl)
        self.add(key, expires)
        return True

    def add(self, key: str, expires: float) -> None:
        """Remember ``key`` as missing until ``expires`` (in memory)."""
        with self._lock:
            if len(self._expires) > _MAX_ENTRIES:
                self._expires.clear()
            self._expires[key] = expires

    def discard(self, key: str) -> None:
        with self._lock:
            self._expires.pop(key, None)

    def keys_under(self, prefix: str) -> list[str]:
        """Objects under ``prefix`` with a negative entry in memory (expired ones too)."""
        with self._lock:
            return [k for k in self._expires if k.startswith(prefix)]

    def discard_prefix(self, prefix: str) -> None:
        with self._lock:
            for k in [k for k in self._expires if k.startswith(prefix)]:
                del self._expires[k]

    def sweep(self, now: float) -> None:
        """Drop expired entries."""
        with self._lock:
            for k in [k for k, t in self._expires.items() if t <= now]:
                del self._expires[k]


class Listings:
    """Cached listings (``list``, ``list_dir``, ``list_prefix``) with a TTL; thread-safe.

    A listing taken while a write went through may be stale: callers take a
    `generation` before listing and `put` drops the result if it changed.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, tuple[str, ...]]] = {}
        self.generation = 0

    def get(self, key: str) -> tuple[str, ...] | None:
        item = self._items.get(key)
        if item is None or item[0] <= time.time():
            return None
        return item[1]

    def put(self, key: str, names: tuple[str, ...], generation: int) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if generation != self.generation:
                return  # a write went through while listing: the result may be stale
            if len(self._items) > 10_000:
                self._items.clear()
            self._items[key] = (time.time() + self.ttl, names)

    def drop(self, prefix: str) -> None:
        with self._lock:
            self.generation += 1
            for k in [k for k in self._items if k.startswith(prefix)]:
                del self._items[k]

    def sweep(self, now: float) -> None:
        with self._lock:
            for k in [k for k, (t, _) in self._items.items() if t <= now]:
                del self._items[k]
