"""How a `CachedStore` of a reference store (kerchunk, VirtualiZarr) reads and validates.

A key resolves (`xarray_zcache.references`) to a byte range of a target file, read
through the `CachedStore` of the target's folder (`CachedStore._target`: one per
folder, whose units are single objects), to inline bytes, or to the reference store
itself (`DIRECT`); `revalidate` validates every target folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from xarray_zcache.references import DIRECT, References, Target
from xarray_zcache.store_validation import SourceValidation, ValidationReport

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest, Store
    from zarr.core.buffer import Buffer, BufferPrototype

__all__ = ["ReferencedReads"]


class _Folder(Protocol):
    """What the reads need of the `CachedStore` of a target folder."""

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None: ...

    async def revalidate(
        self, progress: Callable[[int, int], None] | None = None
    ) -> ValidationReport: ...


class ReferencedReads(SourceValidation):
    """Part of `CachedStore` (its state is the store's)."""

    _store: Store
    #: the references of the wrapped store (None: not a reference store)
    _refs: References | None
    #: {target folder: its `CachedStore`}
    _targets: Mapping[object, _Folder]

    if TYPE_CHECKING:  # (defined by `CachedStore`: it makes the folders' stores)

        def _target(self, target: Target) -> _Folder: ...

    async def _get_referenced(
        self, refs: References, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        found = refs.resolve(key, byte_range)
        if isinstance(found, Target):
            return await self._target(found).get(found.key, prototype, found.byte_range)
        if found is DIRECT:
            return await self._store.get(key, prototype, byte_range)
        if isinstance(found, bytes):
            return prototype.buffer.from_bytes(found)
        return None

    async def revalidate(
        self, progress: Callable[[int, int], None] | None = None
    ) -> ValidationReport:
        # docstring inherited
        if self._refs is None:
            return await super().revalidate(progress)
        for url in self._refs.target_urls():  # (every target folder: not only those read here)
            target = self._refs.target_of(url)
            if target is not None:
                self._target(target)
        report = ValidationReport(0, 0, 0, 0, 0.0)
        folders = list(self._targets.values())
        for done, store in enumerate(folders, 1):
            report = report + await store.revalidate()
            if progress is not None:
                progress(done, len(folders))
        return report
