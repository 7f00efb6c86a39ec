"""Reads of the decoded tier: a basic or orthogonal selection of a zarr array, assembled
from decoded chunks (`xarray_zcache.cache.decoded`) without calling zarr's decode on a hit.

The rule that keeps a hit exact: a decoded chunk is served only when the byte tiers
would serve the very same encoded bytes for its key right now. Each read first asks the
`CachedStore` for the chunk's encoded bytes through its own read path (the freshness
gate - TTLs, validation interval, versions, another process's change log -, the memory
tier, negative entries; `CachedStore.bytes_now` without I/O, else `get_bytes`), then
asks the decoded tier for the array decoded, with this array's dtype, chunk shape and
codecs (`DecodedPlan.tag`), from bytes equal to those (the same object
in the usual case: a pointer comparison). A write, a delete, a validation that found
the object changed or a peer's invalidation changes or drops those bytes, so the old
array can never be served; the tier also drops it with the encoded key. Stores without
versions (a MemoryStore) are covered the same way: their writes and deletes go through
the cache. A miss decodes the bytes with the array's own codec pipeline (the spec zarr
builds for a regular grid) and admits the array.

Counting: the byte tier counts what it served (a memory hit, a negative hit, or a miss
that asked the source, exactly as for zarr's own read); the decoded tier counts its hits
and misses. A decoded hit sends no request.

What it cannot serve exactly goes to zarr unchanged (`plan_of` returns None): arrays not
read through a `CachedStore` with the tier on, object/string/structured dtypes, variable
chunk grids, codecs other than zarr's own (sharded arrays are read per inner chunk,
`xarray_zcache.decoded_shards`), arrays that must raise on
missing chunks, and every vectorized (``vindex``) selection.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import numpy as np
import zarr
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import ChunkGrid
from zarr.core.chunk_utils import fill_value_or_default
from zarr.core.common import concurrent_map
from zarr.core.indexing import BasicIndexer, OrthogonalIndexer
from zarr.core.sync import sync

from xarray_zcache.cache.decoded import DecodedTier
from xarray_zcache.cache.hybrid import Unanswered
from xarray_zcache.decoded_index import fast_indexer
from xarray_zcache.decoded_shards import Shards, fill_sharded, shards_of
from xarray_zcache.store import CachedStore

__all__ = ["DecodedPlan", "plan_of", "read_selection"]

#: dtype kinds decoded here (numbers, booleans, dates); others go to zarr
_KINDS = frozenset("biufcmM")
#: zarr's own codecs (module ``zarr.codecs``) known to decode a whole chunk on their own
_CODECS = frozenset(
    {"BytesCodec", "ZstdCodec", "BloscCodec", "GzipCodec", "Crc32cCodec", "TransposeCodec"}
)


@dataclasses.dataclass(frozen=True, slots=True)
class DecodedPlan:
    """What a read of one array needs (built once per array object, `plan_of`)."""

    store: CachedStore
    prefix: str  # the array's path in the store, with a trailing "/" (or "")
    metadata: Any
    pipeline: Any
    grid: Any
    spec: ArraySpec
    dtype: np.dtype[Any]
    order: Any
    shards: Shards | None = None  # a sharded array: its inner chunks are decoded
    #: how a chunk is decoded (dtype, chunk shape, codecs, order): part of a decoded
    #: entry's identity, since another array's metadata over equal bytes decodes otherwise
    tag: str = ""


#: metadata fields a chunk's decoding does not depend on (an append changes ``shape``)
_NOT_DECODING = frozenset({"shape", "attributes", "dimension_names"})


def _tag(metadata: Any, dtype: np.dtype[Any], order: Any) -> str:
    fields = {k: v for k, v in metadata.to_dict().items() if k not in _NOT_DECODING}
    return repr((dtype.str, str(order), sorted(fields.items(), key=lambda kv: kv[0])))


def _known_codecs(metadata: Any) -> bool:
    if metadata.zarr_format == 2:
        return True  # numcodecs through zarr's V2Codec; object dtypes are refused first
    return all(
        type(c).__module__.startswith("zarr.codecs") and type(c).__name__ in _CODECS
        for c in metadata.codecs
    )


#: plans by array object (id -> (weak reference, plan)); zarr arrays are not hashable
_PLANS: dict[int, tuple[weakref.ref[Any], DecodedPlan | None]] = {}


def plan_of(array: Any) -> DecodedPlan | None:
    """The plan of zarr array ``array`` (a `zarr.Array`), or None: zarr reads it (built
    once per array object: its metadata and store never change)."""
    key = id(array)
    held = _PLANS.get(key)
    if held is not None and held[0]() is array:
        return held[1]
    plan = _plan(array)
    try:
        ref = weakref.ref(array, lambda _: _PLANS.pop(key, None))
    except TypeError:
        return plan
    _PLANS[key] = (ref, plan)
    return plan


def _plan(array: Any) -> DecodedPlan | None:
    aa = getattr(array, "_async_array", None)
    store = getattr(getattr(aa, "store_path", None), "store", None)
    if aa is None or not isinstance(store, CachedStore):
        return None
    metadata, config = aa.metadata, aa.config
    grid = aa._chunk_grid
    try:
        dtype = np.dtype(metadata.dtype.to_native_dtype())
    except TypeError:
        return None
    if (
        dtype.kind not in _KINDS
        or dtype.fields is not None
        or not grid.is_regular
        or config.read_missing_chunks is False
    ):
        return None
    order = metadata.order if metadata.zarr_format == 2 else config.order
    if metadata.zarr_format == 2:
        config = dataclasses.replace(config, order=order)
    spec = ArraySpec(
        shape=grid.chunk_shape,
        dtype=metadata.dtype,
        fill_value=metadata.fill_value,
        config=config,
        prototype=default_buffer_prototype(),
    )
    shards = None
    if not _known_codecs(metadata):
        shards = shards_of(metadata.codecs, spec, _CODECS)
        if shards is None:
            return None
    path = aa.store_path.path
    return DecodedPlan(
        store,
        f"{path}/" if path else "",
        metadata,
        aa.codec_pipeline,
        grid,
        spec,
        dtype,
        order,
        shards,
        _tag(metadata, dtype, order),
    )


def _tier(plan: DecodedPlan) -> DecodedTier | None:
    tier = plan.store.cache.decoded_tier
    return tier if tier.enabled else None


async def _load(plan: DecodedPlan, keys: list[str]) -> list[bytes | None]:
    """The encoded bytes of ``keys`` through the store's read path (concurrently)."""
    limit = int(zarr.config.get("async.concurrency"))
    return await concurrent_map([(k,) for k in keys], plan.store.get_bytes, limit)


