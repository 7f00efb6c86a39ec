"""`Read`: what a caller asks of the cache, and how a miss is loaded."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["PART_SEP", "PRIVATE_PREFIX", "Read", "is_private"]

# a part of an object (a byte range, a negative entry) is cached under
# ``object key + PART_SEP + ...``: invalidating ``key`` and the prefix ``key + PART_SEP``
# drops the object with all its parts. Callers keep PART_SEP out of object keys.
PART_SEP = "\x00"

#: keys under this prefix are private to this process (memory only): never written to
#: disk, never asked of or served to peers. Stores whose data has no name that other
#: processes could share (an in-memory store, an Icechunk writable session) use it.
PRIVATE_PREFIX = "private:"


def is_private(key: str) -> bool:
    """Whether ``key`` is private to this process (see `PRIVATE_PREFIX`)."""
    return key.startswith(PRIVATE_PREFIX)


@dataclasses.dataclass(frozen=True, slots=True)
class Read:
    """One read through `HybridCache.get_or_load`.

    Parameters
    ----------
    key
        The cache key of the entry that holds the answer.
    kind
        ``"metadata"`` or ``"chunk"``: selects the TTL and the stats bucket.
    namespace
        Recorded with the entry on disk (bulk operations and statistics).
    whole
        For a part of an object (a byte range): the cache key of the whole object,
        which serves the read when cached and ``cut`` accepts it.
    cut
        ``whole bytes -> part`` or ``None`` when the part cannot be cut from them
        (then the part's own entry, or the loader, answers).
    prefetch
        A read-ahead: its load is a request sent (a miss) but no reader waits, so
        it does not count as an access; a later hit on what it filled counts as a
        prefetch hit, not as a request saved.
    recheck
        Do not trust negative entries ("missing"): ask the source again (an open
        that failed on a remembered miss is tried once more this way).
    for_peer
        A read on behalf of another cache of the cluster (this cache owns the key):
        never asks the shared tiers again (no loops between peers), and counts as
        served to a peer, not as a reader's hit.
    """

    key: str
    kind: str
    namespace: str = ""
    whole: str | None = None
    cut: Callable[[bytes], bytes | None] | None = None
    prefetch: bool = False
    for_peer: bool = False
    recheck: bool = False

    @property
    def object_key(self) -> str:
        """The key of the object the read is part of (negative entries are per object)."""
        return self.whole if self.whole is not None else self.key
