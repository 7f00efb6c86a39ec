"""What the decoded tier reads through: `DecodedSource`, the part of `CachedStore` that
`xarray_zcache.decoded_plan`, `decoded_reads`, `decoded_shards` and `decoded_pipeline`
use, so that none of them imports `xarray_zcache.store` (which imports the pipeline's
installer, `xarray_zcache.decoded_install`: one way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

from xarray_zcache.store_bytes import CachedBytes

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest

    from xarray_zcache.cache.answers import _Unanswered
    from xarray_zcache.cache.hybrid import HybridCache
    from xarray_zcache.store_bytes import ReadsMemo

__all__ = ["DecodedSource", "decoded_source"]


class DecodedSource(Protocol):
    """A `CachedStore`, as the decoded tier reads through it."""

    @property
    def cache(self) -> HybridCache: ...

    def _ck(self, key: str) -> str: ...

    async def get_bytes(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None: ...

    def bytes_now_many(
        self, keys: list[str], cache: HybridCache | None = None, memo: ReadsMemo | None = None
    ) -> tuple[list[str], list[bytes | _Unanswered | None]]: ...


def decoded_source(store: Any) -> DecodedSource | None:
    """``store`` if it is a `CachedStore` (the reads of its `CachedBytes` part), else None."""
    return cast("DecodedSource", store) if isinstance(store, CachedBytes) else None
