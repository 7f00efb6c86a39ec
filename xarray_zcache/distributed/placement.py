"""Cache-aware task placement: send a chunk-reading task towards the chunk's owner.

Run by `ZCacheSchedulerPlugin.update_graph` (on the scheduler, before the new tasks
are transitioned) when ``zcache.distributed.placement`` is on. For every new task
whose dependencies are all data (no computed inputs: a *root* task), it looks in the
task's spec for dask's ``getter(array, index)`` calls, including the ones fused
into ``_execute_subgraph`` blocks. When ``array`` is an xarray-wrapped zarr array
read through a `CachedStore` (what ``open_dataset(..., engine="zcache",
chunks=...)`` builds, also with decoding wrappers) and ``index`` a tuple of plain
slices, the zarr objects the task reads are known: their cache keys, and the bytes
of the task's region in each. The cache host that owns most of these bytes (by the
current membership, `Membership.owner`) gets the task: its workers become the
task's worker restrictions, *loose* ones (``allow_other_workers``), so the
scheduler still runs it elsewhere when none of them is there, and work stealing
may still move it to an idle worker. A stale owner is harmless: at worst the task
runs on a worker that asks a peer, as without placement.

Nothing here changes what a task computes; a task that cannot be mapped (another
kind of array, fancy indexing, a region spanning more than `MAX_OBJECTS` objects,
a dask array built elsewhere) is left as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from xarray_zcache.distributed.membership import Membership

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["MAX_OBJECTS", "Placer", "ZarrSource", "region_bytes", "zarr_source"]

logger = logging.getLogger("xarray_zcache.distributed")

#: A task reading more zarr objects than this is not placed (the owner of most of its
#: bytes would be a guess at high cost, and such tasks are rare: big dask chunks of
#: small zarr chunks)
MAX_OBJECTS = 256
#: Wrappers looked through between dask's array argument and the zarr array
_MAX_DEPTH = 16
#: Nesting of task specs walked (fused blocks inside fused blocks)
_MAX_NESTING = 8
_GETTERS = frozenset({"getter", "getter_nofancy", "getter_inline"})


@dataclasses.dataclass(frozen=True)
class ZarrSource:
    """A zarr array read through a `CachedStore`, as a task's ``getter`` sees it.

    ``grid`` is the shape of the stored objects (the shards of a sharded array),
    ``key_of`` maps object coordinates to the object's cache key.
    """

    shape: tuple[int, ...]
    grid: tuple[int, ...]
    itemsize: int
    key_of: Callable[[tuple[int, ...]], str]


def _full(index: Any, ndim: int) -> bool:
    """Whether an xarray indexer selects the whole array (``(slice(None),) * ndim``)."""
    key = getattr(index, "tuple", None)
    if not isinstance(key, tuple) or len(key) != ndim:
        return False
    return all(isinstance(k, slice) and k == slice(None) for k in key)


def zarr_source(obj: Any) -> ZarrSource | None:
    """The zarr array behind an xarray lazily indexed array, or ``None``.

    Looks through xarray's wrappers (``.array``), all of which must keep the
    array's shape (decoding wrappers do) and select all of it (a
    ``LazilyIndexedArray`` with a key other than full slices is not followed).
    """
    import zarr

    shape = getattr(obj, "shape", None)
    for _ in range(_MAX_DEPTH):
        if obj is None or getattr(obj, "shape", None) != shape:
            return None
        inner = getattr(obj, "_array", None)
        if isinstance(inner, zarr.Array):
            return _source_of(inner) if inner.shape == shape else None
        if type(obj).__name__ == "LazilyIndexedArray" and not _full(
            getattr(obj, "key", None), len(shape or ())
        ):
            return None
        obj = getattr(obj, "array", None)
    return None


def _source_of(array: Any) -> ZarrSource | None:
    from xarray_zcache.store import CachedStore

    store = array.store_path.store
    if not isinstance(store, CachedStore):
        return None
    try:
        grid = array.shards or array.chunks
        encode = array.metadata.encode_chunk_key
        itemsize = int(array.dtype.itemsize)
    except Exception:  # an irregular chunk grid, or an odd dtype: not placed
        return None
    path = array.store_path.path
    prefix = f"{path}/" if path else ""
    ck: Callable[[str], str] = store._ck

    def key_of(coords: tuple[int, ...]) -> str:
        return str(ck(prefix + encode(coords)))

    return ZarrSource(tuple(array.shape), tuple(grid), max(itemsize, 1), key_of)


def region_bytes(source: ZarrSource, index: Any) -> dict[str, int] | None:
    """Cache key -> bytes of the region ``index`` (a tuple of slices) in that object.

    ``None`` if ``index`` is not a tuple of step-1 slices of the array's rank, or the
    region spans more than `MAX_OBJECTS` objects.
    """
    if not isinstance(index, tuple) or len(index) != len(source.shape):
        return None
    spans: list[list[tuple[int, int]]] = []
    count = 1
    for sl, n, g in zip(index, source.shape, source.grid, strict=True):
        if not isinstance(sl, slice) or sl.step not in (None, 1) or g <= 0:
            return None
        start, stop, _ = sl.indices(n)
        if stop <= start:
            return {}
        first, last = start // g, (stop - 1) // g
        spans.append(
            [(c, min(stop, (c + 1) * g) - max(start, c * g)) for c in range(first, last + 1)]
        )
        count *= last - first + 1
        if count > MAX_OBJECTS:
            return None
    out: dict[str, int] = {}
    for combo in _product(spans):
        coords = tuple(c for c, _ in combo)
        size = source.itemsize
        for _, n in combo:
            size *= n
        out[source.key_of(coords)] = size
    return out


def _product(spans: list[list[tuple[int, int]]]) -> Iterator[tuple[tuple[int, int], ...]]:
    import itertools

    return itertools.product(*spans)


# -- finding the reads in a task's spec --------------------------------------------------------


def _resolve(node: Any, env: dict[Any, Any]) -> Any:
    from dask._task_spec import DataNode, TaskRef

    if isinstance(node, TaskRef):
        return env.get(node.key, node)
    if isinstance(node, DataNode):
        return node.value
    return node


def getter_calls(spec: Any) -> list[tuple[Any, Any]]:
    """``(array, index)`` of every dask ``getter`` call in a task spec.

    Looks into nested tasks and fused blocks (``_execute_subgraph``), binding the
    block's inner keys to its arguments. ``array`` is the array object (inlined) or a
    ``TaskRef`` to the key that holds it; ``index`` as given to the getter.
    """
    out: list[tuple[Any, Any]] = []
    _walk(spec, {}, out, 0)
    return out


def _walk(node: Any, env: dict[Any, Any], out: list[tuple[Any, Any]], depth: int) -> None:
    from dask._task_spec import GraphNode, Task, _execute_subgraph

    if depth > _MAX_NESTING or not isinstance(node, Task):
        return
    func, args = node.func, node.args
    if func is _execute_subgraph and len(args) >= 3 and isinstance(args[0], dict):
        inner, _outkey, inkeys = args[0], args[1], args[2]
        bound = dict(zip(inkeys, (_resolve(a, env) for a in args[3:]), strict=False))
        for sub in inner.values():
            _walk(sub, bound, out, depth + 1)
        return
    if (
        getattr(func, "__name__", None) in _GETTERS
        and getattr(func, "__module__", "") == "dask.array.core"
        and len(args) >= 2
    ):
        out.append((_resolve(args[0], env), _resolve(args[1], env)))
        return
    for arg in (*args, *node.kwargs.values()):
        if isinstance(arg, GraphNode):
            _walk(arg, env, out, depth + 1)


# -- the scheduler side --------------------------------------------------------------------------


@dataclasses.dataclass
class PlacementStats:
    """What placement did (cumulative, on the scheduler)."""

    seen: int = 0  # root tasks reading zarr objects through zcache
    placed: int = 0  # of which were given owner workers
    unmapped: int = 0  # of which could not be mapped to objects
    seconds: float = 0.0  # time spent placing, in update_graph

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class Placer:
    """Give root tasks that read zarr chunks loose restrictions to their owners' workers."""

    def __init__(self) -> None:
        self.stats = PlacementStats()
        self._sources: dict[Any, ZarrSource | None] = {}  # data key -> source (per graph)

    def place(self, scheduler: Scheduler, tasks: Iterable[Any], membership: Membership) -> int:
        """Place the root tasks among ``tasks`` (keys); returns how many got restrictions."""
        if len(membership.hosts) < 2:
            return 0  # one cache host: every worker reads locally anyway
        t0 = time.perf_counter()
        self._sources = {}
        by_object: dict[str, str | None] = {}
        placed = 0
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is None or ts.run_spec is None or ts.worker_restrictions:
                continue
            if ts.state not in ("released", "waiting") or not self._is_root(ts):
                continue
            weights = self._weights(scheduler, ts.run_spec)
            if weights is None:
                continue
            self.stats.seen += 1
            if not weights:
                self.stats.unmapped += 1
                continue
            host = self._owner(weights, membership, by_object)
            workers = {w for w in membership.workers_of(host or "") if w in scheduler.workers}
            if not workers:
                continue
            ts.worker_restrictions = workers
            ts.loose_restrictions = True
            placed += 1
        self.stats.placed += placed
        self.stats.seconds += time.perf_counter() - t0
        self._sources = {}
        return placed

    @staticmethod
    def _is_root(ts: Any) -> bool:
        """No computed inputs: every dependency is a data node (an array, an index)."""
        from dask._task_spec import DataNode

        return all(isinstance(dep.run_spec, DataNode) for dep in ts.dependencies)

    def _weights(self, scheduler: Scheduler, spec: Any) -> Counter[str] | None:
        """Bytes read per cache key (empty: reads zcache but unmapped; None: no zcache read)."""
        from dask._task_spec import DataNode, TaskRef

        weights: Counter[str] = Counter()
        found = False
        for array, index in getter_calls(spec):
            if isinstance(array, TaskRef):
                if array.key in self._sources:
                    source = self._sources[array.key]
                else:
                    dts = scheduler.tasks.get(array.key)
                    rs = None if dts is None else dts.run_spec
                    source = zarr_source(rs.value) if isinstance(rs, DataNode) else None
                    self._sources[array.key] = source
            else:
                source = zarr_source(array)
            if source is None:
                continue
            found = True
            region = region_bytes(source, index)
            if region is None:
                return Counter()
            weights.update(region)
        return weights if found else None

    @staticmethod
    def _owner(
        weights: Counter[str], membership: Membership, memo: dict[str, str | None]
    ) -> str | None:
        """The cache host owning most of the bytes (ties: the first key's owner)."""
        per_host: Counter[str] = Counter()
        for ck, n in weights.items():
            owner = memo.get(ck, "")
            if owner == "":
                owner = memo[ck] = membership.owner(ck)
            if owner is not None:
                per_host[owner] += n
        best = per_host.most_common(1)
        return best[0][0] if best else None
