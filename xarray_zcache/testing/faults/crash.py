"""SIGKILL scenarios: a process filling the disk tier killed at random moments, or at one
precise point of a write (the disk tier's named hooks, or between the inner write and the
invalidation of the cache)."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import random
import signal
import time
from multiprocessing.synchronize import Event
from typing import Final

from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import Buffer

from xarray_zcache.cache.disk import hooks
from xarray_zcache.testing.faults.report import ScenarioResult, timed
from xarray_zcache.testing.faults.stores import (
    cached,
    compare_all,
    dataset_keys,
    forget_caches,
    local_store,
    unique,
    verify_folder,
)
from xarray_zcache.testing.faults.values import buf, make_value

__all__ = [
    "CRASH_DISK",
    "CRASH_MEMORY",
    "CRASH_POINTS",
    "DISK_CRASH_POINTS",
    "crash_at",
    "run_crash_rounds",
]

CRASH_MEMORY = "256kB"  # small: most reads reach the disk tier
CRASH_DISK = 600_000  # small: the children evict while they fill

#: Crash points inside the disk tier, and the named hook (``cache/disk/hooks.py``) each uses:
#: between the two transactions of a put, half-way through its temp file (header written,
#: payload not), in the middle of an eviction (after the third payload file unlinked), about
#: to append a record to a segment (its row not committed).
DISK_CRASH_POINTS: Final = {
    "before_replace": "before-replace",
    "mid_temp_write": "after-header-write",
    "mid_eviction": "after-unlink",
    "before_append": "before-append",
}
#: The points of payload files: their scenario runs with packing off.
_FILE_POINTS: Final = frozenset({"before_replace", "mid_temp_write", "mid_eviction"})
#: Every point :func:`crash_at` knows; the last three kill the process between the write to
#: the inner store and the cache's invalidation (the inner store's method is wrapped).
CRASH_POINTS: Final = (
    *DISK_CRASH_POINTS,
    "after_inner_write",
    "after_inner_delete",
    "after_inner_write_of_missing_key",
)
_UNLINKS_BEFORE_DEATH = 3


def _crash_child(
    data: str, cache_dir: str, seed: int, ready: Event, writes: bool, name: str
) -> None:  # pragma: no cover - runs in a child process that is SIGKILLed
    """Fill the disk tier through a `CachedStore` until killed (optionally writing too)."""
    store = cached(data, cache_dir, name, memory=CRASH_MEMORY, disk=CRASH_DISK)
    keys = dataset_keys(40)
    rng = random.Random(seed)
    cache = store.cache
    i = 0
    while True:
        key = rng.choice(keys)
        op = rng.random()
        if writes and op < 0.10:
            store.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))
        elif writes and op < 0.13:
            store.delete_sync(key)
        elif op < 0.25:
            store.get_sync(key, byte_range=RangeByteRequest(16, 48))
        elif op < 0.27:
            cache.flush()
        elif op < 0.28:
            cache.maintain()
        else:
            store.get_sync(key)
        i += 1
        if i == 30:
            ready.set()


def run_crash_rounds(
    workdir: str | os.PathLike[str],
    rounds: int,
    seed: int = 0,
    *,
    child_writes: bool = False,
    max_delay: float = 0.4,
) -> ScenarioResult:
    """SIGKILL a process filling the disk tier at random moments, ``rounds`` times in a row.

    Between rounds the parent changes some keys through its own `CachedStore` (so stale
    entries would show). After each kill a fresh cache (empty memory, new `DiskTier`) reads
    every key, whole and ranged, and must get what the inner store holds; `DiskTier.verify`
    must find only what a crash may leave (rows without file, temp files) and
    ``verify(repair=True)`` must leave the folder consistent.
    """
    result = ScenarioResult("SIGKILL while filling" + (" and writing" if child_writes else ""))
    work = pathlib.Path(workdir)
    data, cache_dir = work / "data", work / "cache"
    keys = dataset_keys(40)
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    with timed(result):
        writer = cached(data, cache_dir, unique("writer"), memory=CRASH_MEMORY, disk=CRASH_DISK)
        reference = local_store(data)
        for key in keys:
            writer.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))
        writer.cache.flush()
        for r in range(rounds):
            for key in rng.sample(keys, 4):
                writer.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))
            for key in rng.sample(keys, 2):
                if rng.random() < 0.5:
                    writer.delete_sync(key)
                else:
                    writer.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))
            writer.cache.flush()
            ready = ctx.Event()
            proc = ctx.Process(
                target=_crash_child,
                args=(str(data), str(cache_dir), seed * 1000 + r, ready, child_writes, "child"),
                daemon=True,
            )
            proc.start()
            try:
                deadline = time.monotonic() + 60
                while not ready.wait(0.05):
                    if not proc.is_alive() or time.monotonic() > deadline:
                        result.violations += 1
                        result.note(f"round {r}: child never got going ({proc.exitcode})")
                        break
                time.sleep(rng.uniform(0.0, max_delay))
            finally:
                proc.kill()  # SIGKILL
                proc.join(30)
            result.faults += 1
            result.runs += 1
            reader = cached(data, cache_dir, unique("reader"), memory=CRASH_MEMORY, disk=CRASH_DISK)
            try:
                compare_all(reader, reference, keys, result, f"round {r}")
            finally:
                reader.cache.close()
            verify_folder(cache_dir, CRASH_DISK, result, crashed=True)
            if r % 20 == 19:
                forget_caches()
        writer.cache.close()
    return result


def _die(*_args: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _crash_at_child(data: str, cache_dir: str, point: str) -> None:  # pragma: no cover
    """Crash (SIGKILL itself) at a chosen point of a write through the cache."""
    pack = 0 if point in _FILE_POINTS else None
    store = cached(
        data, cache_dir, "crash-at", memory=CRASH_MEMORY, disk=CRASH_DISK, pack_below=pack
    )
    key = "v/c/0/0"
    store.get_sync(key)  # cached (memory and disk) with its first version
    store.cache.flush()
    disk = store.cache.disk_tier
    assert disk is not None
    if point in DISK_CRASH_POINTS:
        unlinks = 0

        def die_at_third_unlink(*_args: object) -> None:
            nonlocal unlinks
            unlinks += 1
            if unlinks == _UNLINKS_BEFORE_DEATH:
                _die()

        hook = die_at_third_unlink if point == "mid_eviction" else _die
        hooks.register(DISK_CRASH_POINTS[point], hook)
        if point == "mid_eviction":
            disk.evict(0)
        else:
            disk.put("other", b"x" * 1000)
        raise SystemExit(f"crash point {point!r} not reached")
    inner = store.inner
    if point == "after_inner_write_of_missing_key":
        # the key is missing: the read leaves a negative entry (persisted on disk)
        key = "v/c/new"
        assert store.get_sync(key) is None
        store.cache.flush()
        point = "after_inner_write"
    if point == "after_inner_write":
        real_set = inner.set_sync  # type: ignore[attr-defined]

        def set_then_die(k: str, v: Buffer) -> None:
            real_set(k, v)
            _die()

        setattr(inner, "set_sync", set_then_die)  # noqa: B010  # this store only
        store.set_sync(key, buf(make_value(key, 2)))
    elif point == "after_inner_delete":
        real_delete = inner.delete_sync  # type: ignore[attr-defined]

        def delete_then_die(k: str) -> None:
            real_delete(k)
            _die()

        setattr(inner, "delete_sync", delete_then_die)  # noqa: B010  # this store only
        store.delete_sync(key)
    raise SystemExit(f"crash point {point!r} not reached")


def crash_at(workdir: str | os.PathLike[str], point: str) -> ScenarioResult:
    """Kill a process at one precise point of a write; a fresh cache must read the truth.

    ``point`` is one of :data:`CRASH_POINTS`.
    """
    if point not in CRASH_POINTS:
        raise ValueError(f"point must be one of {CRASH_POINTS}, got {point!r}")
    result = ScenarioResult(f"SIGKILL at {point}")
    work = pathlib.Path(workdir)
    data, cache_dir = work / "data", work / "cache"
    keys = dataset_keys(12)
    reference = local_store(data)
    for key in keys:
        reference.set_sync(key, buf(make_value(key, 1)))
    with timed(result):
        pack = 0 if point in _FILE_POINTS else None  # (the others: packing as by default)
        filler = cached(
            data, cache_dir, unique("filler"), memory=CRASH_MEMORY, disk=CRASH_DISK, pack_below=pack
        )
        for key in keys:
            filler.get_sync(key)
        filler.cache.close()
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(
            target=_crash_at_child, args=(str(data), str(cache_dir), point), daemon=True
        )
        proc.start()
        proc.join(60)
        if point == "after_inner_write_of_missing_key":
            keys = [*keys, "v/c/new"]
        result.faults += 1
        result.runs += 1
        if proc.exitcode != -signal.SIGKILL:
            result.violations += 1
            result.note(f"child exit code {proc.exitcode}: crash point not reached")
        reader = cached(data, cache_dir, unique("reader"), memory=CRASH_MEMORY, disk=CRASH_DISK)
        try:
            compare_all(reader, reference, keys, result, point)
        finally:
            reader.cache.close()
        verify_folder(cache_dir, CRASH_DISK, result, crashed=True)
    return result
