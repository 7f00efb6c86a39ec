"""One scanner of the payload folders, shared by ``verify`` and ``rebuild_index``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Final, Literal

from xarray_zcache.cache.disk.folder import scandir, stale_temp, unlink_quietly
from xarray_zcache.cache.disk.format import (
    KINDS,
    LAYOUT,
    TEMP_SUFFIX,
    Header,
    check_file,
    payload_path,
)

_HEX_DIGITS: Final = frozenset("0123456789abcdef")

#: Counts returned by ``verify`` and ``rebuild_index``.
VERIFY_COUNTS: Final = (
    "ok",
    "corrupt",
    "missing_files",
    "orphan_files",
    "mismatched",
    "temp_files",
    "unknown_files",
    "index_damaged",
)
REBUILD_COUNTS: Final = (
    "indexed",
    "corrupt",
    "expired",
    "duplicates",
    "old_format",
    "temp_files",
    "unknown_files",
)


@dataclasses.dataclass(frozen=True, slots=True)
class Found:
    """A file met in a payload subfolder."""

    what: Literal["payload", "temp", "unknown"]
    kind: str
    entry: os.DirEntry[str]
    hexdigest: str  # "" unless a payload
    #: whether the file is where ``get`` looks for its hash (a misplaced one is never read)
    in_place: bool


def scan(root: str) -> Iterator[Found]:
    """Every file under ``root``'s payload subfolders, classified."""
    for kind in KINDS:
        sub, ext = LAYOUT[kind]
        for bucket in scandir(os.path.join(root, sub)):
            for entry in scandir(bucket.path):
                name = entry.name
                if name.endswith(TEMP_SUFFIX):
                    yield Found("temp", kind, entry, "", False)
                    continue
                hexdigest = name[: -len(ext)] if name.endswith(ext) else ""
                if len(hexdigest) != 64 or not all(c in _HEX_DIGITS for c in hexdigest):
                    yield Found("unknown", kind, entry, "", False)
                    continue
                in_place = entry.path == payload_path(root, hexdigest, kind)
                yield Found("payload", kind, entry, hexdigest, in_place)


def has_payload_files(root: str) -> bool:
    """Whether any payload file (well named, in any bucket) exists under ``root``."""
    for kind in KINDS:
        sub, ext = LAYOUT[kind]
        for bucket in scandir(os.path.join(root, sub)):
            if any(e.name.endswith(ext) for e in scandir(bucket.path)):
                return True
    return False


def _temp(found: Found, counts: dict[str, int], now: float, *, remove: bool) -> None:
    counts["temp_files"] += 1
    if remove and stale_temp(found.entry, now):
        unlink_quietly(found.entry.path)


def verify_files(
    root: str,
    rows: dict[tuple[str, str], tuple[str, int, int]] | None,
    counts: dict[str, int],
    *,
    repair: bool,
) -> list[str]:
    """The file pass of ``verify``: check every payload file against its header and row.

    ``rows`` maps ``(hexdigest, kind)`` to ``(key, size, checksum)`` (None: files only).
    With ``repair``, damaged, orphan and mismatched files and abandoned temp files are
    removed. Returns the keys whose rows must go (their file is bad or missing).
    """
    seen: set[tuple[str, str]] = set()
    bad_keys: list[str] = []
    now = time.time()
    for found in scan(root):
        if found.what == "temp":
            _temp(found, counts, now, remove=repair)
            continue
        if found.what == "unknown":
            counts["unknown_files"] += 1
            continue
        pair = (found.hexdigest, found.kind)
        problem, header = check_file(found.entry.path, found.hexdigest)
        row = rows.get(pair) if rows is not None and found.in_place else None
        if row is not None:
            seen.add(pair)
        if problem is not None or header is None:
            status = "corrupt"
        elif rows is None:
            counts["ok"] += 1
            continue
        elif row is None:
            status = "orphan_files"
        elif (row[1], row[2]) != (header.length, header.crc):
            status = "mismatched"
        else:
            counts["ok"] += 1
            continue
        counts[status] += 1
        if repair:
            unlink_quietly(found.entry.path)
            if row is not None:
                bad_keys.append(row[0])
    for pair, row in (rows or {}).items():
        if pair not in seen:
            counts["missing_files"] += 1
            if repair:
                bad_keys.append(row[0])
    return bad_keys


@dataclasses.dataclass(frozen=True, slots=True)
class Recovered:
    """An entry found by :func:`collect_entries`."""

    key: str
    kind: str
    mtime: float
    path: str
    header: Header


def collect_entries(root: str, counts: dict[str, int]) -> list[Recovered]:
    """The file pass of ``rebuild_index``: the valid, unexpired entries of the payload files.

    Files whose header is damaged (or of format 1), expired ones, abandoned temp files and the
    older file of a key found in both subfolders are removed. Payload checksums are not
    checked here: ``get`` does on every read.
    """
    now = time.time()
    found_by_key: dict[str, Recovered] = {}
    for found in scan(root):
        if found.what == "temp":
            _temp(found, counts, now, remove=True)
            continue
        if found.what == "unknown":
            counts["unknown_files"] += 1
            continue
        path = found.entry.path
        problem, header = check_file(path, found.hexdigest, payload=False)
        key = None
        if header is not None and found.in_place:
            with contextlib.suppress(UnicodeDecodeError):
                key = header.key.decode("utf-8")
        if problem is not None or header is None or key is None:
            if problem is not None and problem.startswith("unsupported format"):
                counts["old_format"] += 1
            else:
                counts["corrupt"] += 1
            unlink_quietly(path)
            continue
        if header.expires < now:
            counts["expired"] += 1
            unlink_quietly(path)
            continue
        try:
            mtime = found.entry.stat().st_mtime
        except OSError:
            continue
        previous = found_by_key.get(key)
        if previous is not None:  # one key in both folders: keep the newer file
            counts["duplicates"] += 1
            if previous.mtime > mtime:
                unlink_quietly(path)
                continue
            unlink_quietly(previous.path)
        found_by_key[key] = Recovered(key, found.kind, mtime, path, header)
    return list(found_by_key.values())
