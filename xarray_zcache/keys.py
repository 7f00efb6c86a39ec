"""The cache-key format: one module owns how zarr keys, byte ranges and stores become cache keys.

A cache key is ``"{namespace}/{escaped zarr key}"``, plus ``"\\x00{range}"`` for an entry
that holds one byte range of an object. The encoding is injective: zarr accepts any
character in a key (NUL included), so the characters the cache uses as separators
(``\\x00``, ``\\x01``) and the escape character (``%``) are percent-escaped in the key
part. No zarr key can then be read as a range of another key, as a negative entry
(``HybridCache`` appends ``"\\x00missing"``) or as a listing.

This module imports no zarr at import time (the scheduler uses `array_of` and
`key_kind`). Namespaces (which data a store reads) belong to `xarray_zcache.identity`.
"""

from __future__ import annotations

import functools
import posixpath
from typing import TYPE_CHECKING

from xarray_zcache.cache.request import PART_SEP

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest

__all__ = [
    "LIST_SEP",
    "METADATA_NAMES",
    "RANGE_SEP",
    "array_of",
    "byte_request",
    "check_byte_range",
    "cut",
    "digest_key",
    "entry_key",
    "escape",
    "file_key",
    "is_plain_range",
    "key_kind",
    "listing_key",
    "parse_entry_key",
    "range_key",
    "tree_metadata",
    "unescape",
]

METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})
# separates a key from the byte range of a ranged entry; escaped inside keys
RANGE_SEP = PART_SEP
# separates the parts of a listing entry's key; escaped inside keys
LIST_SEP = "\x01"

_ESCAPES = str.maketrans({"%": "%25", "\x00": "%00", "\x01": "%01", "\x02": "%02"})
# prefix of the per-document digests of array metadata (see `digest_key`); escaped in keys
DIGEST_SEP = "\x02"


def escape(key: str) -> str:
    """``key`` with ``%``, NUL and ``\\x01`` percent-escaped (identity for ordinary keys)."""
    if "%" in key or "\x00" in key or "\x01" in key or "\x02" in key:
        return key.translate(_ESCAPES)
    return key


def unescape(part: str) -> str:
    """Inverse of `escape`."""
    if "%" not in part:
        return part
    return (
        part.replace("%02", "\x02")
        .replace("%01", "\x01")
        .replace("%00", "\x00")
        .replace("%25", "%")
    )


def key_kind(key: str) -> str:
    """``"metadata"`` for zarr metadata documents, ``"chunk"`` for everything else."""
    return "metadata" if key.rpartition("/")[2] in METADATA_NAMES else "chunk"


def file_key(key: str) -> str:
    """The object a key names in a store of files (`LocalStore`): ``a/../b`` is ``b``.

    Object stores take keys literally; a file system resolves ``.``, ``..`` and
    repeated slashes, so two keys may name one file there and must share an entry.
    """
    if "/." in key or key.startswith(".") or "//" in key or key.endswith("/"):
        return posixpath.normpath(key).lstrip("/")
    return key


def entry_key(namespace: str, key: str) -> str:
    """The cache key of the whole object ``key`` of the store named ``namespace``."""
    return f"{namespace}/{escape(key)}"


@functools.cache
def _byte_requests() -> tuple[type, ...]:
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    return (RangeByteRequest, OffsetByteRequest, SuffixByteRequest)


def check_byte_range(byte_range: object) -> None:
    """Raise `TypeError` (as zarr's stores do) if ``byte_range`` is no `ByteRequest`."""
    if byte_range is not None and not isinstance(byte_range, _byte_requests()):
        raise TypeError(f"Unexpected byte_range, got {byte_range}.")


def is_plain_range(byte_range: ByteRequest | None) -> bool:
    """Whether ``byte_range`` is one the cache serves: a non-empty, well-formed range.

    Odd requests (an empty or reversed range, a negative offset, a zero suffix)
    are answered differently by different stores (an error, ``b""``, the whole
    object): the cache passes them to the wrapped store and caches nothing, so
    that the answer is always the wrapped store's own.
    """
    if byte_range is None:
        return True
    if hasattr(byte_range, "end"):
        return 0 <= byte_range.start < byte_range.end  # type: ignore[union-attr]
    if hasattr(byte_range, "offset"):
        return byte_range.offset >= 0  # type: ignore[union-attr]
    return byte_range.suffix > 0  # type: ignore[union-attr]


