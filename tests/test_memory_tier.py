"""The memory tier: budgets, LRU / SLRU / TinyLFU behaviour, thread safety."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from xarray_zcache.cache.memory import FrequencySketch, MemoryTier, entry_overhead


def _tier(n_entries: int, size: int, policy: str) -> MemoryTier:
    return MemoryTier(n_entries * (size + entry_overhead()), policy=policy)  # type: ignore[arg-type]


def test_budget_counts_overhead_and_is_never_exceeded() -> None:
    tier = MemoryTier(10_000)
    assert 0 < tier.entry_overhead <= 300  # measured with pympler
    for i in range(1000):
        tier.put(f"k{i}", b"x" * random.randint(0, 900))
        assert tier.used_bytes() <= tier.capacity
    assert tier.evictions > 0
    assert not tier.put("huge", b"x" * 20_000)
    assert "huge" not in tier


def test_lru_order() -> None:
    tier = _tier(3, 10, "lru")
    for k in "abc":
        tier.put(k, b"x" * 10)
    tier.get("a")
    tier.put("d", b"x" * 10)
    assert "b" not in tier and all(k in tier for k in "acd")


def test_slru_resists_a_scan() -> None:
    tier = _tier(10, 10, "slru")
    for k in ("h1", "h2", "h3"):
        tier.put(k, b"x" * 10)
        tier.get(k)  # second use: protected
    for i in range(100):  # one sequential pass over many keys
        tier.put(f"scan{i}", b"x" * 10)
    assert all(k in tier for k in ("h1", "h2", "h3"))


def test_tinylfu_beats_lru_under_zipf() -> None:
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, 385)
    p /= p.sum()
    trace = [f"k{i}" for i in rng.choice(384, size=5000, p=p)]
    rates = {}
    for policy in ("lru", "slru", "tinylfu"):
        tier = _tier(96, 1000, policy)
        hits = 0
        for k in trace:
            if tier.get(k) is not None:
                hits += 1
            else:
                tier.put(k, b"x" * 1000)
        rates[policy] = hits / len(trace)
    assert rates["tinylfu"] > rates["slru"] > rates["lru"]


def test_frequency_sketch_ages() -> None:
    sketch = FrequencySketch(16)
    for _ in range(100):
        sketch.increment("a")
    high = sketch.frequency("a")
    for i in range(10 * sketch.width):
        sketch.increment(f"other{i % 7}")
    assert sketch.frequency("a") < high


@pytest.mark.parametrize("policy", ["lru", "slru", "tinylfu"])
def test_thread_safe(policy: str) -> None:
    tier = _tier(50, 100, policy)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                k = f"k{rng.randrange(200)}"
                if rng.random() < 0.5:
                    tier.put(k, k.encode() * 10)
                else:
                    v = tier.get(k)
                    assert v is None or v == k.encode() * 10
                if rng.random() < 0.01:
                    tier.delete_prefix("k1")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert tier.used_bytes() <= tier.capacity
    held = tier.keys()
    payload = sum(len(tier.peek(k) or b"") for k in held)
    assert tier.used_bytes() == payload + len(held) * tier.entry_overhead
