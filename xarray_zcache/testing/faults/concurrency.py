"""Concurrency: several processes and threads reading and writing one disk folder."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import random
import threading
from collections import Counter
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from xarray_zcache.cache.freshness import ObjectChanged
from xarray_zcache.testing.faults.report import ScenarioResult, timed
from xarray_zcache.testing.faults.stores import (
    cached,
    compare_all,
    dataset_keys,
    local_store,
    unique,
    verify_folder,
)
from xarray_zcache.testing.faults.values import (
    UNIT,
    buf,
    check_slice,
    check_value,
    make_value,
    parse_unit,
    stress_value,
)

__all__ = ["STRESS_DISK", "STRESS_KEYS", "STRESS_MEMORY", "run_stress"]

STRESS_MEMORY = "128kB"  # small: most reads reach the shared disk folder
STRESS_DISK = 400_000  # small: constant eviction
STRESS_KEYS = 48


def _check_read(key: str, got: bytes | None, byte_range: ByteRequest | None) -> bool:
    """Whether ``got`` (a read of ``key`` with ``byte_range``) is part of one valid value."""
    if got is None:
        return True  # deleted (by its owner) or not written yet: nothing to check
    if byte_range is None:
        return check_value(key, got) is not None
    if isinstance(byte_range, RangeByteRequest):
        return check_slice(key, got, byte_range.start, byte_range.end)
    if isinstance(byte_range, OffsetByteRequest):
        return check_slice(key, got, byte_range.offset, None)
    assert isinstance(byte_range, SuffixByteRequest)
    parsed = parse_unit(key, got[:UNIT])
    if parsed is None:
        return False
    version, nunits = parsed
    full = make_value(key, version, nunits)
    return got == full[max(0, len(full) - byte_range.suffix) :]


def _random_range(rng: random.Random) -> ByteRequest:
    start = UNIT * rng.randrange(4)  # every value has >= 4 units
    pick = rng.random()
    if pick < 0.5:
        return RangeByteRequest(start, start + UNIT * rng.randint(1, 40))
    if pick < 0.75:
        return OffsetByteRequest(start)
    return SuffixByteRequest(UNIT * rng.randint(1, 40))


def _stress_worker(
    data: str,
    cache_dir: str,
    index: int,
    nproc: int,
    threads: int,
    ops: int,
    seed: int,
    barrier: Barrier,
    out: Queue[tuple[int, dict[str, int], list[str]]],
    shared_writers: bool = False,
) -> None:  # pragma: no cover - runs in a child process
    proto = default_buffer_prototype()
    store = cached(data, cache_dir, "stress", memory=STRESS_MEMORY, disk=STRESS_DISK)
    cache = store.cache
    keys = dataset_keys(STRESS_KEYS)
    owned = keys if shared_writers else [k for i, k in enumerate(keys) if i % nproc == index]
    counts: Counter[str] = Counter()
    notes: list[str] = []
    lock = threading.Lock()
    version = iter(range((index + 1) << 24, (index + 2) << 24))

    def note(text: str) -> None:
        with lock:
            if len(notes) < 10:
                notes.append(text)

    def run(t: int) -> None:
        rng = random.Random(seed * 1000 + index * 16 + t)
        use_async = t % 2 == 1  # half the threads go through zarr's event loop
        barrier.wait()
        for n in range(ops):
            key = rng.choice(keys)
            op = rng.random()
            try:
                if op < 0.12:
                    key = rng.choice(owned)
                    with lock:
                        v = next(version)
                    value = buf(stress_value(key, v))
                    if use_async:
                        sync(store.set(key, value))
                    else:
                        store.set_sync(key, value)
                    counts["writes"] += 1
                elif op < 0.16:
                    key = rng.choice(owned)
                    if use_async:
                        sync(store.delete(key))
                    else:
                        store.delete_sync(key)
                    counts["deletes"] += 1
                else:
                    byte_range = _random_range(rng) if op < 0.4 else None
                    for attempt in range(1, 11):
                        try:
                            if use_async:
                                got = sync(store.get(key, proto, byte_range))
                            else:
                                got = store.get_sync(key, byte_range=byte_range)
                            break
                        except ObjectChanged:
                            # another process rewrote the object while parts of it were
                            # cached here: the documented answer is "read again" (the
                            # writers here rewrite the same few keys without pause)
                            counts["changed_retries"] += 1
                            if attempt == 10:
                                raise
                    counts["reads"] += 1
                    data_ = None if got is None else got.to_bytes()
                    if not _check_read(key, data_, byte_range):
                        counts["wrong"] += 1
                        note(f"wrong bytes for {key} {byte_range}")
            except Exception as exc:
                counts["errors"] += 1
                note(f"{type(exc).__name__}: {exc}")
            if n % 25 == 0:
                if cache.memory_tier.used_bytes() > cache.memory_tier.capacity:
                    counts["bounds"] += 1
                    note(f"memory {cache.memory_tier.used_bytes()} > {cache.memory_tier.capacity}")
                if (
                    cache.disk_tier is not None
                    and cache.disk_tier.used_bytes() > cache.disk_tier.capacity
                ):
                    counts["bounds"] += 1
                    note(f"disk {cache.disk_tier.used_bytes()} > {cache.disk_tier.capacity}")

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stats = cache.stats()
    counts["memory_hits"] = stats.total_hits(tier="memory")
    counts["disk_hits"] = stats.total_hits(tier="disk")
    counts["misses"] = stats.total_misses()
    counts["disk_evictions"] = stats.evictions["disk"]
    cache.close()
    out.put((index, dict(counts), notes))


def run_stress(
    workdir: str | os.PathLike[str],
    processes: int = 4,
    threads: int = 4,
    ops: int = 200,
    seed: int = 0,
    *,
    shared_writers: bool = False,
) -> ScenarioResult:
    """``processes`` x ``threads`` reading and writing overlapping keys on one disk folder.

    Every key is read by everyone (whole, ranges, offsets, suffixes; through ``get_sync``
    and through zarr's event loop) and written or deleted by the threads of one process (its
    owner). Values are self-describing: a read must be (part of) a complete value of the
    key read, never torn or another key's. Memory and disk use stay within their budgets.
    At the end a fresh cache must read exactly what the inner store holds, and the folder
    must verify clean. With ``shared_writers`` every process writes every key (concurrent
    writers of one key in several processes).
    """
    result = ScenarioResult(
        f"{processes} processes x {threads} threads, one disk folder"
        + (", every process writing every key" if shared_writers else "")
    )
    work = pathlib.Path(workdir)
    data, cache_dir = work / "data", work / "cache"
    keys = dataset_keys(STRESS_KEYS)
    reference = local_store(data)
    for key in keys:
        reference.set_sync(key, buf(stress_value(key, 1)))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes * threads)
    out = ctx.Queue()
    with timed(result):
        procs = [
            ctx.Process(
                target=_stress_worker,
                args=(
                    str(data),
                    str(cache_dir),
                    i,
                    processes,
                    threads,
                    ops,
                    seed,
                    barrier,
                    out,
                    shared_writers,
                ),
                daemon=True,
            )
            for i in range(processes)
        ]
        for p in procs:
            p.start()
        reports = []
        for _ in procs:
            try:
                reports.append(out.get(timeout=600))
            except Exception:
                result.violations += 1
                result.note("a stress process did not report")
                break
        for p in procs:
            p.join(30)
            if p.exitcode != 0:
                result.violations += 1
                result.note(f"stress process exit code {p.exitcode}")
        totals: Counter[str] = Counter()
        for _index, counts, _notes in reports:
            totals.update(counts)
        result.note(
            "hits memory/disk, misses, disk evictions: "
            f"{totals['memory_hits']}/{totals['disk_hits']}, {totals['misses']}, "
            f"{totals['disk_evictions']}"
        )
        for _index, counts, notes in reports:
            result.runs += sum(counts.get(k, 0) for k in ("reads", "writes", "deletes"))
            result.faults += counts.get("writes", 0) + counts.get("deletes", 0)
            result.wrong += counts.get("wrong", 0)
            result.errors_to_user += counts.get("errors", 0)
            result.violations += counts.get("bounds", 0)
            for text in notes:
                result.note(text)
        reader = cached(data, cache_dir, unique("reader"), memory=STRESS_MEMORY, disk=STRESS_DISK)
        try:
            compare_all(reader, reference, keys, result, "after the stress run")
        finally:
            reader.cache.close()
        verify_folder(cache_dir, STRESS_DISK, result, crashed=False)
    return result
