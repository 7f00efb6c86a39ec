"""Micro-benchmarks for the per-operation targets.

* store-level memory hit: ``CachedStore.get`` (async, over an `FsspecStore` on the
  local S3: the path zarr takes for remote data) vs ``MemoryStore.get`` for the same
  1 MiB value; also the sync path (``SyncCachedStore.get_sync`` over a MemoryStore vs
  ``MemoryStore.get_sync``) for information;
* disk-hit latency with 1,000 vs 1,000,000 entries in the SQLite index;
* bookkeeping bytes per memory entry (pympler).
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import time
from typing import Any

from common import Settings, median

# -- memory hit ---------------------------------------------------------------------------------


def _per_call(fn: Any, calls: int, rounds: int = 9) -> list[float]:
    """Seconds per call of ``fn(calls)`` (which loops ``calls`` times), one value per round."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(calls)
        out.append((time.perf_counter() - t0) / calls)
    return out


def memory_hit(s: Settings, server: Any) -> dict[str, Any]:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import FsspecStore, MemoryStore

    from xarray_zcache import CacheConfig, CachedStore
    from xarray_zcache.registry import get_cache

    proto = default_buffer_prototype()
    value = proto.buffer.from_bytes(os.urandom(s.micro_value))
    key = "micro/c/0"
    fs = server.filesystem()
    fs.pipe_file(f"zcache-bench/{key}", value.to_bytes())
    cfg = CacheConfig().with_name("bench-micro").with_memory_size(64 << 20).without_disk_cache()
    inner = FsspecStore.from_url(
        "s3://zcache-bench", storage_options=server.storage_options("micro"), read_only=True
    )
    cached = CachedStore(inner, cfg)
    mem = MemoryStore()
    sync(mem.set(key, value))
    assert sync(cached.get(key, proto)) is not None  # the miss: fills the memory tier

    def async_loop(store: Any) -> Any:
        async def run(n: int) -> None:
            get = store.get
            for _ in range(n):
                await get(key, proto)

        return lambda n: sync(run(n))

    n = s.micro_calls
    t_z = _per_call(async_loop(cached), n)
    t_m = _per_call(async_loop(mem), n)

    # sync path: SyncCachedStore over a MemoryStore (hits never touch the inner store)
    cfg2 = cfg.with_name("bench-micro-sync")
    inner2 = MemoryStore()
    sync(inner2.set(key, value))
    cached2 = CachedStore(inner2, cfg2)
    cached2.get_sync(key, prototype=proto)

    def sync_loop(store: Any) -> Any:
        def run(n: int) -> None:
            get = store.get_sync
            for _ in range(n):
                get(key, prototype=proto)

        return run

    t_zs = _per_call(sync_loop(cached2), n)
    t_ms = _per_call(sync_loop(inner2), n)
    hits = get_cache(cfg).stats().total_hits(tier="memory")
    get_cache(cfg).close()
    get_cache(cfg2).close()
    # best of the rounds (the usual micro-benchmark statistic: the least disturbed one)
    return {
        "value_bytes": s.micro_value,
        "calls_per_round": n,
        "rounds": len(t_z),
        "zcache_get_us": min(t_z) * 1e6,
        "memorystore_get_us": min(t_m) * 1e6,
        "ratio": min(t_z) / min(t_m),
        "ratio_median": median(t_z) / median(t_m),
        "zcache_get_sync_us": min(t_zs) * 1e6,
        "memorystore_get_sync_us": min(t_ms) * 1e6,
        "ratio_sync": min(t_zs) / min(t_ms),
        "memory_hits_counted": hits,
    }


# -- disk index scale ---------------------------------------------------------------------------

_FAKE_NS = "s3+http://127.0.0.1:9/zcache-bench/dataset.zarr"


def _fill_index_directly(db: str, n: int, size: int) -> float:
    """Insert ``n`` synthetic rows (no payload files) straight into the SQLite index.

    Going through ``put()`` would write a payload file and run two transactions per
    entry (hours for 1,000,000). Here the rows are bulk-inserted in key order in one
    transaction, with the ``totals`` triggers dropped meanwhile (and ``totals``
    updated once, then the triggers re-created from their stored SQL), so the index
    ends up exactly as if the rows had been stored one by one, minus the files.
    """
    t0 = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    # a bulk load: no WAL copy, no fsync (DiskTier switches the file back to WAL when it opens)
    conn.execute("PRAGMA journal_mode=MEMORY")
    conn.execute("PRAGMA synchronous=OFF")
    triggers = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'entries'"
    ).fetchall()
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    for name, _sql in triggers:
        conn.execute(f'DROP TRIGGER "{name}"')
    keys = sorted(
        f"{_FAKE_NS}/filler/c/{i // 10000}/{(i // 100) % 100}/{i % 100}" for i in range(n)
    )
    # accessed a day to an hour ago, i.e. before the real entries: eviction would take these
    # first. Increasing with the key: both B-trees are filled in order (fast)
    step = 82800 / max(1, n)
    rows = (
        (k, _FAKE_NS, "chunk", size, now - 86400, now - 86400 + i * step, 0, None, 0, 0)
        for i, k in enumerate(keys)
    )
    conn.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    conn.execute("UPDATE totals SET used = used + ?, count = count + ? WHERE id = 0", (n * size, n))
    for _name, sql in triggers:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - t0


