"""A quick basic indexer for the decoded tier: slices of step 1 and integers only.

The selections a Dask task or a plain ``.values`` sends (a tuple of step-1 slices and
integers, within bounds) map to chunks here without zarr's general `BasicIndexer`
(its per-call set-up costs more than serving a decoded chunk). It yields what zarr's
indexer yields for such selections: chunk coordinates, the selection in the chunk and
in the output (an integer drops its axis by indexing the chunk, as in zarr's
`BasicIndexer`, whose ``drop_axes`` is empty too). Anything else returns None, and zarr's
own indexer is used.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["FastIndexer", "fast_indexer"]

_Dim = list[tuple[int, slice | int, slice | None]]  # (chunk index, in chunk, in output)


class FastIndexer:
    """The chunks a basic selection touches (iterated like a zarr indexer)."""

    __slots__ = ("_dims", "drop_axes", "shape")

    def __init__(self, dims: list[_Dim], shape: tuple[int, ...]) -> None:
        self._dims = dims
        self.shape = shape
        self.drop_axes: tuple[int, ...] = ()

    def __iter__(self) -> Iterator[tuple[tuple[int, ...], tuple[Any, ...], tuple[Any, ...], bool]]:
        for combo in itertools.product(*self._dims):
            coords = tuple(c for c, _, _ in combo)
            chunk_sel = tuple(sel for _, sel, _ in combo)
            out_sel = tuple(o for _, _, o in combo if o is not None)
            yield coords, chunk_sel, out_sel, False


def fast_indexer(
    selection: Any, shape: tuple[int, ...], chunks: tuple[int, ...]
) -> FastIndexer | None:
    """The `FastIndexer` of ``selection`` over an array of ``shape`` in ``chunks``, or
    None when the selection is not a full tuple of step-1 slices and in-bounds ints."""
    if not isinstance(selection, tuple) or len(selection) != len(shape):
        return None
    dims: list[_Dim] = []
    out_shape: list[int] = []
    for sel, n, c in zip(selection, shape, chunks, strict=True):
        if isinstance(sel, slice):
            if sel.step not in (None, 1):
                return None
            start, stop, _ = sel.indices(n)
            stop = max(start, stop)
            out_shape.append(stop - start)
            dim: _Dim = []
            for ci in range(start // c, -(-stop // c)):
                lo, hi = max(start, ci * c), min(stop, (ci + 1) * c)
                dim.append((ci, slice(lo - ci * c, hi - ci * c), slice(lo - start, hi - start)))
            dims.append(dim)
        elif isinstance(sel, int | np.integer) and not isinstance(sel, bool):
            i = int(sel) + n if sel < 0 else int(sel)
            if not 0 <= i < n:
                return None
            dims.append([(i // c, i % c, None)])
        else:
            return None
    return FastIndexer(dims, tuple(out_shape))
