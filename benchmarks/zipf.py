"""Zipf-skewed random chunk reads with a cache smaller than the working set.

One trace (seeded) of chunk reads, drawn from a Zipf law over the dataset's chunks
(rank r has probability proportional to r**-alpha; ranks are shuffled over the
chunks), is replayed sequentially through each cache, reading one chunk per
access through a zarr array. The hit rate is measured from the server-side
request count (1 - chunk GETs / accesses), and checked against the cache's own
counters for xarray-zcache. The same trace is fed offline to a plain byte-bounded
LRU and to Belady's clairvoyant policy with the same capacity and the same cost
per entry (payload + xarray-zcache's measured per-entry overhead).
"""

from __future__ import annotations

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


def chunk_keys(s: Settings) -> list[tuple[int, int, int]]:
    nt, ny, nx = -(-s.nt // s.chunk_t), -(-s.ny // s.chunk_y), -(-s.nx // s.chunk_x)
    return [(t, j, i) for t in range(nt) for j in range(ny) for i in range(nx)]


def replay(arr: Any, s: Settings, trace: list[int]) -> None:
    keys = chunk_keys(s)
    ct, cy, cx = s.chunks
    for item in trace:
        t, j, i = keys[item]
        arr[t * ct : (t + 1) * ct, j * cy : (j + 1) * cy, i * cx : (i + 1) * cx]


def run_zipf(s: Settings, server: Any, workdir: str) -> dict[str, Any]:
    """Replay the trace through xarray-zcache (lru, slru) and zarr's CacheStore."""
    import zarr
    from zarr.experimental.cache_store import CacheStore
    from zarr.storage import FsspecStore, MemoryStore

    from xarray_zcache import CacheConfig, open_store
    from xarray_zcache.cache.memory import entry_overhead
    from xarray_zcache.registry import get_cache

    fs = server.filesystem()
    keys = chunk_keys(s)
    base = f"{s.url()[5:]}/{VAR}/c/"
    sizes = [int(fs.info(f"{base}{t}/{j}/{i}")["size"]) for t, j, i in keys]
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
    with server.latency_set(0.0), quiet():  # hit rates do not depend on the latency
        for policy in ("lru", "slru"):
            cfg = (
                CacheConfig()
                .with_name(f"bench-zipf-{policy}")
                .with_memory_size(capacity)
                .without_disk_cache()
                .with_eviction_policy(policy)  # type: ignore[arg-type]
            )
            store = open_store(s.url(), storage_options=server.storage_options(), cache_config=cfg)
            arr = zarr.open_array(store, path=VAR, mode="r")
            cache = get_cache(cfg)
            before = cache.stats()
            server.requests.reset()
            replay(arr, s, trace)
            gets = server.requests.chunk_gets()
            d = cache.stats() - before
            out["policies"][f"xarray-zcache {policy}"] = 1 - gets / len(trace)
            out[f"zcache_{policy}_stats_hit_rate"] = d.hit_rate(kind="chunk")
            cache.close()
        source = FsspecStore.from_url(
            s.url(), storage_options=server.storage_options(), read_only=True
        )
        cstore = CacheStore(source, cache_store=MemoryStore(), max_size=capacity)
        arr = zarr.open_array(cstore, path=VAR, mode="r")
        server.requests.reset()
        replay(arr, s, trace)
        out["policies"]["zarr CacheStore (LRU)"] = 1 - server.requests.chunk_gets() / len(trace)
    return out
