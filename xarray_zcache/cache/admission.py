"""Admission: one rule for every tier. A value is admitted (to memory now, to disk through
the background writer) only if its key was not invalidated since the read began, under
the admission lock that invalidation also takes; so is a negative entry (a key
remembered as missing)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from xarray_zcache.cache.negatives import NEGATIVE_SUFFIX
from xarray_zcache.cache.request import Read, is_private
from xarray_zcache.cache.writer import DiskWriter, PendingWrite

if TYPE_CHECKING:
    from xarray_zcache.cache.disk import DiskTier
    from xarray_zcache.cache.memory import MemoryTier
    from xarray_zcache.cache.negatives import NegativeEntries
    from xarray_zcache.cache.policy import Invalidations
    from xarray_zcache.cache.recorder import StatsRecorder
    from xarray_zcache.cache.settings import CacheSettings

__all__ = ["Admission"]

_T = TypeVar("_T")


class Admission:
    """Part of `HybridCache` (its state is the cache's)."""

    settings: CacheSettings
    _memory: MemoryTier
    _writer: DiskWriter | None
    _negatives: NegativeEntries
    _inv: Invalidations
    _admit_lock: threading.Lock
    _closed: bool
    _prefetched: set[str]
    _stats: StatsRecorder
    hooks: dict[str, Callable[[str], None]]

    if TYPE_CHECKING:  # provided by HybridCache and DiskFallback

        def _expires(self, kind: str) -> float | None: ...

        def _hook(self, name: str, key: str) -> None: ...

        def _on_disk(self, action: str, op: Callable[[DiskTier], _T], default: _T) -> _T: ...

    def _admit(
        self,
        key: str,
        token: tuple[int, int],
        value: bytes,
        kind: str,
        *,
        read: Read | None = None,
        started_ns: int = 0,
        own: int = 0,
        disk: bool = True,
        ex: float | bool | None = False,
    ) -> bool:
        """Admit ``value`` for ``key`` unless the key was invalidated since ``token``.

        ``own``: invalidations by the caller itself (a write invalidates before and
        after sending). ``disk=False``: memory only. ``ex``: the expiry to keep
        (a promotion keeps the disk entry's), default from the kind's TTL.
        """
        if len(value) > self.settings.max_object_size:
            self._stats.add("not_admitted")
            return False
        expires = self._expires(kind) if ex is False else ex
        assert not isinstance(expires, bool)
        with self._admit_lock:
            if self._closed or not self._inv.unchanged(key, token, own):
                return False
            if self.hooks:
                self._hook("admit", key)
            self._memory.put(key, value, expires=expires, kind=kind)
            if read is not None and read.prefetch:
                self._prefetched.add(key)
            if disk and self._writer is not None and not is_private(key):
                namespace = read.namespace if read is not None else ""
                self._writer.submit(PendingWrite(key, value, kind, namespace, expires, started_ns))
        return True

    def put(
        self, key: str, value: bytes, *, kind: str, namespace: str = "", forever: bool = False
    ) -> bool:
        """Admit ``value`` under ``key`` (memory now, disk in the background); False if refused.

        ``forever``: no expiry, whatever the kind's TTL (bookkeeping entries).
        """
        token = self._inv.begin(key)
        try:
            return self._admit(
                key,
                token,
                value,
                kind,
                read=Read(key, kind, namespace),
                started_ns=time.time_ns(),
                ex=None if forever else False,
            )
        finally:
            self._inv.end(key)

    def _remember_missing(self, read: Read, token: tuple[int, int], started_ns: int) -> None:
        # a negative entry never outlives the TTL of its kind: a chunk another writer
        # creates is seen as soon as a changed chunk would be
        kind_ttl = self.settings.ttl(read.kind)
        ttl = (
            self.settings.negative_ttl
            if kind_ttl is None
            else min(self.settings.negative_ttl, kind_ttl)
        )
        if ttl <= 0:
            return
        expires = time.time() + ttl
        with self._admit_lock:
            if self._closed or not self._inv.unchanged(read.key, token):
                return
            self._negatives.add(read.key, expires)
            if self._writer is not None and not is_private(read.key):
                self._writer.submit(
                    PendingWrite(
                        read.key + NEGATIVE_SUFFIX,
                        b"",
                        "metadata",
                        read.namespace,
                        expires,
                        started_ns,
                    )
                )

    def _forget_missing(self, key: str) -> None:
        self._negatives.discard(key)
        with self._admit_lock:
            if self._writer is not None:
                self._writer.discard(key + NEGATIVE_SUFFIX)
        self._on_disk("forgetting a missing key", lambda d: d.delete(key + NEGATIVE_SUFFIX), None)
