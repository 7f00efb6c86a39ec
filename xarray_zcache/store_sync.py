"""The synchronous reads and writes of a `~xarray_zcache.store.SyncCachedStore` (the
`CachedStore` of a store with synchronous I/O): `get_sync`, `set_sync`, `delete_sync`."""

from __future__ import annotations

import logging
import time

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from xarray_zcache.keys import check_byte_range, is_plain_range
from xarray_zcache.store_writes import CachedWrites

__all__ = ["SyncReads"]

logger = logging.getLogger("xarray_zcache.store")


class SyncReads(CachedWrites):
    """Part of `SyncCachedStore` (its state is the store's): the synchronous surface,
    used only when the wrapped store supports synchronous I/O."""

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        """Synchronous `get` (only when the wrapped store supports synchronous I/O).

        The same read protocol as `get` (`HybridCache.get_or_load_sync`), without
        single flight across threads.
        """
        check_byte_range(byte_range)
        prototype = prototype or default_buffer_prototype()
        getter = self._store.get_sync  # type: ignore[attr-defined]
        cache = self.cache
        if not is_plain_range(byte_range):
            return cache.load_uncached_sync(  # type: ignore[no-any-return]
                self._read(key, byte_range),
                lambda: getter(key, prototype=prototype, byte_range=byte_range),
            )
        began = time.time()  # (a unit the gate validates now is not listed twice)
        self._validated_sync(key)
        reader = self._part_reader(key, byte_range, began)
        read = self._read(key, byte_range)

        def load() -> bytes | None:
            data, version = self._source.get_sync(key, byte_range)
            self._versionless(key, byte_range, data, version)
            metadata = read.kind == "metadata" and byte_range is None
            since = self._seen_since(key, version, began) if metadata else began
            self._filled(key, version, part=byte_range is not None, reader=reader)
            if metadata:
                stale = self._stale_after(cache, key, data)
                if stale is not None:
                    self._dropped_after_sync(stale, since)
            return data

        data = cache.get_or_load_sync(read, load)
        self._served(cache, key, reader)
        return None if data is None else prototype.buffer.from_bytes(data)

    def _dropped_after_sync(self, stale: str, since: float) -> None:
        """A metadata document changed: validate (else drop) the entries under ``stale``."""
        if self._source.supported:
            try:
                self._revalidate_under_sync(stale, since)
                return
            except Exception as exc:
                logger.warning("xarray-zcache: validating %s failed (%s)", stale, exc)
        self.cache.invalidating_sync([stale], lambda: None)

    def set_sync(self, key: str, value: Buffer) -> None:
        """Synchronous `set` (only when the wrapped store supports synchronous I/O)."""
        self._check_writable()
        setter = self._store.set_sync  # type: ignore[attr-defined]
        data = self._value_bytes(value)
        self.cache.write_through_sync(
            self._read(key, None),
            data,
            lambda: setter(key, value),
            keep=self._config.cache_on_write,
        )

    def delete_sync(self, key: str) -> None:
        """Synchronous `delete` (only when the wrapped store supports synchronous I/O)."""
        self._check_writable()
        deleter = self._store.delete_sync  # type: ignore[attr-defined]
        self.cache.invalidating_sync(self._object_keys(key), lambda: deleter(key))
