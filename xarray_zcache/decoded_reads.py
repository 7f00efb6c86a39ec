"""Reads of the decoded tier: a basic or orthogonal selection of a zarr array, assembled
from decoded chunks (`xarray_zcache.cache.decoded`) without calling zarr's decode on a hit.

The rule that keeps a hit exact: a decoded chunk is served only when the byte tiers
would serve the very same encoded bytes for its key right now. Each read first asks the
`CachedStore` for the chunk's encoded bytes through its own read path (the freshness
gate - TTLs, validation interval, versions, another process's change log -, the memory
tier, negative entries; `CachedStore.bytes_now_many` without I/O, one look-up for all
the chunks of a read; else `get_bytes`), then
asks the decoded tier for the array decoded, with this array's dtype, chunk shape and
codecs (`DecodedPlan.tag`), from bytes equal to those (the same object
in the usual case: a pointer comparison). A write, a delete, a validation that found
the object changed or a peer's invalidation changes or drops those bytes, so the old
array can never be served; the tier also drops it with the encoded key. Stores without
versions (a MemoryStore) are covered the same way: their writes and deletes go through
the cache. A miss decodes the bytes with the array's own codec pipeline (the spec zarr
builds for a regular grid) and admits the array.

`serve_now` and `serve_rest` are the two halves of a read over whole chunks, shared with
zarr's array API (`xarray_zcache.decoded_pipeline`): the first serves what the tiers
answer without I/O, the second reads and decodes the rest.

Counting: the byte tier counts what it served (a memory hit, a negative hit, or a miss
that asked the source, exactly as for zarr's own read); the decoded tier counts its hits
and misses. A decoded hit sends no request.

What it cannot serve exactly goes to zarr unchanged (`plan_of`, in
`xarray_zcache.decoded_plan`, returns None): arrays not
read through a `CachedStore` with the tier on, object/string/structured dtypes, variable
chunk grids, codecs other than zarr's own (sharded arrays are read per inner chunk,
`xarray_zcache.decoded_shards`), arrays that must raise on
missing chunks, and every vectorized (``vindex``) selection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import numpy as np
import zarr
from zarr.core.chunk_grids import ChunkGrid
from zarr.core.chunk_utils import fill_value_or_default
from zarr.core.common import concurrent_map
from zarr.core.indexing import BasicIndexer, OrthogonalIndexer
from zarr.core.sync import sync

from xarray_zcache.cache.decoded import DecodedTier
from xarray_zcache.cache.hybrid import Unanswered
from xarray_zcache.decoded_index import fast_indexer
from xarray_zcache.decoded_plan import DecodedPlan, plan_of
from xarray_zcache.decoded_shards import fill_sharded
from xarray_zcache.decoded_source import DecodedSource

__all__ = [
    "DecodedPlan",
    "chunk_decoder",
    "look_up",
    "plan_of",
    "read_selection",
    "serve_now",
    "serve_rest",
]

#: puts a decoded chunk (None: missing, the fill value) where a selection wants it
Place = Callable[[np.ndarray[Any, Any] | None, Any], None]
#: decodes whole chunks' encoded bytes
Decode = Callable[[list[bytes]], Awaitable[list[np.ndarray[Any, Any]]]]
_Later = tuple[str, str, Any]  # (store key, cache key, where)
_Found = tuple[str, bytes, Any]  # (cache key, encoded bytes, where): to decode


def _tier(plan: DecodedPlan) -> DecodedTier | None:
    tier = plan.store.cache.decoded_tier
    return tier if tier.enabled else None


def chunk_decoder(pipeline: Any, spec: Any) -> Decode:
    """Decode whole chunks with ``pipeline`` (zarr's codec pipeline of the array)."""

    async def decode(encoded: list[bytes]) -> list[np.ndarray[Any, Any]]:
        buffer = spec.prototype.buffer
        decoded = await pipeline.decode([(buffer.from_bytes(b), spec) for b in encoded])
        out = []
        for nd in decoded:
            assert nd is not None  # (only present chunks are decoded)
            out.append(nd.as_numpy_array())
        return out

    return decode


def serve_now(
    store: DecodedSource,
    tier: DecodedTier,
    tag: str,
    items: Iterable[tuple[str, Any]],
    place: Place,
) -> tuple[list[_Later], list[_Found]]:
    """Serve the chunks ``items`` (store key, where) whose encoded bytes the byte tiers
    answer without I/O and whose decoded array the tier holds under ``tag`` (a missing
    chunk: ``place(None, where)``); the rest: to read, to decode (`serve_rest`)."""
    pairs = list(items)
    cks, answers, arrays = look_up(store, tier, tag, [key for key, _ in pairs])
    later: list[_Later] = []
    found: list[_Found] = []
    for (key, where), ck, data, array in zip(pairs, cks, answers, arrays, strict=True):
        if array is not None:
            place(array, where)
        elif isinstance(data, Unanswered):
            later.append((key, ck, where))
        elif data is None:
            place(None, where)
        else:
            found.append((ck, data, where))
    return later, found


def look_up(
    store: DecodedSource, tier: DecodedTier, tag: str, keys: list[str], memo: Any = None
) -> tuple[list[str], list[bytes | Unanswered | None], list[np.ndarray[Any, Any] | None]]:
    """For each of the chunks ``keys``: its cache key, the encoded bytes the byte tiers
    serve now without I/O (`CachedStore.bytes_now_many`: `Unanswered` if they cannot
    tell, None if the chunk is missing) and the array the tier holds decoded from those
    very bytes under ``tag`` (else None). One pass over the gate, one look-up in each
    tier for the lot. ``memo``: see `CachedStore.bytes_now_many`."""
    cks, answers = store.bytes_now_many(keys, store.cache, memo)
    tokens = [None if isinstance(a, Unanswered) else a for a in answers]
    return cks, answers, tier.get_many(cks, tokens, tag)


async def serve_rest(
    store: DecodedSource,
    tier: DecodedTier,
    tag: str,
    later: list[_Later],
    found: list[_Found],
    decode: Decode,
    place: Place,
) -> None:
    """Read ``later`` through the store's read path, decode what the tier does not hold
    (``found`` and the misses among ``later``), admit it under ``tag``, place it."""
    if later:
        limit = int(zarr.config.get("async.concurrency"))
        loaded = await concurrent_map([(k,) for k, _, _ in later], store.get_bytes, limit)
        for (_, ck, where), data in zip(later, loaded, strict=True):
            if data is None:
                place(None, where)
                continue
            array = tier.get(ck, data, tag)
            if array is None:
                found.append((ck, data, where))
            else:
                place(array, where)
    if not found:
        return
    arrays = await decode([data for _, data, _ in found])
    for (ck, data, where), array in zip(found, arrays, strict=True):
        tier.put(ck, data, array, tag)
        place(array, where)


def read_selection(plan: DecodedPlan, selection: Any, *, orthogonal: bool) -> Any:
    """``array[selection]`` (``array.oindex[selection]`` if ``orthogonal``) from the
    decoded tier; what zarr would return, value for value."""
    tier = _tier(plan)
    if tier is None:
        raise LookupError("the decoded tier is off")
    shape, shards = plan.metadata.shape, plan.shards
    chunks = plan.spec.shape if shards is None else shards.inner
    indexer: Any = None if orthogonal else fast_indexer(selection, shape, chunks)
    if indexer is None:
        grid = plan.grid if shards is None else ChunkGrid.from_sizes(shape, chunks)
        indexer = (
            OrthogonalIndexer(selection, shape, grid)
            if orthogonal
            else BasicIndexer(selection, shape, grid)
        )
    out = np.empty(indexer.shape, dtype=plan.dtype, order=plan.order)
    if out.size and shards is not None:
        fill_sharded(plan, shards, tier, indexer, out)
    elif out.size:
        _fill(plan, tier, indexer, out)
    if not orthogonal and indexer.shape == ():
        return out[()]
    return out


def _fill(plan: DecodedPlan, tier: DecodedTier, indexer: Any, out: np.ndarray[Any, Any]) -> None:
    drop_axes, encode_key, prefix = indexer.drop_axes, plan.metadata.encode_chunk_key, plan.prefix
    fill = fill_value_or_default(plan.spec)

    def place(array: np.ndarray[Any, Any] | None, where: Any) -> None:
        chunk_sel, out_sel = where
        if array is None:
            out[out_sel] = fill
            return
        selected = array[chunk_sel]
        if drop_axes:
            selected = selected.squeeze(axis=drop_axes)
        out[out_sel] = selected

    items = ((prefix + encode_key(c), (cs, os)) for c, cs, os, _ in indexer)
    later, found = serve_now(plan.store, tier, plan.tag, items, place)
    if later or found:
        decode = chunk_decoder(plan.pipeline, plan.spec)
        sync(serve_rest(plan.store, tier, plan.tag, later, found, decode, place))