def range_key(ck: str, byte_range: ByteRequest) -> str:
    """The cache key of the entry holding ``byte_range`` of the object cached as ``ck``."""
    if hasattr(byte_range, "end"):
        return f"{ck}{RANGE_SEP}r{byte_range.start}-{byte_range.end}"  # type: ignore[union-attr]
    if hasattr(byte_range, "offset"):
        return f"{ck}{RANGE_SEP}o{byte_range.offset}"  # type: ignore[union-attr]
    return f"{ck}{RANGE_SEP}s{byte_range.suffix}"  # type: ignore[union-attr]


def cut(byte_range: ByteRequest, whole: bytes) -> bytes | None:
    """``byte_range`` of the whole object ``whole``, or ``None`` if it is not inside it.

    Only ranges that lie within the object are cut from it (a store may answer a
    range past the end with an error or a short read): the others are read from
    the wrapped store, so a hit answers exactly as the wrapped store would.
    """
    n = len(whole)
    if hasattr(byte_range, "end"):
        start, end = byte_range.start, byte_range.end  # type: ignore[union-attr]
        return whole[start:end] if end <= n else None
    if hasattr(byte_range, "offset"):
        offset = byte_range.offset  # type: ignore[union-attr]
        return whole[offset:] if offset < n else None
    suffix = byte_range.suffix  # type: ignore[union-attr]
    return whole[n - suffix :] if suffix <= n else None


def parse_entry_key(namespace: str, ck: str) -> tuple[str, tuple[str, int, int]] | None:
    """Inverse of `entry_key` (+ `range_key`): ``(zarr key, range)`` or ``None``.

    ``range`` is ``("", 0, 0)`` for a whole object, ``("r", start, end)``,
    ``("o", offset, 0)`` or ``("s", suffix, 0)``; see `byte_request`.
    """
    if not ck.startswith(namespace + "/"):
        return None
    body, sep, spec = ck[len(namespace) + 1 :].partition(RANGE_SEP)
    if not sep:
        return unescape(body), ("", 0, 0)
    try:
        if spec[:1] == "r":
            a, b = spec[1:].split("-", 1)
            return unescape(body), ("r", int(a), int(b))
        if spec[:1] in ("o", "s"):
            return unescape(body), (spec[0], int(spec[1:]), 0)
    except ValueError:
        return None
    return None


def byte_request(spec: tuple[str, int, int]) -> ByteRequest | None:
    """The zarr `ByteRequest` of a range from `parse_entry_key`."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    kind, a, b = spec
    if kind == "r":
        return RangeByteRequest(a, b)
    if kind == "o":
        return OffsetByteRequest(a)
    if kind == "s":
        return SuffixByteRequest(a)
    return None


def digest_key(namespace: str, key: str) -> str:
    """Where the digest of the metadata document ``key`` last read from the store is kept.

    Not under the array's prefix (invalidating the array keeps it) and not a part
    of the document's entry (expiring the document keeps it).
    """
    return f"{namespace}/{DIGEST_SEP}v/{escape(key)}"


def tree_metadata(key: str, data: bytes | None) -> str | None:
    """The prefix whose entries a change of metadata document ``key`` makes stale, or None.

    An array's ``zarr.json`` / ``.zarray`` (shape, chunk grid, codecs, fill value
    decide what its chunk bytes mean): the array's folder. A group document with
    consolidated metadata (it describes the arrays below it): the group's folder.
    Other documents (attributes, plain groups): None.
    """
    import json

    head, _, name = key.rpartition("/")
    prefix = f"{head}/" if head else ""
    if name == ".zarray" or name == ".zmetadata":
        return prefix
    if name != "zarr.json":
        return None
    if data is None:
        return prefix  # the node is gone
    try:
        doc = json.loads(data)
    except ValueError:
        return prefix
    if not isinstance(doc, dict):
        return prefix
    if doc.get("node_type") == "array" or doc.get("consolidated_metadata"):
        return prefix
    return None


def listing_key(namespace: str, op: str, prefix: str) -> str:
    """The cache key of a listing (``op`` is ``list``, ``prefix`` or ``dir``)."""
    return f"{namespace}/{LIST_SEP}{op}{LIST_SEP}{escape(prefix)}"


def array_of(cache_key: str) -> str:
    """The zarr array a cache key belongs to: its path without the chunk-grid part."""
    head = cache_key.split(RANGE_SEP, 1)[0]
    if "/c/" in head:  # zarr v3 default chunk key encoding
        return head.rsplit("/c/", 1)[0]
    return posixpath.dirname(head)
