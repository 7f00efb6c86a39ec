"""The hint file: a location map (:mod:`.keydir`) written at close, read at the next open.

Layout of ``<folder>/index.keydir`` (no pickle)::

    magic (16 bytes) | header length (4, little-endian) | CRC-32 of the rest (4) |
    header (JSON: format, epoch, seq, count, segment names) | the arrays, one after another

The arrays are raw little-endian NumPy data, sorted by key hash: hashes (uint64), kinds
(uint8), segments (int32, -1: a payload file), offsets (int64), lengths (uint32). Anything
that does not check out (magic, sizes, CRC, order, ranges, segment names) makes the file
unused: the map is then built from the index, never from a doubtful hint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from xarray_zcache.cache.disk.format import KINDS
from xarray_zcache.cache.disk.segments import is_segment_name

HINT_NAME: Final = "index.keydir"
_MAGIC: Final = b"zcache-keydir\x00\x00\x01"
_PREFIX: Final = struct.Struct("<II")
_FORMAT: Final = 1
#: Codes a kind may hold: one per kind, and 255 (the map cannot place the entry).
_ASK: Final = 255
_MAX_HEADER: Final = 64 << 20
_DTYPES: Final = (
    ("hashes", np.dtype("<u8")),
    ("kinds", np.dtype("u1")),
    ("segments", np.dtype("<i4")),
    ("offsets", np.dtype("<i8")),
    ("lengths", np.dtype("<u4")),
)
#: Bytes per entry in memory and on disk.
ENTRY_BYTES: Final = sum(dtype.itemsize for _, dtype in _DTYPES)


@dataclasses.dataclass(frozen=True, slots=True)
class Arrays:
    """The map's arrays, sorted by hash; a hash held twice (two keys whose hashes collide)
    has every copy marked "ask"."""

    hashes: np.ndarray
    kinds: np.ndarray
    segments: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray

    @classmethod
    def empty(cls) -> Arrays:
        return cls(*(np.empty(0, dtype) for _, dtype in _DTYPES))

    @classmethod
    def build(
        cls,
        hashes: Sequence[int],
        kinds: Sequence[int],
        segments: Sequence[int],
        offsets: Sequence[int],
        lengths: Sequence[int],
    ) -> Arrays:
        wide = np.asarray(lengths, dtype=np.int64)
        codes = np.asarray(kinds, dtype=np.uint8)
        too_long = wide > np.iinfo(np.uint32).max
        if too_long.any():
            codes[too_long] = _ASK
            wide[too_long] = 0
        return cls(
            np.asarray(hashes, dtype=np.uint64),
            codes,
            np.asarray(segments, dtype=np.int32),
            np.asarray(offsets, dtype=np.int64),
            wide.astype(np.uint32),
        ).sorted()

    def take(self, which: np.ndarray) -> Arrays:
        return Arrays(*(getattr(self, name)[which] for name, _ in _DTYPES))

    def without(self, hashes: np.ndarray) -> Arrays:
        """These arrays less every entry whose hash is in ``hashes`` (O(m log n), where
        ``np.isin`` would sort both)."""
        h = self.hashes
        if not len(h) or not len(hashes):
            return self
        left, right = h.searchsorted(hashes, "left"), h.searchsorted(hashes, "right")
        keep = np.ones(len(h), dtype=bool)
        one = right - left == 1
        keep[left[one]] = False
        for lo, hi in zip(left[right - left > 1], right[right - left > 1], strict=True):
            keep[lo:hi] = False  # a hash held twice (collision): every copy goes
        return self.take(keep)

    def merged(self, other: Arrays) -> Arrays:
        """Both sorted arrays as one (inserting ``other``'s entries where they belong)."""
        at = self.hashes.searchsorted(other.hashes)
        return Arrays(
            *(np.insert(getattr(self, name), at, getattr(other, name)) for name, _ in _DTYPES)
        )._marked()

    def sorted(self) -> Arrays:
        return self.take(np.argsort(self.hashes, kind="stable"))._marked()

    def _marked(self) -> Arrays:
        """Mark every copy of a hash held twice "ask" (sorted arrays)."""
        h = self.hashes
        if len(h) > 1:
            same = h[1:] == h[:-1]
            if same.any():
                kinds = self.kinds.copy()
                kinds[1:][same] = _ASK
                kinds[:-1][same] = _ASK
                return dataclasses.replace(self, kinds=kinds)
        return self

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(self, name).nbytes) for name, _ in _DTYPES)


