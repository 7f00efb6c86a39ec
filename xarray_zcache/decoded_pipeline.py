"""zarr's array API over the decoded tier: a codec pipeline that serves decoded chunks.

``zarr.open_array(store=CachedStore(...))[...]`` (and ``.oindex``, ``.vindex``, ``.get_*``
selections) reads through the array's codec pipeline. zarr asks the configured pipeline
class for one with `from_array_metadata_and_store` (the store at hand) when it opens an
array, and falls back to `from_codecs` when that raises `NotImplementedError`.
`DecodedCodecPipeline` (a `BatchedCodecPipeline`) answers there:

* for a `CachedStore` and an array the decoded tier can decode exactly
  (`xarray_zcache.decoded_plan.decodable`: numbers, booleans and dates, a regular chunk
  grid, zarr's own codecs or a sharding codec over them) it returns itself, holding the
  array's metadata; its `read` serves each chunk from the decoded tier under the same
  rule as the xarray backend (`xarray_zcache.decoded_reads`): the chunk's encoded bytes
  come through the store's own read path (freshness gate, memory tier, negative entries
  without I/O: `CachedStore.bytes_now_many`, one look-up for all the chunks of a read;
  else `get_bytes`), and a decoded array is served
  only when it was decoded from those very bytes under the same decoding tag (dtype,
  chunk shape, codecs, fill value, order). A miss is decoded by zarr's own codecs (this
  pipeline's `decode`) and admitted. The selection of a decoded chunk and its placement
  are zarr's own (``chunk[chunk_selection]``, ``drop_axes``; a shard's inner chunks
  through zarr's indexer over the shard, as the sharding codec does), so every indexing
  mode zarr has - basic, orthogonal, vectorized, masks - gives zarr's values;
* otherwise (another store, an object or string dtype, a variable chunk grid, a codec
  of another package; the switch off) it raises `NotImplementedError`, and zarr builds
  its default `BatchedCodecPipeline` (`from_codecs` here returns that class itself, so
  arrays over other stores get exactly zarr's pipeline object).

Writes are zarr's (`BatchedCodecPipeline.write`, through the store, which invalidates;
a decoded entry whose bytes changed is never served again). A read also falls to zarr
when the tier is off (``decoded-memory-size: 0``), when the output buffer or the
prototype is not a NumPy one (GPU buffers), or when a batch mixes stores or specs.

Registration (`install`, when `xarray_zcache.store` is imported: it imports
`xarray_zcache.decoded_install`): only when zarr's
``codec_pipeline.path`` is zarr's default; a pipeline the user chose (zarrs'
``zarrs.ZarrsCodecPipeline``, zarr's ``FusedCodecPipeline``) is left alone, with one INFO
log line. Dask config ``zcache.decoded-array-api: false`` (``DASK_ZCACHE__DECODED_ARRAY_API``)
turns it off: nothing is registered, and arrays opened while it is off get zarr's own
pipeline. `uninstall` restores zarr's default.

This module imports the decoded tier's modules when they are first needed; none of them
imports `xarray_zcache.store` (they read through `xarray_zcache.decoded_source`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Any, Self

import dask.config
import numpy as np
import zarr
from zarr.abc.codec import GetResult
from zarr.codecs.sharding import ShardingCodec
from zarr.core.buffer import cpu
from zarr.core.chunk_grids import ChunkGrid
from zarr.core.chunk_utils import fill_value_or_default
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.core.common import concurrent_map
from zarr.core.indexing import get_indexer
from zarr.registry import register_pipeline
from zarr.storage import StorePath

from xarray_zcache.cache.hybrid import Unanswered

if TYPE_CHECKING:
    from collections.abc import Iterable

    from zarr.abc.store import ByteGetter, Store
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import NDBuffer
    from zarr.core.indexing import SelectorTuple
    from zarr.core.metadata import ArrayMetadata

    from xarray_zcache.decoded_plan import Shards

__all__ = ["DEFAULT", "PATH", "SWITCH", "DecodedCodecPipeline", "enabled", "install", "uninstall"]

logger = logging.getLogger(__name__)

#: zarr's default codec pipeline (the only one `install` replaces)
DEFAULT = "zarr.core.codec_pipeline.BatchedCodecPipeline"
#: this pipeline's name in zarr's registry and ``codec_pipeline.path``
PATH = "xarray_zcache.decoded_pipeline.DecodedCodecPipeline"
#: the dask config switch
SWITCH = "zcache.decoded-array-api"

_Batch = list[tuple["ByteGetter", "ArraySpec", "SelectorTuple", "SelectorTuple", bool]]


def enabled() -> bool:
    """Whether zarr's array API over a `CachedStore` uses the decoded tier (dask config
    ``zcache.decoded-array-api``, default true)."""
    return bool(dask.config.get(SWITCH, default=True))


@dataclasses.dataclass(frozen=True, eq=False)
class _Decoding:
    """What the reads of one array need besides zarr's pipeline (its metadata)."""

    metadata: Any
    dtype: np.dtype[Any]
    sharded: bool
    _tags: dict[str, str] = dataclasses.field(default_factory=dict)
    _shards: dict[Any, Shards | None] = dataclasses.field(default_factory=dict)
    #: the byte tiers' reads of batches of chunk keys read again (`bytes_now_many`)
    reads: dict[Any, Any] = dataclasses.field(default_factory=dict)

    def tag(self, order: Any) -> str:
        """The decoding tag of a chunk decoded into ``order`` (as the xarray path's)."""
        key = str(order)
        tag = self._tags.get(key)
        if tag is None:
            from xarray_zcache.decoded_plan import decoding_tag

            tag = self._tags[key] = decoding_tag(self.metadata, self.dtype, order)
        return tag

    def shards(self, spec: ArraySpec) -> Shards | None:
        """The `Shards` of this array read with shard ``spec`` (None: not sharded)."""
        key = (spec.shape, spec.config)
        if key not in self._shards:
            from xarray_zcache.decoded_plan import shards_of

            self._shards[key] = shards_of(self.metadata.codecs, spec)
        return self._shards[key]


