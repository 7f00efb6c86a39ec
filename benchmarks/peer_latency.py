"""A peer hit against an S3 miss, per key (issue 19, item 5).

A LocalCluster of 2 worker processes (2 threads each), peer reads on, one disk folder
per worker; the local moto S3 in its own process with a fixed latency per request.
For each latency (20 ms and 100 ms) and chunk size (64 KiB and 1 MiB), a fresh array:

(a) *S3 miss*: each worker reads, one key at a time, the chunks it owns itself
    (`Membership.owner`): a miss through the cache, one GET to S3;
(b) *peer hit*: each worker then reads, one key at a time, the chunks the other worker
    owns and now holds: the owner answers from its cache (0 GETs expected).

Per-key latencies are measured inside the worker (``store.get`` through zarr's sync
loop), pooled over both workers; the table gives p50 and p99 and the ratio of the p50s.
Chunk GETs the server saw during (b) and the peer counters are printed as a check.

    python benchmarks/peer_latency.py
    python benchmarks/peer_latency.py --latency-ms 20 --sizes 64k
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIZES = {"64k": (128, 128), "1m": (512, 512)}  # float32 (y, x) of one chunk
N_CHUNKS = {"64k": 96, "1m": 32}


def _write(server: Any, url: str, size: str) -> None:
    import zarr
    from common import s3fs_store

    ny, nx = SIZES[size]
    n = N_CHUNKS[size]
    with s3fs_store(url, server.storage_options(skip_instance_cache=True)) as store:
        arr = zarr.create_array(
            store, name="v", shape=(n, ny, nx), chunks=(1, ny, nx), dtype="f4", zarr_format=3
        )
        rng = np.random.default_rng(0)
        for i in range(n):
            arr[i] = rng.normal(280, 5, (ny, nx)).astype("f4")


def _read_keys(url: str, opts: dict[str, Any], cfg_dict: dict[str, Any], n: int, own: bool) -> Any:
    """On a worker: per-key seconds of reading the chunks it owns (``own``) or the others'."""
    from distributed import get_worker
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from xarray_zcache import CacheConfig, open_store
    from xarray_zcache.distributed.worker import worker_cache_state

    store = open_store(url, storage_options=opts, cache_config=CacheConfig.from_dict(cfg_dict))
    state = worker_cache_state(get_worker())
    assert state is not None and state.peer is not None
    proto = default_buffer_prototype()
    sync(store.get("v/zarr.json", proto))  # metadata: not measured
    out = []
    for i in range(n):
        key = f"v/c/{i}/0/0"
        ck = store._ck(key)
        if (state.peer._pick(ck) is None) != own or store.cache.contains(ck):
            continue
        t = time.perf_counter()
        got = sync(store.get(key, proto))
        out.append(time.perf_counter() - t)
        assert got is not None
    return out


def _peer_counts(dask_worker: Any) -> dict[str, int]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    if state is None:
        return {}
    s = state.cache.stats()
    return {
        "peer_hits": s.hits["peer"]["chunk"],
        "peer_fallbacks": s.peer_fallbacks,
        "peer_served": s.peer_served,
    }


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency-ms", type=float, nargs="*", default=[20.0, 100.0])
    p.add_argument("--sizes", nargs="*", default=["64k", "1m"])
    args = p.parse_args()

    from common import zcache_cluster
    from s3proc import S3Process

    from xarray_zcache import CacheConfig

    tmp = tempfile.mkdtemp(prefix="zcache-peer-latency-")
    server = S3Process(0.0)
    bucket = f"peers-{uuid.uuid4().hex[:8]}"
    rows = []
    try:
        server.create_bucket(bucket)
        cases = [(lat, size) for lat in args.latency_ms for size in args.sizes]
        urls = {}
        for lat, size in cases:
            urls[lat, size] = f"s3://{bucket}/{size}-{lat:.0f}ms.zarr"
            _write(server, urls[lat, size], size)
        opts = server.storage_options()
        cfg = (
            CacheConfig()
            .with_name("peer-latency")
            .with_memory_size("256MB")
            .with_disk_cache(os.path.join(tmp, "cache"), "1GB")
            .with_peer_reads(True)
            ._replace(per_worker=True, report_interval=1.0)
        )
        with zcache_cluster(cfg, workers=2) as client:
            workers = sorted(client.scheduler_info()["workers"])
            time.sleep(2.0)  # the membership reaches both workers
            for lat, size in cases:
                url = urls[lat, size]
                n = N_CHUNKS[size]
                server.latency = lat / 1000

                s3 = []
                for w in workers:  # one worker at a time: S3 misses do not overlap
                    s3 += client.submit(
                        _read_keys, url, opts, cfg.to_dict(), n, True, workers=[w], pure=False
                    ).result()
                counts0 = client.run(_peer_counts)
                gets0 = server.requests.chunk_gets(bucket)
                peer = []
                for w in workers:
                    peer += client.submit(
                        _read_keys, url, opts, cfg.to_dict(), n, False, workers=[w], pure=False
                    ).result()
                gets = server.requests.chunk_gets(bucket) - gets0
                counts1 = client.run(_peer_counts)
                delta = {
                    k: sum(counts1[w][k] - counts0[w][k] for w in counts1)
                    for k in ("peer_hits", "peer_fallbacks")
                }
                rows.append((lat, size, s3, peer, gets, delta))
                print(
                    f"{lat:.0f} ms {size}: S3 p50 {1000 * pct(s3, 50):.1f} ms, "
                    f"peer p50 {1000 * pct(peer, 50):.1f} ms ({len(s3)}/{len(peer)} keys, "
                    f"{gets} GETs during peer reads, {delta})",
                    flush=True,
                )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(
        "| latency | chunk | S3 miss p50 | S3 miss p99 | peer hit p50 | peer hit p99 "
        "| peer p50 / S3 p50 | keys (S3 / peer) | S3 GETs during peer hits | peer fallbacks |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lat, size, s3, peer, gets, delta in rows:
        print(
            f"| {lat:.0f} ms | {'64 KiB' if size == '64k' else '1 MiB'} | "
            f"{1000 * pct(s3, 50):.1f} ms | {1000 * pct(s3, 99):.1f} ms | "
            f"{1000 * pct(peer, 50):.1f} ms | {1000 * pct(peer, 99):.1f} ms | "
            f"{pct(peer, 50) / pct(s3, 50):.2f} | {len(s3)} / {len(peer)} | {gets} | "
            f"{delta['peer_fallbacks']} |"
        )


if __name__ == "__main__":
    main()
