"""What the disk index's change log (schema 5) costs a fill: an A/B in one process.

Fills ``--entries`` entries of 1 KiB through ``DiskTier.put_many`` in batches of 256 into
a fresh folder, with the change-log triggers of ``cache/disk/schema.py`` as created, then
with them dropped (the same code otherwise), alternating ``--runs`` times. Prints a
markdown table of fills per second.

Usage::

    python benchmarks/change_log_cost.py --entries 100000 --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import tempfile
import time

from xarray_zcache.cache.disk import DiskTier, Fill

TRIGGERS = ("changes_after_insert", "changes_after_delete", "changes_after_update")


def fill_rate(root: str, n: int, log: bool) -> float:
    path = os.path.join(root, f"fill-{log}")
    shutil.rmtree(path, ignore_errors=True)
    tier = DiskTier(path, 1 << 50, location_map=False)
    if not log:
        with sqlite3.connect(os.path.join(path, "index.db")) as conn:
            for name in TRIGGERS:
                conn.execute(f"DROP TRIGGER {name}")
    base = os.urandom(1000)
    t0 = time.perf_counter()
    for i in range(0, n, 256):
        batch = [
            Fill(f"s3://b/d.zarr/v/c/{j}", base + b"%d" % j, "ns")
            for j in range(i, min(n, i + 256))
        ]
        if not all(tier.put_many(batch)):
            raise AssertionError("a fill was not stored")
    seconds = time.perf_counter() - t0
    tier.close()
    shutil.rmtree(path, ignore_errors=True)
    return n / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="zcache-change-log-")
    try:
        print("| run | change log on (fills/s) | off (fills/s) |")
        print("|---|---:|---:|")
        for r in range(args.runs):
            on, off = fill_rate(root, args.entries, True), fill_rate(root, args.entries, False)
            print(f"| {r} | {on:,.0f} | {off:,.0f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
