"""Do disk hits pause while the location map folds its changes in? (issue 19, item 4)

A filled folder of ``--entries`` entries (made here, or ``--folder`` of an earlier
``disk_scale.py --keep`` run: keys of ``disk_scale.key_of``) is opened by a reading tier (its
map from the hint file). A writer tier in another process then overwrites ``--changes``
entries in batches of 256 (``put_many``), while a reader thread reads random entries through
the reading tier in a loop (one every 0.5 ms); each of the reader's ``get`` calls is
timed. The map takes the writer's changes in on the reader's next answer and folds them into
its arrays when they exceed an eighth of the map. Prints the hit latency percentiles and the
longest hit, with the number of folds during the run.

Usage::

    python benchmarks/map_fold_pause.py --entries 1000000
    python benchmarks/map_fold_pause.py --folder /path/of/a/kept/1M/folder --entries 1000000
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

from disk_scale import fill, key_of

from xarray_zcache.cache.disk import DiskTier

_WRITER = """
import os, random, sys, time
sys.path.insert(0, {bench!r})
from disk_scale import NS, key_of
from xarray_zcache.cache.disk import DiskTier, Fill
t = DiskTier({folder!r}, 1 << 50, location_map=False)
base, rng = os.urandom(1024), random.Random(2)
t0 = time.perf_counter()
for start in range(0, {changes}, 256):
    t.put_many([Fill(key_of(rng.randrange({n})), base, namespace=NS)
                for _ in range(min(256, {changes} - start))])
print(time.perf_counter() - t0)
t.close()
"""


def run(folder: str, n: int, changes: int) -> dict[str, float]:
    reader_tier = DiskTier(folder, 1 << 50)
    kd = reader_tier._keydir
    deadline = time.monotonic() + 120
    while kd is not None and not kd.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    stop = threading.Event()
    lat: list[int] = []
    misses = [0]

    def reader() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            k = key_of(rng.randrange(n))
            t0 = time.perf_counter_ns()
            got = reader_tier.get(k)
            lat.append(time.perf_counter_ns() - t0)
            if got is None:
                misses[0] += 1
            time.sleep(0.0005)  # (a reader that also does other work: the GIL is shared)

    folds0 = getattr(kd, "folds", 0)
    th = threading.Thread(target=reader)
    th.start()
    script = _WRITER.format(
        bench=os.path.dirname(os.path.abspath(__file__)), folder=folder, changes=changes, n=n
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    )
    write_s = float(done.stdout.split()[-1])
    time.sleep(1.0)  # a fold started by the last changes
    stop.set()
    th.join()
    folds = getattr(kd, "folds", 0) - folds0
    lookups = reader_tier.index_lookups
    reader_tier.close()
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1000

    return {
        "hits": len(lat),
        "misses": misses[0],
        "write_s": write_s,
        "p50": pct(0.5),
        "p99": pct(0.99),
        "p999": pct(0.999),
        "max": lat[-1] / 1000,
        "over_50ms": sum(1 for x in lat if x > 50_000_000),
        "folds": folds,
        "index_lookups": lookups,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--changes", type=int, default=None, help="default: entries / 4")
    p.add_argument("--folder", default=None, help="a filled folder (else one is made)")
    args = p.parse_args()
    changes = args.changes or args.entries // 4
    work = None
    folder = args.folder
    if folder is None:
        work = tempfile.mkdtemp(prefix="zcache-fold-pause-")
        folder = os.path.join(work, "c")
        print(f"filling {args.entries:,} entries ...", file=sys.stderr, flush=True)
        fill(folder, args.entries, 1024, 1 << 50, False, 65536)
    try:
        r = run(folder, args.entries, changes)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"{args.entries:,} entries, {changes:,} overwrites by another process in "
        f"{r['write_s']:.1f} s while one thread reads\n"
    )
    print("| hits | hit p50 | p99 | p99.9 | longest | hits over 50 ms | folds | index look-ups |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r['hits']:,} | {r['p50']:.0f} µs | {r['p99']:.0f} µs | {r['p999']:.0f} µs "
        f"| {r['max'] / 1000:.1f} ms | {r['over_50ms']} | {r['folds']} "
        f"| {r['index_lookups']:,} |"
    )


if __name__ == "__main__":
    main()
