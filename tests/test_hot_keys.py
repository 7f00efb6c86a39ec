"""`HotKeys.add_many` counts and prunes exactly as `add` of each key in turn does; so does
`StatsRecorder.hits_of_kind` as `hit` of each key."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from xarray_zcache.cache.recorder import HotKeys


class _Reference(HotKeys):
    """`add` as it was written first: prune with `Counter.most_common`."""

    def add(self, key: str, count: int = 1) -> None:
        self._counts[key] += count
        if len(self._counts) > 4 * self.n:
            self._counts = Counter(dict(self._counts.most_common(2 * self.n)))


@pytest.mark.parametrize("seed", range(40))
def test_add_many_is_add_of_each_key(seed: int) -> None:
    rnd = random.Random(seed)
    n = rnd.choice([1, 2, 5, 20])
    one, many = _Reference(n), HotKeys(n)
    for _ in range(15):
        pool = rnd.choice([3, 50, 300])
        keys = [f"k{rnd.randrange(pool)}" for _ in range(rnd.randrange(0, 400))]
        for key in keys:
            one.add(key)
        many.add_many(keys)
        assert list(many._counts.items()) == list(one._counts.items())
        assert many.top() == one.top()
        assert len(many._counts) <= 4 * n


def test_a_read_of_192_chunks_keeps_the_table_bounded() -> None:
    hot = HotKeys(20)
    keys = [f"t/c/{i}/0/0" for i in range(192)]
    for _ in range(3):
        hot.add_many(keys)
    assert len(hot._counts) <= 80
    assert sum(hot._counts.values()) <= 3 * 192
    assert hot.top(1)[0][1] >= 1


def test_hits_of_kind_counts_as_hit_of_each_key() -> None:
    from xarray_zcache.cache.recorder import StatsRecorder

    rnd = random.Random(7)
    one, many = StatsRecorder(5), StatsRecorder(5)
    for _ in range(10):
        keys = [f"k{rnd.randrange(40)}" for _ in range(rnd.randrange(1, 60))]
        sizes = [rnd.randrange(1, 1000) for _ in keys]
        for key, size in zip(keys, sizes, strict=True):
            one.hit("memory", "chunk", size, key)
        many.hits_of_kind("memory", "chunk", keys, sum(sizes))
    a, b = one.snapshot(), many.snapshot()
    assert a.hits == b.hits and a.hit_bytes == b.hit_bytes
    assert a.hot_keys == b.hot_keys


@pytest.mark.parametrize("seed", range(20))
def test_answer_now_many_counts_as_answer_now_of_each_read(seed: int) -> None:
    """A batch of whole-object reads, some memory hits and some known missing (a sparse
    array: chunks never written are negative entries): the answers, the counters and the
    hot keys are what `answer_now` of each read, in order, reports. The hot-key table is
    small (``top_n=1``: pruned past 4 keys), so counting the negatives of a batch before its
    hits would prune different keys."""
    from xarray_zcache.cache.hybrid import HybridCache
    from xarray_zcache.cache.request import Read
    from xarray_zcache.cache.settings import CacheSettings

    rnd = random.Random(seed)
    caches = [HybridCache(CacheSettings(memory_size=10_000_000, top_n=1)) for _ in range(2)]
    for cache in caches:  # k0..k5 in memory, k6..k11 known missing, k12.. never read
        for i in range(12):
            value = None if i >= 6 else f"value {i}".encode()
            assert cache.get_or_load_sync(Read(f"k{i}", "chunk"), lambda v=value: v) == value
    one, many = caches
    for _ in range(30):
        reads = [Read(f"k{rnd.randrange(15)}", "chunk") for _ in range(rnd.randrange(1, 12))]
        assert many.answer_now_many(reads) == [one.answer_now(r) for r in reads]
        a, b = one.stats(), many.stats()
        assert (a.hits, a.hit_bytes, a.negative_hits) == (b.hits, b.hit_bytes, b.negative_hits)
        assert b.hot_keys == a.hot_keys
    for cache in caches:
        cache.close()
