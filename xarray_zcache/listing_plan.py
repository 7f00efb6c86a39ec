"""Which listings validate a unit's cached objects most cheaply.

A validation lists the source (one request per `PAGE` objects on S3). Listing an
array's whole folder costs ``⌈objects / PAGE⌉`` requests however few of its chunks are
cached; a reader of one region of a large array would pay for all of it. The cached
chunks can be listed by *rows* of the chunk grid instead: when the chunk keys are
folders (zarr v3's default encoding ``c/i/j/k``, or zarr v2 with
``dimension_separator="/"``), ``c/i/`` holds the chunks of grid row ``i``, ``c/i/j/``
those of ``(i, j)``; with flat keys (zarr v2's default ``i.j.k``, or ``c.i.j.k``) a row
is the names starting with ``i.`` (a listing with that prefix). The metadata documents
are listed on their own. `plan` picks the depth
whose rows cost the fewest requests (from the grid in the array's metadata) and keeps
the whole listing when it is not cheaper.

A group's folder (no chunk of its own) is validated by a listing of its documents only:
the arrays below it are units of their own.

Only what the plan covers is compared (`Plan.covers`): an entry cached after the plan
was made, outside the listed rows, was filled at its current version and is kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable

from xarray_zcache.keys import key_kind

__all__ = ["Grid", "Plan", "Slice", "grid_of", "plan"]


@dataclasses.dataclass(frozen=True, slots=True)
class Grid:
    """The chunk grid of an array whose chunk keys are folders."""

    #: chunks along each dimension
    counts: tuple[int, ...]
    #: what precedes the indices in a chunk key ("c/" for zarr v3's default encoding)
    base: str
    #: what separates the indices: "/" (rows are folders) or "." (flat keys: rows are
    #: the names starting with ``i.``)
    sep: str = "/"


@dataclasses.dataclass(frozen=True, slots=True)
class Slice:
    """One listing: the objects under ``folder`` (relative to the unit's folder, "" for
    the folder itself) whose names start with ``starts``; below it only if ``recursive``."""

    folder: str
    recursive: bool
    starts: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    slices: tuple[Slice, ...]
    #: object keys (relative to the unit's folder) that the listings cover: prefixes
    covers: tuple[str, ...]
    #: requests the plan is expected to cost, and the whole listing
    cost: int
    whole: int


def _grid(doc: object) -> Grid | None:
    """The grid of an array metadata document (v3 ``zarr.json`` or v2 ``.zarray``)."""
    if not isinstance(doc, dict):
        return None
    try:
        if doc.get("zarr_format") == 3:
            if doc.get("node_type") != "array" or doc["chunk_grid"].get("name") != "regular":
                return None
            chunks = doc["chunk_grid"]["configuration"]["chunk_shape"]
            encoding = doc.get("chunk_key_encoding") or {"name": "default"}
            default = encoding.get("name") == "default"
            sep = (encoding.get("configuration") or {}).get("separator", "/" if default else ".")
            base = "c" + sep if default else ""
        elif doc.get("zarr_format") == 2:
            chunks = doc["chunks"]
            sep = doc.get("dimension_separator") or "."
            base = ""
        else:
            return None
        shape = doc["shape"]
        if sep not in ("/", ".") or len(shape) != len(chunks) or len(shape) < 2:
            return None
        counts = tuple(
            max(1, math.ceil(int(s) / int(c))) for s, c in zip(shape, chunks, strict=True)
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError):
        return None
    return Grid(counts, base, sep)


def grid_of(folder: str, peek: Callable[[str], bytes | None]) -> Grid | None:
    """The grid of the array at ``folder`` (a zarr key), from the cached metadata:
    its own document, else the consolidated metadata at the root. ``peek(key)``
    returns a cached document's bytes (None if not cached)."""

    def load(key: str) -> object:
        data = peek(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    for name in ("zarr.json", ".zarray"):
        doc = load(f"{folder}/{name}")
        if doc is not None:
            return _grid(doc)
    root = load("zarr.json")
    if isinstance(root, dict):
        consolidated = root.get("consolidated_metadata")
        if isinstance(consolidated, dict) and isinstance(consolidated.get("metadata"), dict):
            return _grid(consolidated["metadata"].get(folder))
    zmeta = load(".zmetadata")
    if isinstance(zmeta, dict) and isinstance(zmeta.get("metadata"), dict):
        return _grid(zmeta["metadata"].get(f"{folder}/.zarray"))
    return None


def _docs_slice(docs: list[str]) -> Slice:
    """One listing of the documents: the names starting with what all of them share."""
    first, last = min(docs), max(docs)
    shared = 0
    while shared < min(len(first), len(last)) and first[shared] == last[shared]:
        shared += 1
    return Slice("", recursive=False, starts=first[:shared])


def plan(cached: Iterable[str], grid: Grid | None, page: int) -> Plan | None:
    """The cheapest listings covering ``cached`` (object keys relative to the unit's
    folder, an array's or a group's), or None for one listing of the whole folder."""
    docs: list[str] = []
    chunks: list[list[str]] = []
    for rest in cached:
        if "/" not in rest and key_kind(rest) == "metadata":
            docs.append(rest)
            continue
        if grid is None or not rest.startswith(grid.base):
            return None
        index = rest[len(grid.base) :].split(grid.sep)
        if len(index) != len(grid.counts):
            return None
        chunks.append(index)
    doc_cost = 1 if docs else 0
    if grid is None:  # a group's documents (or nothing cached)
        only_docs = (_docs_slice(docs),) if docs else ()
        return Plan(only_docs, tuple(docs), doc_cost, doc_cost)
    whole = math.ceil((math.prod(grid.counts) + 1) / page)
    best: tuple[int, set[str]] | None = None
    best_cost = whole
    for depth in range(1, len(grid.counts)):
        rows = {grid.sep.join(index[:depth]) + grid.sep for index in chunks}
        cost = len(rows) * math.ceil(math.prod(grid.counts[depth:]) / page) + doc_cost
        if cost < best_cost:
            best, best_cost = (depth, rows), cost
    if best is None:
        return None
    chosen = sorted(best[1])
    if grid.sep == "/":
        slices = [Slice(grid.base + row.rstrip("/"), recursive=True) for row in chosen]
    else:  # flat keys: the names of the row, in the array's own folder
        slices = [Slice("", recursive=False, starts=grid.base + row) for row in chosen]
    if docs:
        slices.append(_docs_slice(docs))
    covers = tuple(grid.base + row for row in chosen) + tuple(docs)
    return Plan(tuple(slices), covers, best_cost, whole)
