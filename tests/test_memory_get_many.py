"""`MemoryTier.get_many` answers, and moves entries, exactly as `get` of each key does."""

from __future__ import annotations

import random
from typing import Any

import pytest

from xarray_zcache.cache.memory import MemoryTier, entry_overhead


def _state(tier: MemoryTier) -> tuple[Any, ...]:
    return (
        list(tier._probation),
        list(tier._protected),
        tier.used_bytes(),
        tier.evictions,
        tier._protected_bytes,
    )


@pytest.mark.parametrize("policy", ["lru", "slru", "tinylfu"])
@pytest.mark.parametrize("seed", range(8))
def test_get_many_is_get_of_each_key(policy: Any, seed: int) -> None:
    rnd = random.Random(seed)
    capacity = 30 * (100 + entry_overhead())
    one, many = MemoryTier(capacity, policy=policy), MemoryTier(capacity, policy=policy)
    now = 1_000.0
    for step in range(40):
        for _ in range(rnd.randrange(0, 8)):
            key, size = f"k{rnd.randrange(50)}", rnd.randrange(1, 100)
            expires = rnd.choice([None, None, now + rnd.uniform(-5, 5)])
            value = bytes([step % 256]) * size
            assert one.put(key, value, expires=expires) == many.put(key, value, expires=expires)
        keys = [f"k{rnd.randrange(60)}" for _ in range(rnd.randrange(0, 40))]
        assert many.get_many(keys, now) == [one.get(key, now) for key in keys]
        assert _state(many) == _state(one)
        now += rnd.uniform(0, 2)


@pytest.mark.parametrize("policy", ["lru", "slru", "tinylfu"])
def test_get_many_reads_the_clock_under_the_lock(policy: Any) -> None:
    """An entry that expires while `get_many` waits for the lock (held by a long
    `drop_expired` or `delete_prefix` of another thread) is a miss, as for `get`, which
    reads the clock under the lock: the batch must not compare with the time before."""
    import threading
    import time

    tier = MemoryTier(1_000_000, policy=policy)
    results: dict[str, Any] = {}
    for name in ("get", "get_many"):
        tier.put("k", b"v", expires=time.time() + 0.3)
        with tier._lock:  # another thread's long operation under the lock
            if name == "get":
                worker = threading.Thread(target=lambda: results.update(get=[tier.get("k")]))
            else:
                worker = threading.Thread(
                    target=lambda: results.update(get_many=tier.get_many(["k"]))
                )
            worker.start()
            time.sleep(0.6)  # the entry expires meanwhile
        worker.join()
    assert results == {"get": [None], "get_many": [None]}
    assert "k" not in tier