async def _decode(plan: DecodedPlan, encoded: list[bytes]) -> list[np.ndarray[Any, Any]]:
    """Decode whole chunks with the array's codec pipeline."""
    buffer = plan.spec.prototype.buffer
    decoded = await plan.pipeline.decode([(buffer.from_bytes(b), plan.spec) for b in encoded])
    out = []
    for nd in decoded:
        assert nd is not None  # (only present chunks are decoded)
        out.append(nd.as_numpy_array())
    return out


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
    store, drop_axes, cache = plan.store, indexer.drop_axes, plan.store.cache
    encode_key, prefix = plan.metadata.encode_chunk_key, plan.prefix
    later: list[tuple[str, str, Any, Any]] = []  # (store key, cache key, selections)
    found: list[tuple[str, bytes, Any, Any]] = []  # (cache key, bytes, ...): to decode

    def place(array: np.ndarray[Any, Any] | None, chunk_sel: Any, out_sel: Any) -> None:
        if array is None:
            out[out_sel] = fill_value_or_default(plan.spec)
            return
        selected = array[chunk_sel]
        if drop_axes:
            selected = selected.squeeze(axis=drop_axes)
        out[out_sel] = selected

    def take(ck: str, data: bytes | None, chunk_sel: Any, out_sel: Any) -> None:
        if data is None:
            place(None, chunk_sel, out_sel)
            return
        array = tier.get(ck, data, plan.tag)
        if array is None:
            found.append((ck, data, chunk_sel, out_sel))
        else:
            place(array, chunk_sel, out_sel)

    for coords, chunk_sel, out_sel, _ in indexer:
        key = prefix + encode_key(coords)
        ck, data = store.bytes_now(key, cache)
        if isinstance(data, Unanswered):
            later.append((key, ck, chunk_sel, out_sel))
        else:
            take(ck, data, chunk_sel, out_sel)
    if not later and not found:
        return

    async def rest() -> list[np.ndarray[Any, Any]]:
        if later:
            loaded = await _load(plan, [key for key, *_ in later])
            for (_, ck, chunk_sel, out_sel), data in zip(later, loaded, strict=True):
                take(ck, data, chunk_sel, out_sel)
        return await _decode(plan, [data for _, data, _, _ in found]) if found else []

    arrays = sync(rest())
    for (ck, data, chunk_sel, out_sel), array in zip(found, arrays, strict=True):
        tier.put(ck, data, array, plan.tag)
        place(array, chunk_sel, out_sel)
