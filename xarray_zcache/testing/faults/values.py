"""Self-describing values: a read can tell a right value from a torn one or another key's.

Every value is one 16-byte unit (key tag, version, number of units, CRC) repeated, so a read
(whole or a slice) can be checked without knowing which version was written last.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

from zarr.core.buffer import Buffer, cpu

__all__ = [
    "UNIT",
    "buf",
    "check_slice",
    "check_value",
    "key_tag",
    "make_value",
    "parse_unit",
    "stress_value",
]

UNIT = 16
_UNIT = struct.Struct("<6sIHI")  # key tag, version, number of units, crc32 of the first 12 bytes


def key_tag(key: str) -> bytes:
    """Six bytes naming ``key`` in its values."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:6]


def make_value(key: str, version: int, nunits: int | None = None) -> bytes:
    """A value naming ``key`` and ``version``: one 16-byte unit repeated ``nunits`` times."""
    if nunits is None:
        nunits = 4 + (version * 7919) % 200
    head = key_tag(key) + struct.pack("<IH", version & 0xFFFFFFFF, nunits)
    unit = head + struct.pack("<I", zlib.crc32(head))
    return unit * nunits


def stress_value(key: str, version: int) -> bytes:
    """A value of ``key`` of 4 to 1,503 units (the concurrency scenario's sizes)."""
    return make_value(key, version, 4 + (version * 7919) % 1500)


def parse_unit(key: str, unit: bytes) -> tuple[int, int] | None:
    """``(version, nunits)`` if ``unit`` is a valid unit of a value of ``key``, else None."""
    if len(unit) != UNIT:
        return None
    tag, version, nunits, crc = _UNIT.unpack(unit)
    if tag != key_tag(key) or zlib.crc32(unit[:12]) != crc or nunits == 0:
        return None
    return int(version), int(nunits)


def check_value(key: str, data: bytes | None) -> int | None:
    """The version if ``data`` is exactly a value of ``key`` (never torn), else None."""
    if not data:
        return None
    parsed = parse_unit(key, data[:UNIT])
    if parsed is None:
        return None
    version, nunits = parsed
    return version if data == data[:UNIT] * nunits else None


def check_slice(key: str, data: bytes, start: int, stop: int | None) -> bool:
    """Whether ``data`` is ``make_value(key, v)[start:stop]`` for some version ``v``.

    ``start`` must be a multiple of 16 and smaller than every value's length (>= 64 bytes).
    """
    if start % UNIT:
        raise ValueError(f"start must be a multiple of {UNIT}, got {start}")
    parsed = parse_unit(key, data[:UNIT])
    if parsed is None:
        return False
    version, nunits = parsed
    return data == make_value(key, version, nunits)[start:stop]


def buf(data: bytes) -> Buffer:
    """``data`` as a zarr CPU buffer."""
    return cpu.Buffer.from_bytes(data)
