"""Byte counts for people: the cache's own formatter (the cache does not import dask).

Same output as ``dask.utils.format_bytes`` (binary units, two decimals).
"""

from __future__ import annotations

__all__ = ["format_bytes"]

_UNITS = (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("kiB", 2**10))


def format_bytes(n: int | float) -> str:
    """``format_bytes(1_500_000) == '1.43 MiB'``; below 1 kiB: ``'512 B'``."""
    for unit, size in _UNITS:
        if n >= size * 0.9:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
