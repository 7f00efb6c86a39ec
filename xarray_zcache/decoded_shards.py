"""Sharded arrays in the decoded tier: one decoded array per inner chunk.

A selection maps to inner chunks (the indexer runs over the inner chunk grid); per shard
the encoded bytes come through the store's read path like zarr's own: a shard whose
inner chunks are all wanted is read whole (one request when cold, as zarr does), else
its index (the sharding codec's byte range) and then each wanted inner chunk's byte
range. An inner chunk's decoded entry is keyed by the byte range's cache key (under the
shard's parts, so that the shard's invalidation drops it) and its token is the inner
chunk's encoded bytes: equal bytes, the same array (`xarray_zcache.decoded_reads`).
Misses are decoded with the sharding codec's inner pipeline. Reads of a shard's parts
go through `CachedStore.get_bytes`, with their checks that no part of an old version is
combined with a part of a new one (`ObjectChanged`: the backend reads again).

`shard_parts` and `decoded_parts` are shared with zarr's array API
(`xarray_zcache.decoded_pipeline`), which reads one shard at a time.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
from zarr.abc.store import RangeByteRequest
from zarr.core.chunk_utils import fill_value_or_default
from zarr.core.sync import sync

from xarray_zcache.cache.decoded import DecodedTier
from xarray_zcache.decoded_plan import DecodedPlan, Shards
from xarray_zcache.decoded_source import DecodedSource
from xarray_zcache.keys import cut, range_key

__all__ = ["coalesce", "decoded_parts", "fill_sharded", "shard_parts"]

_Item = tuple[tuple[int, ...], Any, Any]  # (inner chunk within its shard, chunk sel, out sel)
_Found = tuple[str, bytes | None, Any, Any]  # (decoded key, inner bytes or None, sels)


async def _index(shards: Shards, data: bytes) -> Any:
    buf = shards.spec.prototype.buffer.from_bytes(data)
    return await shards.codec._decode_shard_index(buf, shards.per_shard)


async def shard_parts(
    store: DecodedSource, shards: Shards, key: str, items: list[_Item]
) -> list[_Found] | None:
    """The encoded bytes of the inner chunks ``items`` of shard ``key`` through the
    store's read path, each with its decoded entry's key (None: a missing inner chunk);
    None if the shard is missing."""
    ck = store._ck(key)
    whole = None
    if len(items) == math.prod(shards.per_shard):  # every inner chunk: the shard at once
        whole = await store.get_bytes(key)
        index_bytes = None if whole is None else cut(shards.index_range, whole)
    else:
        index_bytes = await store.get_bytes(key, shards.index_range)
    if index_bytes is None:  # no shard: the fill value everywhere
        return None
    index = await _index(shards, index_bytes)
    ranges = [index.get_chunk_slice(local) for local, _, _ in items]
    if whole is None:
        config = shards.spec.config
        spans = coalesce(
            [r for r in ranges if r is not None],
            config.sharding_coalesce_max_gap_bytes,
            config.sharding_coalesce_max_bytes,
        )
        # a task group, as zarr's coalesced reads: a failure (`ObjectChanged`) surfaces
        # as an exception group, what zarr's own read raises
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(store.get_bytes(key, RangeByteRequest(*sp))) for sp in spans]
        held = dict(zip(spans, [t.result() for t in tasks], strict=True))

    def part(where: tuple[int, int] | None) -> bytes | None:
        if where is None:
            return None
        if whole is not None:
            return whole[where[0] : where[1]]
        span = next(sp for sp in held if sp[0] <= where[0] and where[1] <= sp[1])
        got = held[span]
        return None if got is None else got[where[0] - span[0] : where[1] - span[0]]

    parts = [part(r) for r in ranges]
    return [
        ("" if r is None else range_key(ck, RangeByteRequest(*r)), data, cs, os)
        for r, data, (_, cs, os) in zip(ranges, parts, items, strict=True)
    ]


async def decoded_parts(
    tier: DecodedTier, tag: str, shards: Shards, found: list[_Found]
) -> list[np.ndarray[Any, Any] | None]:
    """The decoded arrays of inner chunks ``found`` (`shard_parts`; None: missing): from
    the tier under ``tag``, else decoded with the sharding codec's inner pipeline and
    admitted."""
    held = [None if b is None else tier.get(k, b, tag) for k, b, _, _ in found]
    todo = [
        i
        for i, (f, a) in enumerate(zip(found, held, strict=True))
        if f[1] is not None and a is None
    ]
    if not todo:
        return held
    buffer = shards.spec.prototype.buffer
    encoded = [found[i][1] for i in todo]
    decoded = await shards.pipeline.decode(
        [(buffer.from_bytes(b), shards.spec) for b in encoded if b is not None]
    )
    for i, nd in zip(todo, decoded, strict=True):
        array = nd.as_numpy_array()
        key, data = found[i][0], found[i][1]
        assert data is not None
        tier.put(key, data, array, tag)
        held[i] = array
    return held


def coalesce(ranges: list[tuple[int, int]], max_gap: int, max_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges covering ``ranges`` (inner chunks of one shard), neighbours merged
    when the gap between them is at most ``max_gap`` and the merged range at most
    ``max_bytes`` long: the requests zarr's own sharding codec sends for the same read
    (its ``sharding_coalesce_*`` settings), so that a cold read costs what it costs
    without the decoded tier, and a repeated read asks the byte tiers for the same
    ranges."""
    spans: list[tuple[int, int]] = []
    for start, end in sorted(set(ranges)):
        if spans and start - spans[-1][1] <= max_gap and end - spans[-1][0] <= max_bytes:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((start, end))
    return spans


def fill_sharded(
    plan: DecodedPlan, shards: Shards, tier: DecodedTier, indexer: Any, out: np.ndarray[Any, Any]
) -> None:
    """Fill ``out`` with the inner chunks ``indexer`` (over the inner chunk grid) touches."""
    by_shard: dict[tuple[int, ...], list[_Item]] = {}
    for coords, chunk_sel, out_sel, _ in indexer:
        shard = tuple(c // p for c, p in zip(coords, shards.per_shard, strict=True))
        local = tuple(c % p for c, p in zip(coords, shards.per_shard, strict=True))
        by_shard.setdefault(shard, []).append((local, chunk_sel, out_sel))
    encode_key = plan.metadata.encode_chunk_key

    async def one(shard: tuple[int, ...], items: list[_Item]) -> list[Any]:
        found = await shard_parts(plan.store, shards, plan.prefix + encode_key(shard), items)
        if found is None:
            return [(None, cs, os) for _, cs, os in items]
        arrays = await decoded_parts(tier, plan.tag, shards, found)
        return [(a, cs, os) for a, (_, _, cs, os) in zip(arrays, found, strict=True)]

    async def run() -> list[list[Any]]:
        return await asyncio.gather(*(one(s, items) for s, items in by_shard.items()))

    fill = fill_value_or_default(shards.spec)
    for group in sync(run()):
        for array, chunk_sel, out_sel in group:
            if array is None:
                out[out_sel] = fill
                continue
            selected = array[chunk_sel]
            if indexer.drop_axes:
                selected = selected.squeeze(axis=indexer.drop_axes)
            out[out_sel] = selected
