"""How a `CachedStore` writes and deletes: through the wrapped store first, then the
cache is updated (``cache_on_write``) or the key is invalidated with its ranges,
negative entries and listings (`HybridCache.write_through`, `HybridCache.invalidating`).
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Iterable
from typing import TYPE_CHECKING

from zarr.core.buffer import Buffer

from xarray_zcache.cache.request import PART_SEP
from xarray_zcache.store_sources import SourceReads
from xarray_zcache.store_validation import SourceValidation

__all__ = ["CachedWrites"]


class CachedWrites(SourceValidation, SourceReads):
    """Part of `CachedStore` (its state is the store's)."""

    if TYPE_CHECKING:  # (defined by `zarr.abc.store.Store`)

        def _check_writable(self) -> None: ...

    def _object_keys(self, key: str) -> list[str]:
        """Cache keys that hold ``key`` or a part of it (ranges, negative entries)."""
        ck = self._ck(key)
        return [ck, ck + PART_SEP]

    def _value_bytes(self, value: Buffer) -> bytes:
        if not isinstance(value, Buffer):
            raise TypeError(
                f"CachedStore.set(): `value` must be a Buffer instance. Got an instance of "
                f"{type(value)} instead."
            )
        return value.to_bytes()

    async def set(self, key: str, value: Buffer) -> None:
        # docstring inherited
        self._check_writable()
        data = self._value_bytes(value)
        await self.cache.write_through(
            self._read(key, None),
            data,
            lambda: self._store.set(key, value),
            keep=self._config.cache_on_write,
        )

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # docstring inherited
        self._check_writable()
        # we cannot tell whether our value or an existing one won: cache neither
        await self.cache.invalidating(
            self._object_keys(key), lambda: self._store.set_if_not_exists(key, value)
        )

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def delete(self, key: str) -> None:
        # docstring inherited
        self._check_writable()
        await self.cache.invalidating(self._object_keys(key), lambda: self._store.delete(key))

    def _dir_keys(self, prefix: str) -> builtins.list[str]:
        """What ``delete_dir(prefix)`` may remove: everything under ``prefix/`` and, on
        object stores (FsspecStore), the object named exactly ``prefix``."""
        prefix = prefix.rstrip("/")
        if not prefix:
            return [self._namespace + "/"]
        return [self._ck(prefix) + "/", *self._object_keys(prefix)]

    async def delete_dir(self, prefix: str) -> None:
        # docstring inherited
        self._check_writable()
        await self.cache.invalidating(
            self._dir_keys(prefix), lambda: self._store.delete_dir(prefix)
        )

    async def clear(self) -> None:
        # docstring inherited
        self._check_writable()
        await self.cache.invalidating(self._dir_keys(""), self._store.clear)
