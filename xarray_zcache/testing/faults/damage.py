"""Damage to a disk-tier folder: bit flips, truncations and overwrites of its files."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import random
import sqlite3

from xarray_zcache.cache.disk.segments import record_length, segment_path

__all__ = [
    "DAMAGE_KINDS",
    "HEADER_PAD",
    "Span",
    "damage",
    "entry_spans",
    "flip_bit",
    "overwrite",
    "payload_files",
    "temp_files",
    "truncate_file",
]

#: Byte range of the 4 unused padding bytes of a payload header: a flip there changes nothing.
HEADER_PAD = range(36, 40)

#: What :func:`damage` can do: ``<target>-<how>``, target payload files and records of segment
#: files (the entries), ``index.db``, its WAL.
DAMAGE_KINDS = (
    "payload-bitflip",
    "payload-truncate",
    "payload-garbage",
    "index-bitflip",
    "index-overwrite",
    "index-truncate",
    "index-garbage",
    "index-delete",
    "wal-bitflip",
    "wal-truncate",
    "wal-overwrite",
    "wal-delete",
)


def payload_files(root: str | os.PathLike[str]) -> list[pathlib.Path]:
    """Payload files (not temp files) under a disk-tier folder."""
    base = pathlib.Path(root)
    return sorted(
        p
        for sub, ext in (("chunks", ".cache"), ("metadata", ".meta"))
        for p in (base / sub).glob(f"*/*{ext}")
        if not p.name.startswith(".")
    )


@dataclasses.dataclass(frozen=True)
class Span:
    """The bytes of one stored entry: the whole of ``path`` (a payload file), or ``length``
    bytes at ``start`` (a record in a segment file). ``name``: the key's SHA-256 (hex)."""

    path: pathlib.Path
    start: int
    length: int
    in_segment: bool
    name: str
    kind: str = "chunk"


def entry_spans(root: str | os.PathLike[str]) -> list[Span]:
    """Every stored entry: the payload files, and the records the index points to (none if
    the index cannot be read)."""
    spans = [
        Span(p, 0, p.stat().st_size, False, p.stem, "chunk" if p.suffix == ".cache" else "metadata")
        for p in payload_files(root)
    ]
    db = pathlib.Path(root) / "index.db"
    if not db.exists():
        return spans
    try:
        uri = db.absolute().as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
            found = conn.execute(
                "SELECT key, namespace, size, segment, offset, kind FROM entries "
                "WHERE segment IS NOT NULL ORDER BY segment, offset"
            ).fetchall()
    except sqlite3.Error:
        return spans
    for key, namespace, size, segment, offset, kind in found:
        key_bytes = key.encode("utf-8", "surrogatepass")
        length = record_length(key_bytes, namespace.encode("utf-8"), size)
        path = pathlib.Path(segment_path(os.fspath(root), segment))
        name = hashlib.sha256(key_bytes).hexdigest()
        spans.append(Span(path, offset, length, True, name, kind))
    return spans


def temp_files(root: str | os.PathLike[str]) -> list[pathlib.Path]:
    """Temp files (of writes not finished) under a disk-tier folder."""
    return sorted(pathlib.Path(root).glob("*/*/*.tmp"))


def flip_bit(path: str | os.PathLike[str], rng: random.Random, offset: int | None = None) -> int:
    """Flip one random bit of the file (at ``offset`` if given); returns the offset."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return -1
        pos = rng.randrange(size) if offset is None else offset
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return pos


def truncate_file(path: str | os.PathLike[str], rng: random.Random) -> int:
    """Truncate the file at a random length shorter than it; returns the new length."""
    size = os.path.getsize(path)
    new = rng.randrange(size) if size else 0
    os.truncate(path, new)
    return new


def overwrite(path: str | os.PathLike[str], rng: random.Random, nbytes: int = 512) -> int:
    """Overwrite ``nbytes`` random bytes at a random offset; returns the offset."""
    size = os.path.getsize(path)
    if size == 0:
        return -1
    pos = rng.randrange(size)
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(rng.randbytes(min(nbytes, size - pos)))
    return pos


def damage(kind: str, cache_dir: pathlib.Path, rng: random.Random) -> tuple[int, list[str]]:
    """Damage the folder as ``kind`` (one of :data:`DAMAGE_KINDS`) says.

    Returns the number of damaged files and the hashes (file stems) of damaged payload files.
    """
    if kind not in DAMAGE_KINDS:
        raise ValueError(f"kind must be one of {DAMAGE_KINDS}, got {kind!r}")
    target, _, how = kind.partition("-")
    if target == "payload":
        spans = entry_spans(cache_dir)
        chosen = rng.sample(spans, max(1, len(spans) // 4))
        for span in chosen:
            _damage_span(span, how, rng)
        return len(chosen), [span.name for span in chosen]
    path = cache_dir / ("index.db" if target == "index" else "index.db-wal")
    if not path.exists() or path.stat().st_size == 0:
        return 0, []
    if how == "bitflip":
        for _ in range(rng.randint(1, 8)):
            flip_bit(path, rng)
    elif how == "overwrite":
        overwrite(path, rng, 4096)
    elif how == "truncate":
        truncate_file(path, rng)
    elif how == "garbage":
        path.write_bytes(rng.randbytes(path.stat().st_size))
    elif how == "delete":
        path.unlink()
    return 1, []


def _damage_span(span: Span, how: str, rng: random.Random) -> None:
    """Bit flip (not in the header's padding), truncation or 64 bytes of garbage."""
    if not span.in_segment:
        if how == "bitflip":
            pos = flip_bit(span.path, rng)
            while pos in HEADER_PAD:  # a flip in the padding changes nothing: redo
                flip_bit(span.path, rng, pos)  # (undo)
                pos = flip_bit(span.path, rng)
        elif how == "truncate":
            truncate_file(span.path, rng)
        else:
            overwrite(span.path, rng, 64)
        return
    # a record: the same, within its bytes (a truncated record ends in zeros)
    rel = rng.randrange(span.length)
    if how == "bitflip":
        while rel in HEADER_PAD:
            rel = rng.randrange(span.length)
        flip_bit(span.path, rng, span.start + rel)
    else:
        n = span.length - rel if how == "truncate" else min(64, span.length - rel)
        data = bytes(n) if how == "truncate" else rng.randbytes(n)
        with open(span.path, "r+b") as f:
            f.seek(span.start + rel)
            f.write(data)
