"""Zipf-skewed random chunk reads with a cache smaller than the working set.

One trace (seeded) of chunk reads, drawn from a Zipf law over the dataset's chunks
(rank r has probability proportional to r**-alpha; ranks are shuffled over the
chunks), is replayed sequentially through each cache, reading one chunk per
access through a zarr array. The hit rate is 1 - (chunk reads that reached the
inner store) / accesses.

Hit rates do not depend on latency, and moto costs ~5 ms of CPU per request, so
the replays read from an in-memory copy of the same objects behind an
*async-only* counting wrapper (`CountingStore`): xarray-zcache then takes exactly
the code path it takes over S3 (async ``get``, single flight, read-ahead), and
every read that reaches the wrapper is what would have been an S3 request.

The same trace is fed offline to a plain byte-bounded LRU and to Belady's
clairvoyant policy with the same capacity and the same cost per entry (payload +
xarray-zcache's measured per-entry overhead).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict
from typing import Any

import numpy as np
from common import VAR, Settings, quiet


def zipf_trace(n_items: int, accesses: int, alpha: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed + 1)
    ranks = np.arange(1, n_items + 1, dtype="float64")
    p = ranks**-alpha
    p /= p.sum()
    perm = rng.permutation(n_items)  # rank -> item
    drawn = rng.choice(n_items, size=accesses, p=p)
    return [int(perm[r]) for r in drawn]


def simulate_lru(trace: list[int], cost: list[int], capacity: int) -> int:
    """Hits of a byte-bounded LRU that admits every miss (like `MemoryTier(policy="lru")`)."""
    cache: OrderedDict[int, int] = OrderedDict()
    used = hits = 0
    for k in trace:
        if k in cache:
            hits += 1
            cache.move_to_end(k)
            continue
        if cost[k] > capacity:
            continue
        cache[k] = cost[k]
        used += cost[k]
        while used > capacity:
            _, c = cache.popitem(last=False)
            used -= c
    return hits


def simulate_belady(trace: list[int], cost: list[int], capacity: int) -> int:
    """Hits of Belady's MIN: on a miss, evict the entries re-used furthest in the future.

    The missing item itself is a candidate (it may bypass the cache). With equal sizes
    this is the optimal hit count; with (slightly) unequal sizes it is the classic
    furthest-in-future heuristic, an upper reference rather than a proven optimum.
    """
    n = len(trace)
    nxt = [n] * n
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        nxt[i] = last.get(trace[i], n + 1 + i)  # never again: beyond the end, distinct
        last[trace[i]] = i
    cached: dict[int, int] = {}  # item -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, item), lazy
    used = hits = 0
    for i, k in enumerate(trace):
        if k in cached:
            hits += 1
            cached[k] = nxt[i]
            heapq.heappush(heap, (-nxt[i], k))
            continue
        if cost[k] > capacity:
            continue
        cached[k] = nxt[i]
        heapq.heappush(heap, (-nxt[i], k))
        used += cost[k]
        while used > capacity:
            neg, victim = heapq.heappop(heap)
            if cached.get(victim) != -neg:
                continue  # stale heap entry
            del cached[victim]
            used -= cost[victim]
    return hits


def simulate_lfu(trace: list[int], cost: list[int], capacity: int) -> int:
    """Hits of LFU with perfect frequency history and admission (what TinyLFU approximates).

    A missing item enters only if it was requested more often (so far) than every
    entry it would evict; ties keep the residents.
    """
    freq: dict[int, int] = {}
    cached: dict[int, int] = {}
    used = hits = 0
    for k in trace:
        freq[k] = freq.get(k, 0) + 1
        if k in cached:
            hits += 1
            continue
        if cost[k] > capacity:
            continue
        victims = sorted(cached, key=freq.__getitem__)
        free, chosen = capacity - used, []
        for v in victims:
            if free >= cost[k]:
                break
            chosen.append(v)
            free += cached[v]
        if free < cost[k] or any(freq[v] >= freq[k] for v in chosen):
            continue
        for v in chosen:
            used -= cached.pop(v)
        cached[k] = cost[k]
        used += cost[k]
    return hits


def static_oracle(trace: list[int], cost: list[int], capacity: int, prob: list[float]) -> int:
    """Hits of a cache preloaded with the most popular items (true probabilities), never
    changing: the best any online policy can do on an independent (IRM) trace, minus its
    cold misses."""
    chosen: set[int] = set()
    used = 0
    for k in sorted(range(len(prob)), key=lambda i: -prob[i]):
        if used + cost[k] <= capacity:
            chosen.add(k)
            used += cost[k]
    return sum(1 for k in trace if k in chosen)


def zipf_probabilities(n_items: int, alpha: float, seed: int) -> list[float]:
    """Per-item probability of `zipf_trace` (same seed, same rank -> item mapping)."""
    rng = np.random.default_rng(seed + 1)
    ranks = np.arange(1, n_items + 1, dtype="float64")
    p = ranks**-alpha
    p /= p.sum()
    perm = rng.permutation(n_items)
    prob = np.zeros(n_items)
    prob[perm] = p
    return [float(x) for x in prob]


def chunk_keys(s: Settings) -> list[tuple[int, int, int]]:
    nt, ny, nx = -(-s.nt // s.chunk_t), -(-s.ny // s.chunk_y), -(-s.nx // s.chunk_x)
    return [(t, j, i) for t in range(nt) for j in range(ny) for i in range(nx)]


def replay(arr: Any, s: Settings, trace: list[int]) -> None:
    keys = chunk_keys(s)
    ct, cy, cx = s.chunks
    for item in trace:
        t, j, i = keys[item]
        arr[t * ct : (t + 1) * ct, j * cy : (j + 1) * cy, i * cx : (i + 1) * cx]


def counting_store(inner: Any) -> Any:
    """An async-only `WrapperStore` over ``inner`` counting chunk reads (not metadata)."""
    from common import METADATA_NAMES
    from zarr.storage._wrapper import WrapperStore

    class _Counting(WrapperStore):  # type: ignore[type-arg]
        chunk_reads = 0

        @property
        def _supports_sync_io(self) -> bool:  # like a remote store: async only
            return False

        async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            if key.rsplit("/", 1)[-1] not in METADATA_NAMES:
                type(self).chunk_reads += 1
            return await self._store.get(key, prototype, byte_range)

    return _Counting(inner)


def run_zipf(s: Settings, server: Any, workdir: str, memory_store: Any) -> dict[str, Any]:
    """Replay the trace through xarray-zcache (lru, slru; read-ahead off and on), CacheStore."""
    import zarr
    from zarr.experimental.cache_store import CacheStore
    from zarr.storage import MemoryStore

    from xarray_zcache import CacheConfig, CachedStore
    from xarray_zcache.cache.memory import entry_overhead
    from xarray_zcache.registry import get_cache

    keys = chunk_keys(s)
    d = memory_store._store_dict
    sizes = [len(d[f"{VAR}/c/{t}/{j}/{i}"]) for t, j, i in keys]
    overhead = entry_overhead()
    cost = [n + overhead for n in sizes]
    capacity = int(s.zipf_capacity * sum(cost))
    trace = zipf_trace(len(keys), s.zipf_accesses, s.zipf_alpha, s.seed)
    distinct = len(set(trace))
    out: dict[str, Any] = {
        "accesses": len(trace),
        "distinct_chunks": distinct,
        "alpha": s.zipf_alpha,
        "capacity_bytes": capacity,
        "capacity_fraction": s.zipf_capacity,
        "entry_overhead": overhead,
        "mean_chunk_bytes": sum(sizes) / len(sizes),
        "policies": {},
    }
    out["policies"]["lru (simulated)"] = simulate_lru(trace, cost, capacity) / len(trace)
    out["policies"]["belady (optimal, simulated)"] = simulate_belady(trace, cost, capacity) / len(
        trace
    )
    out["policies"]["lfu, perfect history + admission (simulated)"] = simulate_lfu(
        trace, cost, capacity
    ) / len(trace)
    prob = zipf_probabilities(len(keys), s.zipf_alpha, s.seed)
    out["policies"]["static oracle: true top items, no cold misses (simulated)"] = static_oracle(
        trace, cost, capacity, prob
    ) / len(trace)
    from xarray_zcache import config as config_module

    policies = tuple(getattr(config_module, "EVICTION_POLICIES", ("lru", "slru")))
    variants: list[tuple[str, str | None, int | None]] = [
        (f"xarray-zcache {p}", p, 0) for p in policies
    ]
    default = CacheConfig()
    depth = getattr(default, "prefetch_depth", 0)
    if depth:
        variants.append(
            (
                f"xarray-zcache default config ({default.eviction_policy}, prefetch {depth})",
                None,
                None,
            )
        )
        variants += [
            (f"xarray-zcache {p}, prefetch {depth}", p, None)
            for p in policies
            if p != default.eviction_policy
        ]
    out["prefetch_depth_default"] = depth
    with quiet():
        for i, (label, policy, prefetch) in enumerate(variants):
            cfg = CacheConfig().with_name(f"bench-zipf-{i}").with_memory_size(capacity)
            cfg = cfg.without_disk_cache()
            if policy is not None:
                cfg = cfg.with_eviction_policy(policy)  # type: ignore[arg-type]
            if prefetch is not None and depth:
                cfg = dataclasses.replace(cfg, prefetch_depth=prefetch)
            inner = counting_store(memory_store)
            store = CachedStore(inner, cfg)
            arr = zarr.open_array(store, path=VAR, mode="r")
            cache = get_cache(cfg)
            before = cache.stats()
            type(inner).chunk_reads = 0
            replay(arr, s, trace)
            gets = type(inner).chunk_reads
            st = cache.stats() - before
            out["policies"][label] = 1 - gets / len(trace)
            out.setdefault("zcache_stats", {})[label] = {
                "chunk_reads": gets,
                "hits": st.total_hits(kind="chunk"),
                "misses": st.total_misses(kind="chunk"),
                "prefetches": getattr(st, "prefetches", 0),
                "evictions": st.evictions.get("memory", 0),
            }
            cache.close()
        inner = counting_store(memory_store)
        cstore = CacheStore(inner, cache_store=MemoryStore(), max_size=capacity)
        arr = zarr.open_array(cstore, path=VAR, mode="r")
        type(inner).chunk_reads = 0
        replay(arr, s, trace)
        out["policies"]["zarr CacheStore (LRU)"] = 1 - type(inner).chunk_reads / len(trace)
    return out