@dataclasses.dataclass(frozen=True)
class DecodedCodecPipeline(BatchedCodecPipeline):
    """zarr's `BatchedCodecPipeline`, whose reads of an array over a `CachedStore` are
    served from the decoded tier (see the module's docstring)."""

    decoding: _Decoding | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def from_codecs(  # type: ignore[override]
        cls, codecs: Iterable[Any], *, batch_size: int | None = None
    ) -> BatchedCodecPipeline:
        """zarr's own pipeline (what every array not served here gets)."""
        return BatchedCodecPipeline.from_codecs(codecs, batch_size=batch_size)

    @classmethod
    def from_array_metadata_and_store(cls, array_metadata: ArrayMetadata, store: Store) -> Self:
        """This pipeline for an array the decoded tier can serve over a `CachedStore`;
        `NotImplementedError` (zarr then builds its own) for any other."""
        from xarray_zcache.decoded_plan import decodable
        from xarray_zcache.decoded_source import decoded_source

        if decoded_source(store) is None or not enabled():
            raise NotImplementedError("not a CachedStore, or zcache.decoded-array-api is off")
        dtype = decodable(array_metadata)
        if dtype is None:
            raise NotImplementedError("the decoded tier cannot decode this array exactly")
        from zarr.core.array import create_codec_pipeline

        base = create_codec_pipeline(array_metadata)  # zarr's own (no store: from_codecs)
        if type(base) is not BatchedCodecPipeline:
            raise NotImplementedError(f"not zarr's default pipeline: {type(base).__name__}")
        sharded = array_metadata.zarr_format == 3 and any(
            isinstance(c, ShardingCodec) for c in array_metadata.codecs
        )
        return cls(
            array_array_codecs=base.array_array_codecs,
            array_bytes_codec=base.array_bytes_codec,
            bytes_bytes_codecs=base.bytes_bytes_codecs,
            batch_size=base.batch_size,
            decoding=_Decoding(array_metadata, dtype, sharded),
        )

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> Self:
        return dataclasses.replace(
            super().evolve_from_array_spec(array_spec), decoding=self.decoding
        )

    async def read(
        self,
        batch_info: Iterable[tuple[ByteGetter, ArraySpec, SelectorTuple, SelectorTuple, bool]],
        out: NDBuffer,
        drop_axes: tuple[int, ...] = (),
    ) -> tuple[GetResult, ...]:
        """zarr's read, each chunk from the decoded tier when it holds the chunk decoded
        from the bytes the byte tiers serve now (a miss: decoded and admitted)."""
        if self.decoding is None:
            return await super().read(batch_info, out, drop_axes)
        batch = list(batch_info)
        served = await self._served(self.decoding, batch, out, drop_axes)
        if served is None:
            return await super().read(batch, out, drop_axes)
        return served

    async def _served(
        self, decoding: _Decoding, batch: _Batch, out: NDBuffer, drop_axes: tuple[int, ...]
    ) -> tuple[GetResult, ...] | None:
        from xarray_zcache.decoded_source import decoded_source

        if not batch:
            return None
        first, spec = batch[0][0], batch[0][1]
        raw = getattr(first, "store", None)
        store = decoded_source(raw)
        if store is None or not isinstance(out, cpu.NDBuffer):
            return None
        tier = store.cache.decoded_tier
        target: Any = out.as_ndarray_like()
        if (
            not tier.enabled
            or type(target) is not np.ndarray
            or spec.prototype.nd_buffer is not cpu.NDBuffer
            or spec.prototype.buffer is not cpu.Buffer
        ):
            return None
        keys: list[str] = []
        for item in batch:  # one store, one spec (else zarr reads)
            getter, s = item[0], item[1]
            if type(getter) is not StorePath or getter.store is not raw:
                return None
            if s is not spec and s != spec:
                return None
            keys.append(getter.path)
        tag = decoding.tag(spec.config.order)
        if decoding.sharded:
            shards = decoding.shards(spec)
            if shards is None:
                return None
            return await _read_shards(store, tier, tag, shards, batch, target, drop_axes)
        return await self._read_chunks(
            store, tier, tag, spec, batch, keys, target, drop_axes, decoding.reads
        )

    async def _read_chunks(
        self,
        store: Any,
        tier: Any,
        tag: str,
        spec: ArraySpec,
        batch: _Batch,
        keys: list[str],
        target: np.ndarray[Any, Any],
        drop_axes: tuple[int, ...],
        memo: dict[Any, Any],
    ) -> tuple[GetResult, ...]:
        from xarray_zcache.decoded_reads import chunk_decoder, look_up, serve_rest

        fill = fill_value_or_default(spec)
        missing: list[int] = []

        def place(array: np.ndarray[Any, Any] | None, where: Any) -> None:
            i, chunk_sel, out_sel = where
            if array is None:
                target[out_sel] = fill
                missing.append(i)
                return
            selected = array[chunk_sel]
            if drop_axes:
                selected = selected.squeeze(axis=drop_axes)
            target[out_sel] = selected

        cks, answers, arrays = look_up(store, tier, tag, keys, memo)
        later: list[tuple[str, str, Any]] = []
        found: list[tuple[str, bytes, Any]] = []
        for i, array in enumerate(arrays):
            item = batch[i]
            if array is not None and not drop_axes:
                target[item[3]] = array[item[2]]  # (the hot path: a warm read's every chunk)
                continue
            where = (i, item[2], item[3])
            data = answers[i]
            if array is not None:
                place(array, where)
            elif isinstance(data, Unanswered):
                later.append((keys[i], cks[i], where))
            elif data is None:
                place(None, where)
            else:
                found.append((cks[i], data, where))
        if later or found:
            await serve_rest(store, tier, tag, later, found, chunk_decoder(self, spec), place)
        return _results(len(batch), missing)


