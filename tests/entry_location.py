"""Where a disk-tier entry lives, for tests that damage, truncate or remove it.

An entry is either a payload file of its own (``chunks/<hh>/<hash>.cache``) or a record in a
segment file (``segments/<name>.seg`` at an offset): :func:`locate` finds it from the index
row and returns a :class:`Where` whose bytes read and write the same way for both, so that an
adversarial test asserts the same thing whichever way the entry is stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import sqlite3

from xarray_zcache.cache.disk import DiskTier
from xarray_zcache.cache.disk.format import payload_path
from xarray_zcache.cache.disk.segments import record_length, segment_path


@dataclasses.dataclass(frozen=True)
class Where:
    """The bytes of one entry: the whole of ``path`` (a file), or ``length`` bytes of it at
    ``start`` (a record in a segment)."""

    path: pathlib.Path
    start: int
    length: int
    in_segment: bool

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> bytes:
        """The entry's bytes: header, key, namespace, payload."""
        if not self.in_segment:
            return self.path.read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read(self.length)

    def write(self, data: bytes) -> None:
        """Replace the entry's bytes by ``data``. Shorter data is a truncation: for a record
        the bytes after it (up to the record's end) are zeroed, as a truncated file ends."""
        if not self.in_segment:
            self.path.write_bytes(data)
            return
        if len(data) > self.length:
            raise ValueError("a record cannot grow in place")
        with open(self.path, "r+b") as f:
            f.seek(self.start)
            f.write(data + bytes(self.length - len(data)))

    def truncate(self, size: int) -> None:
        self.write(self.read()[:size])

    def remove(self) -> None:
        """The entry's bytes gone: its file unlinked, or its record zeroed."""
        if not self.in_segment:
            self.path.unlink()
        else:
            self.write(b"")


def _root(where: DiskTier | pathlib.Path | str) -> pathlib.Path:
    return where.path if isinstance(where, DiskTier) else pathlib.Path(where)


def locate(where: DiskTier | pathlib.Path | str, key: str) -> Where:
    """Where the entry of ``key`` lives in the cache folder ``where`` (a tier or its path).

    Raises KeyError if the index has no row for ``key``.
    """
    root = _root(where)
    uri = (root / "index.db").absolute().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
        row = conn.execute(
            "SELECT kind, size, namespace, segment, offset FROM entries WHERE key = ?", (key,)
        ).fetchone()
    if row is None:
        raise KeyError(key)
    kind, size, namespace, segment, offset = row
    if segment is None:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        path = pathlib.Path(payload_path(str(root), digest, kind))
        return Where(path, 0, path.stat().st_size if path.exists() else 0, False)
    length = record_length(key.encode(), namespace.encode(), size)
    return Where(pathlib.Path(segment_path(str(root), segment)), offset, length, True)


def stored_bytes(where: DiskTier | pathlib.Path | str) -> int:
    """Bytes of every payload file and segment file of the folder (not the index)."""
    root = _root(where)
    return sum(
        p.stat().st_size
        for sub in ("chunks", "metadata", "segments")
        for p in (root / sub).rglob("*")
        if p.is_file()
    )


def all_entries(where: DiskTier | pathlib.Path | str) -> list[str]:
    """Keys with a row, for tests that damage every entry."""
    uri = (_root(where) / "index.db").absolute().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
        return [k for (k,) in conn.execute("SELECT key FROM entries ORDER BY key")]


__all__ = ["Where", "all_entries", "locate", "os", "stored_bytes"]
