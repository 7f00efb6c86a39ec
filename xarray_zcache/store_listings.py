"""How a `CachedStore` lists: `list`, `list_prefix` and `list_dir` answered from the
cache's listings (each kept for ``listing_ttl`` seconds and dropped by writes and
deletes under its prefix), and `is_empty` from them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from xarray_zcache.keys import listing_key
from xarray_zcache.store_sources import SourceReads

__all__ = ["CachedListings"]


class CachedListings(SourceReads):
    """Part of `CachedStore` (its state is the store's)."""

    async def is_empty(self, prefix: str) -> bool:
        # docstring inherited
        if prefix != "" and not prefix.endswith("/"):
            prefix += "/"
        async for _ in self.list_prefix(prefix):
            return False
        return True

    # -- listings (writes and deletes: store_writes.py) ----------------------------------------

    async def _listing(
        self, op: str, prefix: str, source: AsyncIterator[str]
    ) -> AsyncIterator[str]:
        cache = self.cache
        lk = listing_key(self._namespace, op, prefix)
        names = cache.get_listing(lk)
        if names is None:
            generation = cache.listing_generation()
            names = tuple([name async for name in source])
            cache.put_listing(lk, names, generation)
        for name in names:
            yield name

    def list(self) -> AsyncIterator[str]:
        # docstring inherited
        return self._listing("list", "", self._store.list())

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        return self._listing("prefix", prefix, self._store.list_prefix(prefix))

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        return self._listing("dir", prefix, self._store.list_dir(prefix))
