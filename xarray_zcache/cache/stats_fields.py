"""The fields of a stats snapshot: kinds, tiers, how each field combines, where its numbers are.

`xarray_zcache.cache.stats.CacheStats` is built on these; they hold no state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["COUNTER", "KINDS", "LATENCY_BUCKETS_MS", "MAX", "SAME", "SUM", "TIERS", "TOP", "Path"]

KINDS = ("metadata", "chunk")
TIERS = ("memory", "disk", "peer")

# upper bounds (ms) of the fetch-latency histogram buckets; the last bucket is open
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, math.inf)


def _zeros() -> dict[str, int]:
    return dict.fromkeys(KINDS, 0)


def _tiered() -> dict[str, dict[str, int]]:
    return {t: _zeros() for t in TIERS}


# -- the one stats model ---------------------------------------------------------------------------
#
# Every field of `CacheStats` says how two snapshots combine (dataclass metadata "combine"):
COUNTER = "counter"  #: a counter: summed by ``a + b``, subtracted by ``b - a``
SUM = "sum"  #: a gauge summed over caches (``b - a`` keeps ``b``'s value)
MAX = "max"  #: a gauge whose cluster value is the largest one (``b - a`` keeps ``b``'s)
SAME = "same"  #: a gauge kept when both agree, else ``None`` (``b - a`` keeps ``b``'s)
TOP = "top"  #: the hot keys: counts merged (``b - a`` keeps ``b``'s)

#: a number's place in a snapshot: field name, then dict keys / list indices
Path = tuple[str | int, ...]


def _gauge(combine: str, default: Any = 0) -> Any:
    return dataclasses.field(default=default, metadata={"combine": combine})


def _buckets() -> list[int]:
    return [0] * len(LATENCY_BUCKETS_MS)


def _op(a: Any, b: Any, sign: int) -> Any:
    if isinstance(a, dict):
        return {k: _op(a[k], b.get(k, 0), sign) for k in a}
    if isinstance(a, list):
        return [_op(x, y, sign) for x, y in zip(a, b, strict=True)]
    return a + sign * b


def _clone(value: Any) -> Any:
    """A copy of a field's value (its dicts and lists are new)."""
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _combine_of(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("combine", COUNTER))


def _wire_paths(value: Any, path: Path) -> Iterator[Path]:
    """Where the integers are in a field's value (nested dicts and lists)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _wire_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _wire_paths(v, (*path, i))


def _reader(paths: list[Path]) -> Callable[[Any], list[int]]:
    """Reads the numbers at ``paths`` (without their field name) out of a field's value."""
    if paths == [()]:
        return lambda value: [value]
    if all(len(p) == 1 for p in paths):
        keys = [p[0] for p in paths]
        return lambda value: [value[k] for k in keys]
    return lambda value: [_at(value, p) for p in paths]


def _at(value: Any, path: Path) -> Any:
    for k in path:
        value = value[k]
    return value
