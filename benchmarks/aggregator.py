"""Scale benchmark of the scheduler-side aggregator (`ZCacheSchedulerPlugin`).

Drives the aggregator's ``zcache_report`` handler with N simulated workers, each
reporting once per simulated second with a realistic payload (a full `CacheStats`
dict, its top-N hot keys with growing counts, and every 15th report the access
analytics), and prints the scheduler CPU share (CPU seconds spent per wall second
of reports, i.e. the fraction of one core) and the memory the aggregator holds
over time (``pympler.asizeof`` of the plugin, measured outside the timed part),
which must stop growing. Each report is also packed and
unpacked with msgpack, as the scheduler's comm would.

Run: ``python benchmarks/aggregator.py --workers 1000 --seconds 60``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import msgpack
from pympler.asizeof import asizeof

from xarray_zcache.cache.stats import KINDS, TIERS, CacheStats
from xarray_zcache.distributed.scheduler import ZCacheSchedulerPlugin


class _AllWorkers(dict[str, Any]):
    """Stands in for ``Scheduler.workers``: every simulated worker is a member."""

    def __contains__(self, key: object) -> bool:
        return True


class _Scheduler:
    """The two attributes of a Scheduler the aggregator uses (handlers, workers)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.workers = _AllWorkers()


def _stats(rng: random.Random, t: int) -> list[int]:
    s = CacheStats()
    for tier in TIERS:
        for kind in KINDS:
            s.hits[tier][kind] = t * rng.randint(10, 200)
            s.hit_bytes[tier][kind] = s.hits[tier][kind] * 1_000_000
    s.misses = {"metadata": t, "chunk": t * rng.randint(1, 50)}
    s.miss_bytes = {k: v * 1_000_000 for k, v in s.misses.items()}
    s.memory_used, s.memory_capacity = rng.randint(1, 10) * 10**9, 10**10
    s.disk_used, s.disk_capacity = rng.randint(1, 50) * 10**9, 5 * 10**10
    s.memory_entries, s.disk_entries = 5_000, 50_000
    return s.to_vector()


def _report(worker: int, t: int, rng: random.Random, n_arrays: int) -> dict[str, Any]:
    hot = []
    for j in range(20):
        arr = rng.randrange(n_arrays)
        chunk = (worker * 7 + j) % 500
        key = f"s3://era5-bucket/reanalysis/single-levels.zarr/var{arr}/c/{chunk}/0/0"
        hot.append([key, t * (20 - j) + rng.randint(0, 5), rng.choice(["memory", "disk"])])
    report: dict[str, Any] = {
        "worker": f"tcp://10.0.{worker // 250}.{worker % 250}:40000",
        "name": f"worker-{worker}",
        "host": f"10.0.{worker // 250}.{worker % 250}",
        "time": float(t),
        "stats": _stats(rng, t),
        "hot": hot,
    }
    if t % 15 == 0:
        report["analytics"] = {
            "trace_length": 50_000,
            "memory_curve": {"0.5": 0.4, "1.0": 0.6, "2.0": 0.8, "4.0": 0.9},
            "disk_curve": {"0.5": 0.8, "1.0": 0.9, "2.0": 0.95, "4.0": 0.97},
            "recommendations": ["memory tier: 20 GB would serve 80% of reads instead of 60%"],
            "patterns": {
                f"s3://era5-bucket/reanalysis/single-levels.zarr/var{a}": {
                    "accesses": 1000,
                    "sequential_fraction": 0.9,
                    "pattern": "sequential",
                }
                for a in range(min(n_arrays, 50))
            },
        }
    return report


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=60, help="simulated report rounds")
    parser.add_argument("--arrays", type=int, default=20, help="arrays the workers read")
    args = parser.parse_args(argv)

    plugin = ZCacheSchedulerPlugin(promotion_threshold=5.0)
    await plugin.start(_Scheduler())  # type: ignore[arg-type]
    rng = random.Random(0)
    # pre-build payloads for two rounds and vary the counts: building them is not the
    # scheduler's work, only unpacking and handling them is
    print(f"{args.workers} simulated workers, one report each per simulated second")
    print(
        f"{'round':>6} {'cpu s/round':>12} {'core share':>11} {'aggregator MiB':>15} "
        f"{'decisions':>10}"
    )
    shares = []
    for t in range(1, args.seconds + 1):
        packed = [msgpack.packb(_report(w, t, rng, args.arrays)) for w in range(args.workers)]
        c0 = time.process_time()
        for blob in packed:
            plugin.zcache_report(report=msgpack.unpackb(blob, use_list=False))
        cpu = time.process_time() - c0
        shares.append(cpu)  # CPU seconds for one second's worth of reports
        if t == 1 or t % 10 == 0 or t == args.seconds:
            held = asizeof(plugin)  # everything the aggregator holds (outside the timing)
            print(
                f"{t:>6} {cpu:>12.3f} {cpu:>10.1%} {held / 2**20:>15.1f} "
                f"{len(plugin.decisions):>10}"
            )
    steady = sorted(shares[len(shares) // 2 :])[len(shares[len(shares) // 2 :]) // 2]
    print(
        f"median CPU per second of reports (second half): {steady:.3f} s = {steady:.1%} of one "
        f"core (goal < 5%); report handling is O(top-N) per report"
    )
    c0 = time.process_time()
    plugin.zcache_cluster_stats()
    print(f"cluster_stats query over {args.workers} workers: {time.process_time() - c0:.3f} s CPU")


if __name__ == "__main__":
    asyncio.run(main())