def _disk_hits(path: str, extra_rows: int, s: Settings) -> dict[str, Any]:
    from xarray_zcache.cache.disk import DiskTier

    payload_size = 64 << 10
    n_real = min(1000, s.index_small)
    shutil.rmtree(path, ignore_errors=True)
    tier = DiskTier(path, 1 << 50)
    rng = random.Random(0)
    payload = os.urandom(payload_size)
    keys = [f"{_FAKE_NS}/t2m/c/{i}/0/0" for i in range(n_real)]
    for k in keys:
        tier.put(k, payload, namespace=_FAKE_NS)
    fill_seconds = 0.0
    if extra_rows:
        tier.close()
        fill_seconds = _fill_index_directly(
            os.path.join(path, "index.db"), extra_rows, payload_size
        )
        tier = DiskTier(path, 1 << 50)
    entries = len(tier)
    order = [rng.choice(keys) for _ in range(3 * n_real)]
    for k in order[:200]:  # warm the page cache and the connection
        tier.get(k)
    lat = []
    for k in order:
        t0 = time.perf_counter()
        v = tier.get(k)
        lat.append(time.perf_counter() - t0)
        assert v is not None
    t0 = time.perf_counter()
    tier.flush()  # the batched access-stat UPDATEs (done about once a second on the hit path)
    flush_seconds = time.perf_counter() - t0
    # one more put: index maintenance (upsert, totals) at this size
    t0 = time.perf_counter()
    tier.put(f"{_FAKE_NS}/t2m/c/new/0/0", payload, namespace=_FAKE_NS)
    put_seconds = time.perf_counter() - t0
    tier.close()
    lat.sort()
    return {
        "entries": entries,
        "rows_inserted_directly": extra_rows,
        "direct_fill_seconds": fill_seconds,
        "payload_bytes": payload_size,
        "gets": len(lat),
        "median_us": lat[len(lat) // 2] * 1e6,
        "mean_us": sum(lat) / len(lat) * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
        "max_us": lat[-1] * 1e6,
        "over_1ms": sum(1 for x in lat if x > 1e-3),
        "mean_us_without_slowest_1pct": sum(lat[: int(len(lat) * 0.99)])
        / int(len(lat) * 0.99)
        * 1e6,
        "final_flush_ms": flush_seconds * 1e3,
        "put_ms": put_seconds * 1e3,
    }


def disk_index_scale(s: Settings, workdir: str) -> dict[str, Any]:
    small = _disk_hits(os.path.join(workdir, "index-small"), max(0, s.index_small - 1000), s)
    large = _disk_hits(os.path.join(workdir, "index-large"), max(0, s.index_large - 1000), s)
    shutil.rmtree(os.path.join(workdir, "index-large"), ignore_errors=True)
    return {
        "small": small,
        "large": large,
        "ratio_median": large["median_us"] / small["median_us"],
        "ratio_mean": large["mean_us"] / small["mean_us"],
    }


# -- bookkeeping per memory entry ---------------------------------------------------------------


def entry_bookkeeping(n: int = 2000) -> dict[str, Any]:
    """Bytes per entry, measured with pympler, payloads excluded.

    * ``memory_tier``: the MemoryTier's own structures (dict slot, key, entry record);
    * ``whole_cache``: the growth of a memory-only HybridCache per entry, counting
      every structure that grows with the number of entries (tier, stats, access-rate
      tracker, pending writes...), after each entry was put once and hit once; the
      lookups use fresh key strings, as `CachedStore` builds them per call;
    * ``trace_per_access``: the access-analytics trace (if any) per recorded read.
      pympler's ``asizeof`` does not look inside a ``collections.deque``, so the
      trace's records are measured separately (as a list) and are *not* in
      ``whole_cache``; the trace is bounded (``trace_capacity`` records).
    """
    from pympler.asizeof import asizeof

    from xarray_zcache import CacheConfig
    from xarray_zcache.cache.hybrid import HybridCache, Read
    from xarray_zcache.cache.memory import MemoryTier, entry_overhead

    payload = b"x" * 64  # one shared object: counted once by asizeof
    fmt = "s3+http://127.0.0.1:9000/zcache-bench/dataset.zarr/t2m/c/{}/0/0"
    keys = [fmt.format(i) for i in range(n)]

    tier = MemoryTier(1 << 40)
    empty = asizeof(tier)
    for k in keys:
        tier.put(k, payload)
    per_tier = (asizeof(tier) - empty) / n

    cache = HybridCache(CacheConfig().with_memory_size(1 << 40).without_disk_cache())
    empty = asizeof(cache)
    for i, k in enumerate(keys):
        cache.put(k, payload, kind="chunk", namespace="ns")
        cache.get_or_load_sync(Read(fmt.format(i), "chunk"), lambda: None)  # a fresh string
    per_cache = (asizeof(cache) - empty) / n
    out: dict[str, Any] = {
        "entries": n,
        "key_chars": len(keys[0]),
        "declared_entry_overhead": entry_overhead(),
        "memory_tier": per_tier,
        "whole_cache": per_cache,
    }
    trace = getattr(cache, "trace", None)
    if trace is not None and hasattr(trace, "snapshot"):
        records = trace.snapshot()
        if records:
            per_access = asizeof(records) / len(records)
            capacity = getattr(getattr(trace, "_items", None), "maxlen", None)
            out["trace_per_access"] = per_access
            out["trace_capacity"] = capacity
            if capacity:
                out["trace_bytes_at_capacity"] = per_access * capacity
    cache.close()
    return out
