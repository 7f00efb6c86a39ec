"""The decoded tier: a bytes-bounded LRU of read-only NumPy arrays, above the byte tiers.

Generic: it maps a key (an encoded entry's cache key, or that key and a suffix) to a
*token* and an array; it knows nothing of zarr or codecs (`xarray_zcache.decoded_reads`
decodes). The token is the encoded ``bytes`` the array was decoded from, and the rule
that makes a hit exact is the caller's: `get` returns the array only when the caller
hands it the bytes the byte tiers serve for that key *now* (through their own
freshness path) and they are the very same object or equal byte for byte, and the
same decoding *spec* (a string naming the dtype, chunk shape and codecs the array was
decoded with: an array rewritten as float32 over the very same chunk bytes as its old
int32 must not be served the int32 array). Equal encoded bytes decoded the same way
give equal arrays, so a hit is always what decoding would give.

Entries pin the encoded bytes they were decoded from: the cost of an entry is the
array's ``nbytes`` plus the length of its token plus a fixed overhead (the bytes are
counted even while the memory tier shares the same object: an upper bound, never an
under-count). Invalidations of the byte tiers drop the matching entries too (`drop`),
though a stale entry could never be served anyway (its token would differ).

Thread-safe: one lock around the table and the counters.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["ENTRY_OVERHEAD", "DecodedTier"]

#: bytes charged per entry besides the array and its token (the table's own objects)
ENTRY_OVERHEAD = 400


class DecodedTier:
    """An LRU of ``key -> (token, array)`` holding at most ``capacity`` bytes (0: off).

    Examples
    --------
    >>> tier = DecodedTier(10_000)
    >>> raw = b"encoded"
    >>> tier.put("ns/t/c/0", raw, np.arange(4))
    True
    >>> tier.get("ns/t/c/0", raw).tolist(), tier.get("ns/t/c/0", b"other") is None
    ([0, 1, 2, 3], True)
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._table: OrderedDict[str, tuple[bytes, np.ndarray[Any, Any], int, str]] = OrderedDict()
        self._used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def used_bytes(self) -> int:
        """Bytes charged for the entries held (arrays, their tokens, overheads)."""
        return self._used

    def get(self, key: str, token: bytes, spec: str = "") -> np.ndarray[Any, Any] | None:
        """The array of ``key`` if it was decoded from bytes equal to ``token`` with the
        decoding ``spec`` (the array's dtype, chunk shape and codecs: equal bytes of
        another array's metadata decode differently); counts a hit or a miss. An entry
        whose token or spec differs is dropped (it can never hit)."""
        with self._lock:
            entry = self._table.get(key)
            if entry is not None:
                held, array, cost, how = entry
                if (held is token or held == token) and (how is spec or how == spec):
                    self._table.move_to_end(key)
                    if held is not token:  # share the object the byte tiers hold now
                        self._table[key] = (token, array, cost, how)
                    self.hits += 1
                    return array
                self._remove(key)
            self.misses += 1
            return None

    def get_many(
        self, keys: list[str], tokens: list[bytes | None], spec: str = ""
    ) -> list[np.ndarray[Any, Any] | None]:
        """`get` of each key with its token (in order) under one acquisition of the lock;
        a None token (no bytes: a missing or unanswered chunk) is neither looked up nor
        counted."""
        out: list[np.ndarray[Any, Any] | None] = []
        table = self._table
        hits = asked = 0
        with self._lock:
            for key, token in zip(keys, tokens, strict=True):
                if token is None:
                    out.append(None)
                    continue
                asked += 1
                entry = table.get(key)
                if entry is not None:
                    held, array, cost, how = entry
                    if (held is token or held == token) and (how is spec or how == spec):
                        table.move_to_end(key)
                        if held is not token:  # share the object the byte tiers hold now
                            table[key] = (token, array, cost, how)
                        hits += 1
                        out.append(array)
                        continue
                    self._remove(key)
                out.append(None)
            self.hits += hits
            self.misses += asked - hits
        return out

    def put(self, key: str, token: bytes, array: np.ndarray[Any, Any], spec: str = "") -> bool:
        """Hold ``array`` (made read-only) for ``key``, decoded from ``token`` with the
        decoding ``spec`` (see `get`); False if it does not fit at all. Evicts the least
        recently used entries to make room."""
        cost = int(array.nbytes) + len(token) + ENTRY_OVERHEAD
        if cost > self.capacity:
            return False
        array.flags.writeable = False
        with self._lock:
            if key in self._table:
                self._remove(key)
            while self._table and self._used + cost > self.capacity:
                self._remove(next(iter(self._table)))
                self.evictions += 1
            self._table[key] = (token, array, cost, spec)
            self._used += cost
        return True

    def drop(self, key: str, *, prefix: bool = False) -> int:
        """Drop ``key`` (or every key starting with it); the number dropped."""
        with self._lock:
            if not self._table:
                return 0
            if not prefix:
                if key not in self._table:
                    return 0
                self._remove(key)
                return 1
            gone = [k for k in self._table if k.startswith(key)]
            for k in gone:
                self._remove(k)
            return len(gone)

    def clear(self) -> None:
        with self._lock:
            self._table.clear()
            self._used = 0

    def _remove(self, key: str) -> None:
        _, _, cost, _ = self._table.pop(key)
        self._used -= cost
