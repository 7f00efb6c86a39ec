"""What the decoded tier needs to read one zarr array: `DecodedPlan` (built once per
array object, `plan_of`), and `Shards` for a sharded array's inner chunks.

Shared by the xarray path (`xarray_zcache.decoded_reads`, `xarray_zcache.decoded_shards`)
and zarr's array API (`xarray_zcache.decoded_pipeline`); it imports neither of them.
`decodable` and `decoding_tag` are the checks both paths make: which arrays the tier can
decode exactly (numbers, booleans and dates; a regular chunk grid; zarr's own codecs,
or a sharding codec over them) and the tag naming how a chunk is decoded (an entry is
served only under the same tag).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest
from zarr.codecs.sharding import ShardingCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata.v3 import RegularChunkGridMetadata

from xarray_zcache.decoded_source import DecodedSource, decoded_source

__all__ = [
    "CODECS",
    "DecodedPlan",
    "Shards",
    "decodable",
    "decoding_tag",
    "plan_of",
    "shards_of",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Shards:
    """The sharding codec of an array and what reading its inner chunks needs."""

    codec: ShardingCodec
    inner: tuple[int, ...]
    per_shard: tuple[int, ...]
    index_range: ByteRequest
    pipeline: Any
    spec: ArraySpec


#: dtype kinds decoded here (numbers, booleans, dates); others go to zarr
_KINDS = frozenset("biufcmM")
#: zarr's own codecs (module ``zarr.codecs``) known to decode a whole chunk on their own
CODECS = frozenset(
    {"BytesCodec", "ZstdCodec", "BloscCodec", "GzipCodec", "Crc32cCodec", "TransposeCodec"}
)


def shards_of(codecs: Any, spec: ArraySpec, known: frozenset[str] = CODECS) -> Shards | None:
    """The `Shards` of an array whose only codec is a sharding codec with inner codecs
    of zarr's own (``known`` class names), else None."""
    if not _sharded(codecs, known):
        return None
    codec = codecs[0]
    per = codec._get_chunks_per_shard(spec)
    return Shards(
        codec,
        tuple(codec.chunk_shape),
        per,
        codec._shard_index_byte_range(per),
        codec._get_inner_pipeline(spec),
        codec._get_chunk_spec(spec),
    )


def _ours(codecs: Any, known: frozenset[str]) -> bool:
    return all(
        type(c).__module__.startswith("zarr.codecs") and type(c).__name__ in known for c in codecs
    )


def _sharded(codecs: Any, known: frozenset[str]) -> bool:
    return (
        len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) and _ours(codecs[0].codecs, known)
    )


@dataclasses.dataclass(frozen=True, slots=True)
class DecodedPlan:
    """What a read of one array needs (built once per array object, `plan_of`)."""

    store: DecodedSource  # a CachedStore
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


def decoding_tag(metadata: Any, dtype: np.dtype[Any], order: Any) -> str:
    """How a chunk of an array with ``metadata`` is decoded into ``order``: the tag of
    its decoded entries (dtype, chunk grid, codecs, fill value, order; not the shape)."""
    fields = {k: v for k, v in metadata.to_dict().items() if k not in _NOT_DECODING}
    return repr((dtype.str, str(order), sorted(fields.items(), key=lambda kv: kv[0])))


def decodable(metadata: Any) -> np.dtype[Any] | None:
    """The NumPy dtype of an array the decoded tier can decode exactly (a number, boolean
    or date dtype; a regular chunk grid; zarr's own codecs, or one sharding codec over
    them), else None."""
    try:
        dtype: np.dtype[Any] = np.dtype(metadata.dtype.to_native_dtype())
    except TypeError:
        return None
    if dtype.kind not in _KINDS or dtype.fields is not None:
        return None
    if metadata.zarr_format == 2:
        return dtype  # numcodecs through zarr's V2Codec; object dtypes are refused above
    if not isinstance(metadata.chunk_grid, RegularChunkGridMetadata):
        return None
    if _ours(metadata.codecs, CODECS) or _sharded(metadata.codecs, CODECS):
        return dtype
    return None


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
    store = decoded_source(getattr(getattr(aa, "store_path", None), "store", None))
    if aa is None or store is None:
        return None
    metadata, config = aa.metadata, aa.config
    grid = aa._chunk_grid
    dtype = decodable(metadata)
    if dtype is None or not grid.is_regular or config.read_missing_chunks is False:
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
    if metadata.zarr_format == 3 and not _ours(metadata.codecs, CODECS):
        shards = shards_of(metadata.codecs, spec)
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
        decoding_tag(metadata, dtype, order),
    )