@dataclasses.dataclass(frozen=True, slots=True)
class Hint:
    """A map as of change ``seq`` of the index whose change log has ``epoch``."""

    epoch: str
    seq: int
    #: a digest of change ``seq`` as the log held it, or None: what proves, at the next
    #: open, that the index has not gone back to an older state since (and gone on)
    last: str | None
    segments: list[str]
    arrays: Arrays


def hint_path(root: str) -> str:
    return os.path.join(root, HINT_NAME)


def write(root: str, hint: Hint) -> bool:
    """Write ``hint`` atomically (a temp file renamed over the old one, mode 0600); whether
    it did. Best effort: an error leaves the old file or none (the next open then builds
    the map)."""
    a = hint.arrays
    header = json.dumps(
        {
            "format": _FORMAT,
            "epoch": hint.epoch,
            "seq": hint.seq,
            "last": hint.last,
            "count": len(a.hashes),
            "segments": hint.segments,
            "kinds": list(KINDS),
        }
    ).encode()
    body: list[bytes | memoryview] = [header]
    body += [memoryview(np.ascontiguousarray(getattr(a, name), dtype)) for name, dtype in _DTYPES]
    crc = 0
    for part in body:
        crc = zlib.crc32(part, crc)
    final = hint_path(root)
    temp = f"{final}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(_MAGIC + _PREFIX.pack(len(header), crc))
                for part in body:
                    f.write(part)
        finally:
            os.close(fd)
        os.replace(temp, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        return False
    return True


def read(root: str) -> Hint | None:
    """The hint of ``root``, or None if there is none or it does not check out."""
    try:
        with open(hint_path(root), "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return _parse(data)
    except (ValueError, TypeError, KeyError, json.JSONDecodeError, struct.error):
        return None


def _parse(data: bytes) -> Hint | None:
    start = len(_MAGIC) + _PREFIX.size
    if not data.startswith(_MAGIC) or len(data) < start:
        return None
    size, crc = _PREFIX.unpack_from(data, len(_MAGIC))
    if size > _MAX_HEADER or zlib.crc32(memoryview(data)[start:]) != crc:
        return None
    header: dict[str, Any] = json.loads(data[start : start + size])
    count, names = header["count"], header["segments"]
    if (
        header["format"] != _FORMAT
        or header["kinds"] != list(KINDS)
        or not isinstance(header["epoch"], str)
        or not isinstance(header["seq"], int)
        or not isinstance(count, int)
        or count < 0
        or not isinstance(names, list)
        or not all(isinstance(n, str) and is_segment_name(n) for n in names)
        or len(data) != start + size + count * ENTRY_BYTES
    ):
        return None
    pos = start + size
    parts = []
    for _name, dtype in _DTYPES:
        parts.append(np.frombuffer(data, dtype, count, pos).copy())  # aligned, writable
        pos += count * dtype.itemsize
    arrays = Arrays(*parts)
    h, kinds, segments = arrays.hashes, arrays.kinds, arrays.segments
    if (
        (count > 1 and bool((h[1:] < h[:-1]).any()))
        or bool(((kinds >= len(KINDS)) & (kinds != _ASK)).any())
        or bool(((segments < -1) | (segments >= len(names))).any())
        or bool((arrays.offsets < 0).any())
    ):
        return None
    last = header["last"]
    if last is not None and not isinstance(last, str):
        return None
    return Hint(header["epoch"], header["seq"], last, names, arrays)
