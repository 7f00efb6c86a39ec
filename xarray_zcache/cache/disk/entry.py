"""Records passed between the parts of the disk tier instead of long argument lists."""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from typing import NamedTuple

from xarray_zcache.cache.disk.format import KINDS, digest, pack_header, payload_path, temp_path
from xarray_zcache.cache.disk.segments import SEGMENT_THRESHOLD, segment_path


@dataclasses.dataclass(frozen=True, slots=True)
class DiskEntry:
    """A verified entry read from the disk tier (see ``DiskTier.get_entry``)."""

    value: bytes
    kind: str
    #: absolute expiry (seconds since the epoch); None: never expires
    expires: float | None
    namespace: str


@dataclasses.dataclass(slots=True)
class PutRequest:
    """One ``put``: what goes in the index row and where the payload goes (changed only by
    :meth:`at`, once its record is appended)."""

    key: str
    namespace: str
    kind: str
    size: int
    checksum: int
    expires: float | None
    #: ``time.time_ns()`` when the value was fetched; None: an authoritative write
    fetch_started_ns: int | None
    #: ``time.time_ns()`` of the ``put`` (the tombstone time of an authoritative write)
    write_ns: int
    hexdigest: str
    root: str
    #: the temp file of the payload ("" for a ``small`` entry: it has none)
    temp: str
    #: file header (fixed part, key, namespace); the payload follows it
    header: bytes
    #: random; the row carries it between the two transactions of ``put`` (see writes.py)
    token: int
    #: whether the entry goes to a segment (:mod:`.segments`) rather than a file of its own
    small: bool = False
    #: where its record was appended (``small`` entries, once appended; see :meth:`at`)
    segment: str | None = None
    offset: int | None = None
    #: the full path of ``segment`` (checked to exist when the row is committed)
    segment_file: str | None = None

    @property
    def final(self) -> str:
        """Where the payload file goes (a large entry)."""
        return payload_path(self.root, self.hexdigest, self.kind)

    @property
    def paths(self) -> tuple[str, ...]:
        """The key's payload paths of every kind (``final`` among them)."""
        return tuple(payload_path(self.root, self.hexdigest, k) for k in KINDS)

    def at(self, segment: str, offset: int) -> PutRequest:
        """This request, its record appended at ``offset`` of ``segment``."""
        self.segment, self.offset = segment, offset
        self.segment_file = segment_path(self.root, segment)
        return self

    @classmethod
    def build(
        cls,
        root: str,
        key: str,
        value: bytes | memoryview,
        *,
        namespace: str,
        kind: str,
        expires: float | None,
        fetch_started_ns: int | None,
        write_ns: int,
        small_limit: int = SEGMENT_THRESHOLD,
    ) -> PutRequest:
        """The request for ``value`` (key and namespace must be encodable as UTF-8)."""
        key_bytes = key.encode("utf-8")
        key_digest = digest(key)
        hexdigest = key_digest.hex()
        size = memoryview(value).nbytes
        checksum = zlib.crc32(value)
        expiry = math.inf if expires is None else float(expires)
        header = pack_header(
            key_bytes, namespace.encode("utf-8"), size, checksum, expiry, key_digest
        )
        small = size <= small_limit
        return cls(
            key=key,
            namespace=namespace,
            kind=kind,
            size=size,
            checksum=checksum,
            expires=expires,
            fetch_started_ns=fetch_started_ns,
            write_ns=write_ns,
            hexdigest=hexdigest,
            root=root,
            temp="" if small else temp_path(payload_path(root, hexdigest, kind), hexdigest),
            header=header,
            token=int.from_bytes(os.urandom(8), "little") >> 2,
            small=small,
        )


class Fill(NamedTuple):
    """One ``put`` of ``DiskTier.put_many``: the arguments of ``DiskTier.put``."""

    key: str
    value: bytes
    namespace: str = ""
    kind: str = "chunk"
    expires: float | None = None
    fetch_started_ns: int | None = None
