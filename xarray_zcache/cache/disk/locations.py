"""What the location map (:mod:`.keydir`) answers, without NumPy (which it loads): the read
path imports this alone."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Final

#: The map cannot answer for the key: ask the index.
ASK: Final = "ask"
#: The index holds no row for the key.
ABSENT: Final = "absent"
#: Keys holding this character (parts of an object: byte ranges, negative entries, which
#: the cache invalidates by the prefix ``key + UNMAPPED``) are never in the map: a prefix
#: ending with it drops them without the map having to follow.
UNMAPPED: Final = "\x00"
#: ``changes.kind`` of an entry logged by hand, not by a trigger: every key under
#: ``changes.key`` was invalidated (a prefix, a namespace); a map cannot follow it by key
#: and is built again.
PREFIX_CHANGE: Final = "prefix"


def mapped(key: str) -> bool:
    """Whether the location map may hold ``key`` (:data:`UNMAPPED`)."""
    return UNMAPPED not in key


@dataclasses.dataclass(frozen=True, slots=True)
class Location:
    """Where an entry's bytes are: a record (``segment``, ``offset``, ``length``: the whole
    record) or, with ``segment`` None, the payload file of ``kind``."""

    kind: str
    segment: str | None
    offset: int
    length: int


#: A change the map holds in its dict until folded into its arrays: ``(kind, segment,
#: offset, length)`` of a :class:`Location`, as a plain tuple of atoms (which the garbage
#: collector stops tracking: a dict of a hundred thousand of them costs a full collection
#: nothing, where as many objects made every collection of the process walk them), or
#: :data:`ABSENT`, or :data:`ASK`.
Change = tuple[str, str | None, int, int] | str


def change_of(loc: Location | str) -> Change:
    return loc if isinstance(loc, str) else (loc.kind, loc.segment, loc.offset, loc.length)


def key_hash(digest: bytes) -> int:
    """The map's key: the first 8 bytes of the key's SHA-256 ``digest``."""
    return int.from_bytes(digest[:8], "little")


def hash_of(key: str) -> int:
    return key_hash(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest())
