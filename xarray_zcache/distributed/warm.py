"""Warming keys on a worker (the scheduler's ``warm`` command) through its stores."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from zarr.core.buffer import default_buffer_prototype

from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.cache.request import PART_SEP
from xarray_zcache.keys import unescape
from xarray_zcache.registry import stores_of

__all__ = ["warm_keys"]


async def warm_keys(cache: HybridCache, keys: Iterable[str]) -> int:
    """Read cache keys (``namespace/key``) into ``cache`` through the stores bound to it.

    Keys whose store is unknown in this process are skipped. Returns how many keys
    were read. Runs the reads on zarr's event loop, where the stores live.
    """
    from zarr.core.sync import sync

    stores = list(stores_of(cache))
    n = 0
    for ck in keys:
        if PART_SEP in ck or cache.contains(ck):
            continue
        for store in stores:
            ns = store.namespace + "/"
            if ck.startswith(ns):
                key = unescape(ck[len(ns) :])
                await asyncio.to_thread(sync, store.get(key, default_buffer_prototype()))
                n += 1
                break
    return n