async def _read_shards(
    store: Any,
    tier: Any,
    tag: str,
    shards: Shards,
    batch: _Batch,
    target: np.ndarray[Any, Any],
    drop_axes: tuple[int, ...],
) -> tuple[GetResult, ...]:
    """Each shard's selection over its inner chunks, as zarr's sharding codec reads it
    (`ShardingCodec._decode_partial_single`), the inner chunks from the decoded tier."""
    from xarray_zcache.decoded_shards import decoded_parts, shard_parts

    spec = batch[0][1]
    grid = ChunkGrid.from_sizes(spec.shape, shards.inner)
    fill = fill_value_or_default(spec)
    inner_fill = fill_value_or_default(shards.spec)
    missing: list[int] = []

    async def one(i: int, key: str, chunk_sel: Any, out_sel: Any) -> None:
        indexer = get_indexer(chunk_sel, shape=spec.shape, chunk_grid=grid)
        items = [(coords, cs, os) for coords, cs, os, _ in indexer]
        found = await shard_parts(store, shards, key, items)
        if found is None:
            target[out_sel] = fill
            missing.append(i)
            return
        arrays = await decoded_parts(tier, tag, shards, found)
        local = np.empty(indexer.shape, dtype=shards.spec.dtype.to_native_dtype(), order=spec.order)
        for array, (_, _, cs, os) in zip(arrays, found, strict=True):
            local[os] = inner_fill if array is None else array[cs]
        selected: np.ndarray[Any, Any] = local
        sel_shape = getattr(indexer, "sel_shape", None)
        if sel_shape is not None:
            selected = selected.reshape(sel_shape)
        if drop_axes:
            selected = selected.squeeze(axis=drop_axes)
        target[out_sel] = selected

    limit = int(zarr.config.get("async.concurrency"))
    await concurrent_map(
        [(i, g.path, cs, os) for i, (g, _, cs, os, _) in enumerate(batch)],  # type: ignore[attr-defined]
        one,
        limit,
    )
    return _results(len(batch), missing)


_PRESENT = GetResult(status="present")
_MISSING = GetResult(status="missing")


def _results(n: int, missing: list[int]) -> tuple[GetResult, ...]:
    if not missing:
        return (_PRESENT,) * n
    gone = set(missing)
    return tuple(_MISSING if i in gone else _PRESENT for i in range(n))


register_pipeline(DecodedCodecPipeline)

_lock = threading.Lock()
_told = False


def install() -> bool:
    """Make `DecodedCodecPipeline` zarr's codec pipeline if zarr's default is configured
    and the switch is on; True if it is zarr's pipeline now. A pipeline the user chose
    is left alone (logged once at INFO)."""
    global _told
    if not enabled():
        return False
    with _lock:
        path = zarr.config.get("codec_pipeline.path")
        if path == PATH:
            return True
        if path != DEFAULT:
            if not _told:
                _told = True
                logger.info(
                    "xarray-zcache: zarr's codec_pipeline.path is %r (not zarr's default): "
                    "left as is; zarr's array API over a CachedStore decodes every read "
                    "(the xarray backend still uses the decoded tier)",
                    path,
                )
            return False
        zarr.config.set({"codec_pipeline.path": PATH})
        return True


def uninstall() -> None:
    """Give zarr its default codec pipeline back (if this one is configured); arrays
    opened afterwards read through zarr's own pipeline."""
    with _lock:
        if zarr.config.get("codec_pipeline.path") == PATH:
            zarr.config.set({"codec_pipeline.path": DEFAULT})
