"""The ``zcache`` backend's own `BackendArray` (`ZCacheArrayWrapper`): a read of a changed
object is read again, and basic and orthogonal reads go to the decoded tier when the
array allows it; `_retrying` puts it under the variables xarray's zarr backend opened."""

from __future__ import annotations

import logging
from typing import Any

from xarray.backends.zarr import ZarrArrayWrapper

from xarray_zcache.cache.freshness import ObjectChanged
from xarray_zcache.decoded_reads import plan_of, read_selection

__all__ = ["ZCacheArrayWrapper"]

logger = logging.getLogger("xarray_zcache.backend")


def _changed(exc: BaseException) -> bool:
    """Whether ``exc`` is `ObjectChanged`, or a group holding one (zarr reports the errors
    of its chunk reads in an `ExceptionGroup`)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(ObjectChanged) is not None
    return isinstance(exc, ObjectChanged)


def _again(exc: BaseException, array: Any) -> None:
    if not _changed(exc):
        raise exc
    logger.info(
        "xarray-zcache: %s changed at the source during a read; read again",
        getattr(array, "path", array),
    )


class ZCacheArrayWrapper(ZarrArrayWrapper):
    """xarray's `ZarrArrayWrapper` that reads once more when a read raised `ObjectChanged`
    (a shard rewritten at the source while it was read: zarr would otherwise combine
    the old index with the new bytes; see `xarray_zcache.cache.freshness`), so that an
    xarray user gets the new values rather than an `ExceptionGroup`."""

    __slots__ = ()

    def _twice(self, name: str, key: Any) -> Any:
        read: Any = getattr(super(), name)
        try:
            return read(key)
        except BaseException as exc:
            _again(exc, self._array)
        return read(key)

    async def _twice_async(self, name: str, key: Any) -> Any:
        read: Any = getattr(super(), name)
        try:
            return await read(key)
        except BaseException as exc:
            _again(exc, self._array)
        return await read(key)

    def _decoded(self, name: str, key: Any, *, orthogonal: bool) -> Any:
        """A basic or orthogonal read served from the decoded tier when the array allows
        it (`xarray_zcache.decoded_reads`), else by zarr; read again once on a change."""
        plan = plan_of(self._array)
        if plan is None or not plan.store.cache.decoded_tier.enabled:
            return self._twice(name, key)
        try:
            return read_selection(plan, key, orthogonal=orthogonal)
        except BaseException as exc:
            _again(exc, self._array)
        return read_selection(plan, key, orthogonal=orthogonal)

    def _getitem(self, key: Any) -> Any:
        return self._decoded("_getitem", key, orthogonal=False)

    def _oindex(self, key: Any) -> Any:
        return self._decoded("_oindex", key, orthogonal=True)

    def _vindex(self, key: Any) -> Any:
        return self._twice("_vindex", key)

    async def _async_getitem(self, key: Any) -> Any:
        return await self._twice_async("_async_getitem", key)

    async def _async_oindex(self, key: Any) -> Any:
        return await self._twice_async("_async_oindex", key)

    async def _async_vindex(self, key: Any) -> Any:
        return await self._twice_async("_async_vindex", key)


#: lazy wrappers followed (``.array``) from a variable's data to xarray's zarr array
_DEPTH = 16


def _retrying(result: Any) -> Any:
    """``result`` (a Dataset, DataTree or dict of Datasets of xarray's zarr backend) with
    each variable's `ZarrArrayWrapper` made a `ZCacheArrayWrapper` (in place: the lazy
    chain of indexing and decoding wrappers xarray built stays as it is)."""
    if isinstance(result, dict):
        datasets: list[Any] = list(result.values())
    elif hasattr(result, "subtree"):  # a DataTree
        datasets = list(result.subtree)
    else:
        datasets = [result]
    for ds in datasets:
        for variable in ds.variables.values():
            data = getattr(variable, "_data", None)
            for _ in range(_DEPTH):
                if data is None or isinstance(data, ZCacheArrayWrapper):
                    break
                if type(data) is ZarrArrayWrapper:
                    data.__class__ = ZCacheArrayWrapper
                    break
                data = getattr(data, "array", None)
    return result
