"""The warm read right after the cold pass: memory + disk against memory only (issue 19, item 3).

Each run: a fresh cache (new name, new folder) -> a cold full read -> immediately a warm
full read, once with a memory-only cache and once with a memory + disk cache (the order
alternates between runs). The warm read of the memory + disk cache starts while the
background writer may still be storing the cold pass's fills; the target is that it
costs no more than 1.05x the memory-only warm read of the same run.

Data: 48x256x256 float32 in 192 zstd chunks of (1, 128, 128), zarr v3, on the local
moto S3 (its own process) with 20 ms latency per request; xarray + Dask 8 threads.

    python benchmarks/warm_after_cold.py                 # 5 runs
    python benchmarks/warm_after_cold.py --runs 9 --latency-ms 50
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _background_cpu() -> dict[int, int]:
    """CPU time (clock ticks) of each of this process's xarray-zcache background threads
    (the disk writer, maintenance), from ``/proc`` (Linux; empty elsewhere)."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[int, int] = {}
    for tid, name in names.items():
        if tid is None or not name.startswith("zcache-"):
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = int(fields[11]) + int(fields[12])  # utime + stime
    return out


def _thread_cpu() -> dict[int, tuple[str, int]]:
    """CPU time (clock ticks) and name of every thread of this process, from ``/proc``."""
    out: dict[int, tuple[str, int]] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()
        out[int(tid)] = (head.split("(", 1)[1], int(fields[11]) + int(fields[12]))
    return out


def _by_thread(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> str:
    """The threads that used CPU between two `_thread_cpu` snapshots, most first (ms)."""
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    used: dict[str, float] = {}
    for tid, (comm, n) in after.items():
        name = names.get(tid, comm).rstrip("_0123456789")
        d = n - before.get(tid, (comm, 0))[1]
        if d:
            label = "main" if tid == os.getpid() else name
            used[label] = used.get(label, 0.0) + d * tick_ms
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))


class _GcTimer:
    """Milliseconds the garbage collector ran (all generations) until `stop`, and how many
    of its runs were full (generation 2) collections."""

    def __init__(self) -> None:
        import gc

        self.total = 0.0
        self.full = 0
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0
            self.full += info.get("generation") == 2

    def stop(self) -> float:
        import gc

        gc.callbacks.remove(self._callback)
        return 1000 * self.total


def _one(env: dict[str, Any], disk: bool, tag: str) -> dict[str, float]:
    """Fresh cache -> cold read -> warm read; the seconds of each and of the flush after,
    and the CPU the background threads used during the warm read."""
    import numpy as np
    from common import analysis, quiet, timed
    from readers import opener, zcache_config

    from xarray_zcache.registry import get_cache

    s, server = env["settings"], env["server"]
    # (--control: the "memory + disk" side is memory only too: the noise floor of the ratio)
    folder = os.path.join(env["work"], tag) if disk and not env["control"] else None
    spec = {
        "type": "zcache",
        "url": s.url(),
        "so": server.default_storage_options(tag),
        "config": zcache_config(tag, folder),
    }
    open_ = opener(spec)
    with quiet():
        ds = open_()
    cold, got = timed(lambda: analysis(ds, s.threads))
    cache = get_cache(open_.config)  # type: ignore[attr-defined]
    backlog = cache.disk_backlog
    before = cache.stats()
    if env["collect"]:  # both configurations start the warm read with no collection due
        import gc

        gc.collect()
    cpu0 = _background_cpu()
    threads0 = _thread_cpu()
    gc_time = _GcTimer()
    server.requests.reset()
    p0 = time.process_time()
    warm, got2 = timed(lambda: analysis(ds, s.threads))
    warm_cpu = time.process_time() - p0
    gc_ms = gc_time.stop()
    cpu1 = _background_cpu()
    threads1 = _thread_cpu()
    requests = [f"{r.method} {r.key or ''}" for r in server.requests.records()]
    ticks = sum(n - cpu0.get(tid, 0) for tid, n in cpu1.items())
    bg_ms = 1000 * ticks / os.sysconf("SC_CLK_TCK")
    assert np.allclose(got, env["expect"], rtol=1e-5) and np.allclose(got2, got)
    after = cache.stats()
    served = {
        "decoded": after.decoded_hits - before.decoded_hits,
        "memory": after.total_hits(tier="memory") - before.total_hits(tier="memory"),
        "disk": after.total_hits(tier="disk") - before.total_hits(tier="disk"),
        "decoded_misses": after.decoded_misses - before.decoded_misses,
    }
    flush, _ = timed(cache.flush)
    stats = cache.stats().to_dict()
    ds.close()
    cache.close()
    import gc

    return {
        "objects": len(gc.get_objects()),
        "cold": cold,
        "warm": warm,
        "warm_cpu": warm_cpu,
        "flush": flush,
        "backlog": backlog,
        "bg_ms": bg_ms,
        "dropped": stats.get("disk_write_failures", 0),
        "requests": requests,  # type: ignore[dict-item]
        "served": served,  # type: ignore[dict-item]
        "gc_ms": gc_ms,
        "gc_full": gc_time.full,
        "threads": _by_thread(threads0, threads1),  # type: ignore[dict-item]
    }


