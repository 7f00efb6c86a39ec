"""What a validation is about: a `Unit` (the objects one listing of the source
validates), the `Listing` it sent (what it found), and the `Tally` of its requests."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from xarray_zcache.cache.request import PART_SEP

__all__ = ["AsyncListing", "Listing", "SyncListing", "Tally", "Unit"]


class Listing(NamedTuple):
    """What a validation's listing of the source found."""

    #: {object cache key: version} of the objects listed
    versions: dict[str, str]
    #: requests sent
    requests: int
    #: cache-key prefixes the listing covered (None: the whole unit); cached objects
    #: outside them are neither compared nor dropped
    covers: tuple[str, ...] | None = None


class Tally:
    """The listing requests one validation has sent so far (counted even when the
    validation fails or is cancelled half-way)."""

    __slots__ = ("requests",)

    def __init__(self) -> None:
        self.requests = 0


#: a validation's listing: sends its requests (adding them to the tally as it goes)
AsyncListing = Callable[[Tally], Awaitable[Listing]]
SyncListing = Callable[[Tally], Listing]


class Unit:
    """A group of objects validated by one listing: every object under ``prefix``
    (cache keys), or with ``recursive=False`` only those directly under it.

    ``starts``: the listing is narrowed to names starting with it (a unit of one object,
    the target file of a reference, has its key as ``prefix``).

    A store makes its own units when it first reads them (``since``); with an interval
    of 0 a unit is fresh for the rest of its store's life once a validation that started
    after ``since`` has ended (``until``: validation once per open)."""

    __slots__ = ("name", "prefix", "recursive", "since", "starts", "until")

    def __init__(self, prefix: str, recursive: bool, starts: str = "") -> None:
        self.prefix = prefix
        self.recursive = recursive
        self.starts = starts
        self.name = ("R" if recursive else "D") + prefix
        self.since = time.time()
        self.until = 0.0

    def holds(self, key: str) -> bool:
        if not key.startswith(self.prefix):
            return False
        rest = key[len(self.prefix) :]
        if "\x01" in rest or "\x02" in rest:  # listings, digests: not objects
            return False
        return self.recursive or "/" not in rest.split(PART_SEP, 1)[0]

    def __repr__(self) -> str:
        return f"Unit({self.prefix!r}, recursive={self.recursive})"
