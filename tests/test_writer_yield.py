"""The background disk writer yields to cache hits (issue 19, item 3): a warm read right
after a cold one does not share the GIL with the cold read's disk writes."""

from __future__ import annotations

import asyncio
import os
import pathlib
import threading
import time
from collections.abc import Iterator

import pytest

from xarray_zcache.cache import writer as writer_mod
from xarray_zcache.cache.background import BACKGROUND_NICENESS
from xarray_zcache.cache.disk import DiskTier
from xarray_zcache.cache.hybrid import HybridCache, Read
from xarray_zcache.cache.settings import CacheSettings
from xarray_zcache.cache.writer import DiskWriter, PendingWrite


class Hits:
    """A controllable ``busy`` signal: hits are being served while ``on`` is set."""

    def __init__(self) -> None:
        self.on = threading.Event()

    def __call__(self) -> float:
        return 0.0 if self.on.is_set() else 60.0


@pytest.fixture
def tier(tmp_path: pathlib.Path) -> Iterator[DiskTier]:
    t = DiskTier(tmp_path / "c", 1 << 30)
    yield t
    t.close()


def _fill(i: int, size: int = 10) -> PendingWrite:
    return PendingWrite(f"k/{i}", b"%d" % i * size, "chunk", "ns", None, time.time_ns())


def _wait(cond: object, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_writes_wait_while_hits_come_then_go_in_one_batch(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_mod, "MAX_DEFER_S", 60.0)
    hits, drops = Hits(), []
    hits.on.set()
    writer = DiskWriter(tier, 1 << 30, lambda: drops.append(1), busy=hits)
    for i in range(5):
        assert writer.submit(_fill(i))
    time.sleep(0.2)  # (the writer has had time to write, had it not yielded)
    assert writer.batches == 0 and len(tier) == 0
    assert all(writer.pending(f"k/{i}") is not None for i in range(5))  # still readable
    hits.on.clear()
    assert _wait(lambda: len(tier) == 5)
    assert writer.batches == 1 and writer.batched_entries == 5  # coalesced
    assert writer.deferred == 1 and not drops
    writer.close()


def test_flush_does_not_wait_for_hits_to_pause(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_mod, "MAX_DEFER_S", 60.0)
    hits = Hits()
    hits.on.set()
    writer = DiskWriter(tier, 1 << 30, lambda: None, busy=hits)
    for i in range(3):
        writer.submit(_fill(i))
    done = threading.Event()
    threading.Thread(target=lambda: (writer.flush(), done.set()), daemon=True).start()
    assert done.wait(10)  # not the 60 s of MAX_DEFER_S
    assert len(tier) == 3 and writer.backlog == 0
    writer.close()


def test_a_filling_queue_is_written_even_while_hits_come(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_mod, "MAX_DEFER_S", 60.0)
    hits, drops = Hits(), []
    hits.on.set()
    writer = DiskWriter(tier, 1000, lambda: drops.append(1), busy=hits)
    for i in range(6):  # 600 of 1000 bytes queued: over YIELD_BACKLOG, nothing dropped yet
        assert writer.submit(_fill(i, 100))
    assert _wait(lambda: len(tier) == 6)
    assert not drops
    hits.on.clear()
    writer.close()


def test_memory_hits_hold_back_the_caches_disk_writes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_mod, "MAX_DEFER_S", 60.0)
    monkeypatch.setattr(writer_mod, "QUIET_S", 1.0)  # (a loaded machine pauses threads)
    cache = HybridCache(
        CacheSettings(memory_size=1 << 20, disk_path=str(tmp_path / "c"), disk_size=1 << 30)
    )
    cache.get_or_load_sync(Read("ns/hot", "chunk"), lambda: b"hot")
    cache.flush()
    stop = threading.Event()

    def hit() -> None:
        while not stop.is_set():
            cache.get_or_load_sync(Read("ns/hot", "chunk"), lambda: b"")
            time.sleep(0.001)

    t = threading.Thread(target=hit, daemon=True)
    t.start()
    try:
        time.sleep(0.05)
        writer = cache._writer
        assert writer is not None
        before = writer.batches
        assert cache.get_or_load_sync(Read("ns/new", "chunk"), lambda: b"new") == b"new"
        time.sleep(0.2)
        assert writer.batches == before and "ns/new" in writer  # waits for the hits to pause
        assert cache.get_or_load_sync(Read("ns/new", "chunk"), lambda: b"") == b"new"
    finally:
        stop.set()
        t.join(10)
    assert _wait(lambda: cache.disk_tier is not None and "ns/new" in cache.disk_tier)
    assert cache.stats().requests_sent == 2 and cache.stats().disk_write_failures == 0
    cache.close()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread priorities here")
def test_background_threads_run_at_a_lower_priority_than_readers(tmp_path: pathlib.Path) -> None:
    """The disk writer and maintenance threads lower their own scheduling priority
    (`background.lower_priority`): on a busy machine the kernel runs a reader's thread
    first. The calling (reading) thread's priority does not change."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are a Linux feature")
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    cache = HybridCache(CacheSettings(disk_path=str(tmp_path / "c"), disk_size=1 << 30))
    try:
        cache.start_maintenance()

        async def load() -> bytes:
            return b"x" * 100

        asyncio.run(cache.get_or_load(Read("ns/k/c/0", "chunk"), load))  # a fill: queued
        cache.flush()

        def niceness(name: str) -> int | None:
            for t in threading.enumerate():
                if t.name == name and t.native_id is not None:
                    return os.getpriority(os.PRIO_PROCESS, t.native_id)
            return None

        assert _wait(lambda: niceness("zcache-disk-writer") is not None)
        assert niceness("zcache-disk-writer") == min(19, mine + BACKGROUND_NICENESS)
        assert _wait(lambda: niceness("zcache-maintenance") is not None)
        assert _wait(lambda: niceness("zcache-maintenance") == min(19, mine + BACKGROUND_NICENESS))
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    finally:
        cache.close()
