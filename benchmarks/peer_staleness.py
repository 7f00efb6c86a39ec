"""How long a chunk another writer changed is still served through a peer (issue 18, item 2).

Two workers, one disk folder each (two cache hosts), local S3, validation interval
``--interval``. The owner A caches a chunk and confirms its array; another writer
rewrites the chunk; B validates its own entries of the array just before the owner's
confirmation runs out, asks A (getting the old bytes, within the bound), then reads the
chunk every 0.25 s. Prints when B last served the old bytes, after the change.

    python benchmarks/peer_staleness.py --interval 8
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from typing import Any

import zarr
from distributed import Client, LocalCluster

import xarray_zcache.distributed as zd
from xarray_zcache import CacheConfig, open_store
from xarray_zcache.distributed.membership import Membership
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import s3fs_store

SHAPE, CHUNKS = (8, 16), (2, 16)


def _read(url: str, opts: dict[str, Any], cfg: CacheConfig, i: int, name: str = "t") -> float:
    arr = zarr.open_array(open_store(url, storage_options=opts, cache_config=cfg), path=name)
    return float(arr[2 * i, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--interval", type=float, default=8.0)
    args = parser.parse_args()
    interval = args.interval
    folder = tempfile.mkdtemp(prefix="zcache-peer-staleness-")
    server = LocalS3Server().start()
    closing = contextlib.ExitStack()  # the writer's store: its aiohttp session closed after
    try:
        server.create_bucket("peers-bench")
        opts = server.storage_options()
        url = "s3://peers-bench/peers.zarr"
        store = closing.enter_context(s3fs_store(url, opts))
        for name in ("u", "t"):
            writer = zarr.create_array(
                store, name=name, shape=SHAPE, chunks=CHUNKS, dtype="f4", zarr_format=3
            )
            writer[:] = 1.0
        cfg = (
            CacheConfig()
            .with_disk_cache(folder, "256MB")
            .with_validation(interval)
            .with_name("peer-staleness")
            ._replace(per_worker=True, report_interval=0.5, peer_timeout=20.0)
        )
        with (
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as lc,
            Client(lc) as client,
        ):
            zd.install(client, cfg)

            def on(w: str, fn: Any, *a: Any) -> Any:
                return client.submit(fn, *a, workers=[w], pure=False).result()

            def membership(dask_scheduler: Any) -> dict[str, Any]:
                d = dask_scheduler.plugins["zcache-scheduler"].directory
                return dict(d.membership.to_msg())

            m = Membership.from_msg(client.run_on_scheduler(membership))
            i = 1
            ck = open_store(url, storage_options=opts, cache_config=cfg)._ck(f"t/c/{i}/0")
            owner = m.owner(ck)
            assert owner is not None
            (a,) = m.workers_of(owner)
            (b,) = set(client.scheduler_info()["workers"]) - {a}
            for w in (a, b):
                for j in range(SHAPE[0] // CHUNKS[0]):
                    for name in ("u", "t"):
                        if (name, j) != ("t", i):
                            on(w, _read, url, opts, cfg, j, name)
            on(a, _read, url, opts, cfg, i)
            on(a, zd._revalidate_task, url, opts)
            confirmed = time.time()
            writer[2 * i : 2 * i + 2] = 2.0
            changed = time.time()
            time.sleep(max(0.0, confirmed + interval - 2.5 - time.time()))
            on(b, zd._revalidate_task, url, opts)
            last_stale = None
            while time.time() < changed + 3 * interval:
                if on(b, _read, url, opts, cfg, i) == 1.0:
                    last_stale = time.time() - changed
                time.sleep(0.25)
            print(
                f"interval {interval:.1f} s: last old answer through a peer "
                + ("never" if last_stale is None else f"{last_stale:.1f} s")
                + " after the change"
            )
    finally:
        closing.close()
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