def _served(x: dict[str, Any]) -> str:
    v = x["served"]
    return f"{v['decoded']} / {v['memory']} / {v['disk']}; {v['decoded_misses']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--nt", type=int, default=48)
    parser.add_argument(
        "--control",
        action="store_true",
        help="A/A: both sides memory only (what the ratio varies by with no disk at all)",
    )
    parser.add_argument(
        "--collect-before-warm",
        action="store_true",
        help="run a full garbage collection just before each warm read (both configurations)",
    )
    args = parser.parse_args()

    from common import BUCKET, Settings, expected_result, quiet, write_datasets
    from restart_child import _warm_up
    from s3proc import S3Process

    s = Settings(nt=args.nt, latency=args.latency_ms / 1000, threads=args.threads)
    server = S3Process(0.0)
    work = tempfile.mkdtemp(prefix="zcache-warm-after-cold-")
    try:
        server.create_bucket(BUCKET)
        ds = write_datasets(s, server.storage_options(skip_instance_cache=True))
        server.latency = s.latency
        with quiet():
            _warm_up(s.threads)
        env = {
            "settings": s,
            "server": server,
            "work": work,
            "expect": expected_result(ds),
            "collect": args.collect_before_warm,
            "control": args.control,
        }
        _one(env, True, "warmup-disk")  # one-time costs (imports, SQLite, thread pools)
        _one(env, False, "warmup-mem")
        rows = []
        for i in range(args.runs):
            order = (False, True) if i % 2 == 0 else (True, False)
            got: dict[bool, dict[str, float]] = {}
            for disk in order:
                got[disk] = _one(env, disk, f"run{i}-{'disk' if disk else 'mem'}")
                time.sleep(0.2)
            rows.append((got[False], got[True]))
        print(
            f"\n{s.n_chunks} chunks, {s.latency * 1000:.0f} ms latency, {s.threads} threads, "
            f"{args.runs} runs (order alternates)"
            + ("; control: both sides memory only" if args.control else "")
            + ("; a full collection before each warm read" if args.collect_before_warm else "")
            + "\n"
        )
        print(
            "| run | cold, memory | warm, memory | cold, memory + disk | warm, memory + disk "
            "| ratio warm disk / memory | process CPU of the warm reads (memory / memory + disk) "
            "| write queue at warm start | background CPU during warm | flush after "
            "| disk writes dropped | warm reads served, memory + disk (decoded / memory / disk;"
            " decoded misses) | GC during warm, ms (full collections) (memory / memory + disk) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        ratios = []
        for i, (m, d) in enumerate(rows, 1):
            r = d["warm"] / m["warm"]
            ratios.append(r)
            print(
                f"| {i} | {m['cold'] * 1000:.0f} ms | {m['warm'] * 1000:.1f} ms | "
                f"{d['cold'] * 1000:.0f} ms | {d['warm'] * 1000:.1f} ms | {r:.2f}x | "
                f"{m['warm_cpu'] * 1000:.0f} / {d['warm_cpu'] * 1000:.0f} ms | "
                f"{d['backlog']:.2%} | {d['bg_ms']:.0f} ms | "
                f"{d['flush'] * 1000:.0f} ms | {d['dropped']:.0f} | "
                f"{_served(d)} | {m['gc_ms']:.0f} ({m['gc_full']}) / "
                f"{d['gc_ms']:.0f} ({d['gc_full']}) ms |"
            )
        med_m = statistics.median(m["warm"] for m, _ in rows)
        med_d = statistics.median(d["warm"] for _, d in rows)
        print(
            f"| median | | {med_m * 1000:.1f} ms | | {med_d * 1000:.1f} ms | "
            f"{statistics.median(ratios):.2f}x | "
            f"{statistics.median(m['warm_cpu'] for m, _ in rows) * 1000:.0f} / "
            f"{statistics.median(d['warm_cpu'] for _, d in rows) * 1000:.0f} ms | | | | | | |"
        )
        for i, (m, d) in enumerate(rows, 1):
            for name, x in (("memory", m), ("memory + disk", d)):
                if x["requests"]:
                    print(f"run {i}, {name}: S3 requests during the warm read: {x['requests']}")
        print("\nCPU by thread during each warm read (ms; threads of one name summed):")
        for i, (m, d) in enumerate(rows, 1):
            print(f"run {i}, memory: {m['threads']}")
            print(f"run {i}, memory + disk: {d['threads']}")
        print(
            "live objects after each run (memory / memory + disk): "
            + ", ".join(f"{m['objects']} / {d['objects']}" for m, d in rows)
        )
        ok = sum(r <= 1.05 for r in ratios)
        print(f"\nruns with warm(memory + disk) <= 1.05x warm(memory): {ok} of {len(ratios)}")
    finally:
        from xarray_zcache.registry import close_all

        close_all()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
