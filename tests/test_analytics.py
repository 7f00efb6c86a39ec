"""Access analytics: miss-ratio curves against a brute-force LRU, access patterns."""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

import pytest
from zarr.core.buffer import cpu
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from xarray_zcache import CacheConfig, CachedStore
from xarray_zcache.cache.analytics import access_patterns, miss_ratio_curve, recommendation


def _lru_hit_rate(trace: list[tuple[str, int]], capacity: int) -> float:
    cache: OrderedDict[str, int] = OrderedDict()
    used = hits = 0
    for key, size in trace:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
            continue
        cache[key] = size
        used += size
        while used > capacity:
            _, s = cache.popitem(last=False)
            used -= s
    return hits / len(trace)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miss_ratio_curve_matches_lru_simulation(seed: int) -> None:
    rng = random.Random(seed)
    sizes = {f"k{i}": rng.randint(1, 50) * 100 for i in range(200)}
    keys = list(sizes)
    trace = [
        (k, sizes[k]) for k in (keys[min(int(rng.paretovariate(1.2)), 199)] for _ in range(3000))
    ]
    caps = [2_000, 10_000, 50_000, 200_000]
    curve = miss_ratio_curve(trace, caps)
    for c in caps:
        assert curve[c] == pytest.approx(_lru_hit_rate(trace, c), abs=1e-9)


def test_patterns_and_recommendation() -> None:
    seq = [(f"a/c/{i}/0", 1) for i in range(50)]
    rnd = [(f"b/c/{i * 37 % 50}/{i * 11 % 7}", 1) for i in range(50)]
    pats = access_patterns(seq + rnd, group=lambda k: k.split("/")[0])
    assert pats["a"]["pattern"] == "sequential"
    assert pats["b"]["pattern"] == "random"
    assert "would serve 90%" in recommendation({100: 0.5, 200: 0.9}, 100, "memory")
    assert "could be smaller" in recommendation({50: 0.9, 100: 0.9}, 100, "memory")


def test_store_analytics_end_to_end(tmp_path: Any) -> None:
    cfg = CacheConfig().with_memory_size("64kB").without_disk_cache().with_prefetch(0)
    store = CachedStore(MemoryStore(), cfg)
    for i in range(40):
        sync(store.set(f"t2m/c/{i}/0", cpu.Buffer.from_bytes(bytes(4000))))
    store.cache.memory_tier.clear()
    for _ in range(3):
        for i in range(40):
            sync(store.get(f"t2m/c/{i}/0"))
    report = store.analytics()
    assert report["trace_length"] == 120
    assert report["patterns"][store.namespace + "/t2m"]["pattern"] == "sequential"
    # 160 kB cycled through a 64 kB LRU: no hits now, all hits at 4x
    assert report["memory_curve"]["1.0"] == 0.0
    assert report["memory_curve"]["4.0"] > 0.6
    assert "memory tier" in report["recommendations"][0]
