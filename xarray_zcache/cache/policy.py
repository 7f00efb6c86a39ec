"""Cache policies: admission, promotion (disk to memory) and invalidation bookkeeping."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict

__all__ = ["AccessRateTracker", "Invalidations"]


class AccessRateTracker:
    """Exponentially decayed access rate (accesses per second) per key, bounded in size.

    Each access adds ``1 / tau`` to the key's rate, which decays with time constant
    ``tau`` seconds; a key accessed steadily ``r`` times per second converges to a
    rate of ``r``. At most ``capacity`` keys are tracked (least recently seen are
    forgotten). Thread-safe.

    Parameters
    ----------
    tau
        Decay time constant in seconds.
    capacity
        Maximum number of keys tracked.

    Examples
    --------
    >>> t = AccessRateTracker(tau=10.0)
    >>> t.touch("k", now=0.0)
    0.1
    """

    def __init__(self, tau: float = 10.0, capacity: int = 100_000) -> None:
        self.tau = tau
        self.capacity = capacity
        self._lock = threading.Lock()
        self._rates: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def touch(self, key: str, now: float | None = None) -> float:
        """Record one access to ``key``; return its rate after the access."""
        now = time.monotonic() if now is None else now
        with self._lock:
            rate, last = self._rates.pop(key, (0.0, now))
            rate = rate * math.exp(-(now - last) / self.tau) + 1.0 / self.tau
            self._rates[key] = (rate, now)
            if len(self._rates) > self.capacity:
                self._rates.popitem(last=False)
            return rate

    def rate(self, key: str, now: float | None = None) -> float:
        """Current rate of ``key`` (0.0 if unknown)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            rate, last = self._rates.get(key, (0.0, now))
            return rate * math.exp(-(now - last) / self.tau)

    def forget(self, key: str) -> None:
        with self._lock:
            self._rates.pop(key, None)


class Invalidations:
    """Generation counters that let in-flight fills detect a concurrent invalidation.

    A read that missed fetches the value from the inner store; if the key is written
    or deleted through the cache while that fetch is in flight, the fetched value is
    stale and must not be admitted. `begin` registers an operation on a key and
    returns a token; `bump`/`bump_prefix` record an invalidation; `unchanged`
    tells whether exactly ``own`` invalidations (the caller's own) happened since
    the token; `end` unregisters the operation. Counters are kept only for keys
    with operations in flight, so the structure stays small. Thread-safe.

    Examples
    --------
    >>> inv = Invalidations()
    >>> token = inv.begin("k")
    >>> inv.bump("k")
    >>> inv.unchanged("k", token)
    False
    >>> inv.end("k")
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight: dict[str, int] = {}
        self._gen: dict[str, int] = {}
        self._prefix_seq = 0
        self._prefixes: list[tuple[int, str]] = []
        # when too many prefix invalidations pile up while fetches stay in flight, they
        # collapse into "everything before this sequence number is stale" (bounded, safe)
        self._stale_before = 0

    def begin(self, key: str) -> tuple[int, int]:
        with self._lock:
            self._inflight[key] = self._inflight.get(key, 0) + 1
            return self._gen.get(key, 0), self._prefix_seq

    def end(self, key: str) -> None:
        with self._lock:
            n = self._inflight.get(key, 0) - 1
            if n > 0:
                self._inflight[key] = n
            else:
                self._inflight.pop(key, None)
                self._gen.pop(key, None)
            if not self._inflight:
                self._prefixes.clear()

    def bump(self, key: str) -> None:
        with self._lock:
            if key in self._inflight:
                self._gen[key] = self._gen.get(key, 0) + 1

    def bump_prefix(self, prefix: str) -> None:
        with self._lock:
            if self._inflight:
                self._prefix_seq += 1
                self._prefixes.append((self._prefix_seq, prefix))
                if len(self._prefixes) > 1000:
                    self._prefixes.clear()
                    self._stale_before = self._prefix_seq

    def unchanged(self, key: str, token: tuple[int, int], own: int = 0) -> bool:
        gen0, seq0 = token
        with self._lock:
            if self._gen.get(key, 0) != gen0 + own or seq0 < self._stale_before:
                return False
            return not any(seq > seq0 and key.startswith(p) for seq, p in self._prefixes)
