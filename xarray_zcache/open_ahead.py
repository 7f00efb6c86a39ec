"""Read at open what xarray reads right after: the chunks of the index coordinates.

Opening a dataset, xarray builds an index for each dimension coordinate (``time``,
``lat``, ``lon``): it loads their values one coordinate after the other, each a
request to S3, so a dataset with three dimensions costs three round trips on top of
the metadata's before ``open_dataset`` returns (0.3 s at 100 ms per request). The
consolidated metadata the backend has just read names those coordinates and their
chunk grids; `read_index_coordinates` reads all their chunks at once, through the
cache's read-ahead (counted as read-ahead, so the figures stay exact: xarray's reads
that follow are hits on read-ahead entries, and no request is sent twice). Bounded:
at most `MAX_CHUNKS` chunks in all, none for a coordinate xarray was told to drop,
nothing without consolidated metadata (the per-array documents are not known yet).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any, Final, Protocol

from xarray_zcache.prefetch import ChunkGrid, grid_from_metadata

__all__ = ["MAX_CHUNKS", "index_coordinate_keys", "read_index_coordinates"]

#: Chunks read at open at most (in all coordinates); a larger coordinate is left to xarray.
MAX_CHUNKS: Final = 256
#: Reads in flight at once.
_IN_FLIGHT: Final = 32


class _Target(Protocol):
    def peek(self, key: str) -> bytes | None: ...

    def is_cached(self, key: str) -> bool: ...

    async def read_ahead(self, key: str) -> None: ...


def _members(store: _Target, group: str) -> tuple[dict[str, Any], bool] | None:
    """The consolidated metadata of the group (relative path -> document), and whether it
    is zarr v2, from the cache only (the backend's probe has just read it)."""
    base = f"{group}/" if group else ""
    doc = store.peek(f"{base}zarr.json")
    if doc is not None:
        try:
            meta = json.loads(doc)
            found = (meta.get("consolidated_metadata") or {}).get("metadata")
        except (ValueError, AttributeError):
            return None
        return (found, False) if isinstance(found, dict) else None
    doc = store.peek(f"{base}.zmetadata")
    if doc is None:
        return None
    try:
        flat = json.loads(doc)["metadata"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(flat, dict):
        return None
    members: dict[str, Any] = {}
    for path, value in flat.items():
        name, _, leaf = path.rpartition("/")
        if leaf == ".zarray" and isinstance(value, dict):
            attrs = flat.get(f"{name}/.zattrs")
            members[name] = {**value, "_dims": (attrs or {}).get("_ARRAY_DIMENSIONS")}
    return members, True


def index_coordinate_keys(store: _Target, group: str | None, drop: Iterable[str] = ()) -> list[str]:
    """The chunk keys of the group's index coordinates (1-D arrays named after their
    dimension) that are not cached yet; empty beyond `MAX_CHUNKS` in all."""
    group = (group or "").strip("/")
    found = _members(store, group)
    if found is None:
        return []
    members, v2 = found
    dropped = set(drop)
    base = f"{group}/" if group else ""
    keys: list[str] = []
    for name, meta in members.items():
        if "/" in name or name in dropped or not isinstance(meta, dict):
            continue  # only the group's own arrays
        dims = meta.get("_dims") if v2 else meta.get("dimension_names")
        if dims != [name] or len(meta.get("shape") or ()) != 1:
            continue
        grid: ChunkGrid | None = grid_from_metadata(f"{base}{name}", meta, v2)
        if grid is None:
            continue
        if len(keys) + grid.total > MAX_CHUNKS:
            return keys
        keys.extend(k for k in map(grid.key, range(grid.total)) if not store.is_cached(k))
    return keys


async def read_index_coordinates(
    store: _Target, group: str | None, drop: Iterable[str] = ()
) -> int:
    """Read the chunks of the group's index coordinates into the cache, all at once
    (`_IN_FLIGHT` at a time); returns how many were asked for. Best effort: an error is
    not cached and is xarray's to meet when it reads the coordinate itself."""
    keys = index_coordinate_keys(store, group, drop)
    gate = asyncio.Semaphore(_IN_FLIGHT)

    async def one(key: str) -> None:
        async with gate:
            await store.read_ahead(key)

    await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)
    return len(keys)
