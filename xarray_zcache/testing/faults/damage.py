"""Damage to a disk-tier folder: bit flips, truncations and overwrites of its files."""

from __future__ import annotations

import os
import pathlib
import random

__all__ = [
    "DAMAGE_KINDS",
    "HEADER_PAD",
    "damage",
    "flip_bit",
    "overwrite",
    "payload_files",
    "temp_files",
    "truncate_file",
]

#: Byte range of the 4 unused padding bytes of a payload header: a flip there changes nothing.
HEADER_PAD = range(36, 40)

#: What :func:`damage` can do: ``<target>-<how>``, target payload files, ``index.db``, its WAL.
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
        files = payload_files(cache_dir)
        chosen = rng.sample(files, max(1, len(files) // 4))
        for f in chosen:
            if how == "bitflip":
                pos = flip_bit(f, rng)
                while pos in HEADER_PAD:  # a flip in the padding changes nothing: redo
                    flip_bit(f, rng, pos)  # (undo)
                    pos = flip_bit(f, rng)
            elif how == "truncate":
                truncate_file(f, rng)
            else:
                overwrite(f, rng, 64)
        return len(chosen), [f.stem for f in chosen]
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
