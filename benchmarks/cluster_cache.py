"""The cluster as one cache: five passes on a LocalCluster with one disk folder per worker.

Usage::

    .venv/bin/python benchmarks/cluster_cache.py                 # 2 and 4 workers
    .venv/bin/python benchmarks/cluster_cache.py --workers 4 --latency-ms 20

Each worker gets its own disk folder (``per_worker=True``: what separate hosts
have). Three set-ups are compared on the same five computations:

* ``per-worker caches``: every worker a cache of its own (peer reads off; the
  first release's behaviour);
* ``one cache``: peer reads on: a miss asks the key's owning worker first;
* ``one cache + placement``: the same, with cache-aware task placement
  (``zcache.distributed.placement``): chunk-reading tasks go to their owners;
* ``shared folder``: all workers share one folder (one host; for reference).

Printed per set-up: chunk GETs the S3 server saw per pass, wall time per pass,
bytes stored on the workers' disks vs the distinct bytes read, peer hits and
fallbacks, and the median latency of a peer hit vs an S3 read (measured on a
worker, per key); per pass of the peer set-ups, the workers' chunk reads that were
local hits (memory or own disk) vs peer asks, and the bytes received from peers.

A second workload (``C1``, ``C2``) reads a copy of the dataset at another path with
every worker reading every chunk at the same time (one task per worker, each reading
the whole array, cold then again): with one cache, its pass 1 should still send one
GET per distinct chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

import numpy as np

PASSES = [
    ("1 t.mean('time') (cold)", lambda d: d.t.mean("time")),
    ("2 the same again", lambda d: d.t.mean("time")),
    ("3 t.mean(['lat','lon'])", lambda d: d.t.mean(["lat", "lon"])),
    ("4 t.sum('lon').rolling(time=5).mean()", lambda d: d.t.sum("lon").rolling(time=5).mean()),
    ("5 t.max()", lambda d: d.t.max()),
]


def _write(server: Any, url: str) -> Any:
    import s3fs
    import xarray as xr

    from xarray_zcache.testing.writers import write_zarr

    # a new server may get the port of the last one: no listings cached from that one
    s3fs.S3FileSystem.clear_instance_cache()

    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {"t": (("time", "lat", "lon"), rng.normal(280, 5, (192, 128, 256)).astype("f4"))},
        coords={"time": np.arange(192)},
    )
    enc = {"t": {"chunks": (8, 32, 64)}}  # 24 x 4 x 4 = 384 chunks of 64 KiB
    opts = server.storage_options()
    # mode "w": moto keeps its buckets across servers of one process (the last run's data)
    write_zarr(ds, url, opts, zarr_format=3, encoding=enc, mode="w")
    return ds


def _disk_bytes(dask_worker: Any) -> tuple[str, int]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    if state is None or state.cache.disk_tier is None:
        return "", 0
    state.cache.flush()
    return str(state.cache.disk_tier.path), int(state.cache.disk_tier.used_bytes())


def _stats(dask_worker: Any) -> dict[str, Any]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    return {} if state is None else state.cache.stats().to_dict()


def _reads(client: Any) -> dict[str, int]:
    """Cluster totals of chunk reads: local hits, peer asks, peer bytes received."""
    out = {"local": 0, "asks": 0, "peer_hits": 0, "peer_bytes": 0, "loads": 0}
    for s in client.run(_stats).values():
        if not s:
            continue
        out["local"] += s["hits"]["memory"]["chunk"] + s["hits"]["disk"]["chunk"]
        out["peer_hits"] += s["hits"]["peer"]["chunk"]
        out["peer_bytes"] += s["hit_bytes"]["peer"]["chunk"]
        out["loads"] += s["peer_loads"]
        out["asks"] += s["hits"]["peer"]["chunk"] + s["peer_loads"] + s["peer_fallbacks"]
    return out


def _placed(dask_scheduler: Any) -> int:
    plugin = dask_scheduler.plugins.get("zcache-scheduler")
    return 0 if plugin is None else int(plugin.placer.stats.placed)


def _read_all(url: str, opts: dict[str, Any], cfg_dict: dict[str, Any]) -> float:
    """On a worker: read the whole array ``t`` through zcache (every chunk, concurrently)."""
    import zarr

    from xarray_zcache import CacheConfig, open_store

    store = open_store(url, storage_options=opts, cache_config=CacheConfig.from_dict(cfg_dict))
    return float(np.asarray(zarr.open_array(store, path="t", mode="r")[:]).sum(dtype="f8"))


def _concurrent(client: Any, server: Any, url: str, opts: dict[str, Any], cfg: Any) -> Any:
    """Every worker reads every chunk of ``url`` at once: ``C1`` cold, ``C2`` again."""
    workers = sorted(client.scheduler_info()["workers"])
    passes = []
    for name in ("C1 every worker reads all chunks at once (cold)", "C2 the same again"):
        before = server.requests.chunk_gets("bench2")
        t = time.perf_counter()
        futures = [
            client.submit(_read_all, url, opts, cfg.to_dict(), workers=[w], pure=False)
            for w in workers
        ]
        sums = client.gather(futures)
        seconds = time.perf_counter() - t
        passes.append(
            {
                "pass": name,
                "gets": server.requests.chunk_gets("bench2") - before,
                "seconds": seconds,
                "correct": len(set(sums)) == 1,
            }
        )
    return passes


def _reasons(dask_worker: Any) -> dict[str, int]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    return {} if state is None or state.peer is None else dict(state.peer.fallback_reasons)


def _latencies(url: str, opts: dict[str, Any], cfg_dict: dict[str, Any], n: int) -> Any:
    """On a worker: per-key seconds of peer hits (keys owned elsewhere) and of S3 reads."""
    from distributed import get_worker
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from xarray_zcache import CacheConfig, open_store
    from xarray_zcache.distributed.worker import worker_cache_state

    cfg = CacheConfig.from_dict(cfg_dict)
    store = open_store(url, storage_options=opts, cache_config=cfg)
    state = worker_cache_state(get_worker())
    assert state is not None
    cache = store.cache
    proto = default_buffer_prototype()
    peer, s3 = [], []
    keys = [f"t/c/{i}/{j}/{k}" for i in range(24) for j in range(4) for k in range(4)]
    for key in keys:
        ck = store._ck(key)
        if len(peer) < n and not cache.contains(ck) and state.peer is not None:
            if state.peer._pick(ck) is None:
                continue  # owned here
            t = time.perf_counter()
            sync(store.get(key, proto))
            peer.append(time.perf_counter() - t)
        if len(s3) < n:
            t = time.perf_counter()
            sync(store.inner.get(key, proto))
            s3.append(time.perf_counter() - t)
    return peer, s3


def _measure(
    out: dict[str, Any],
    workers: int,
    mode: str,
    server: Any,
    url: str,
    url2: str,
    bucket: str,
    expected: Any,
    opts: dict[str, Any],
    cfg: Any,
) -> None:
    """The passes of one set-up on a fresh cluster, into ``out``."""
    import xarray as xr
    from common import zcache_cluster

    with zcache_cluster(cfg, workers) as client:
        ds = xr.open_dataset(
            url, engine="zcache", chunks={}, storage_options=opts, cache_config=cfg
        )
        for name, work in PASSES:
            before = server.requests.chunk_gets(bucket)
            reads0 = _reads(client)
            t = time.perf_counter()
            got = work(ds).compute()
            seconds = time.perf_counter() - t
            reads1 = _reads(client)
            ok = bool(np.allclose(got.values, work(expected).values, rtol=1e-5, equal_nan=True))
            out["passes"].append(
                {
                    "pass": name,
                    "gets": server.requests.chunk_gets(bucket) - before,
                    "seconds": seconds,
                    "correct": ok,
                    **{k: reads1[k] - reads0[k] for k in reads1},
                }
            )
        out["seconds"] = sum(p["seconds"] for p in out["passes"])
        disks = dict(client.run(_disk_bytes).values())
        out["stored"] = sum(disks.values())
        stats = list(client.run(_stats).values())
        out["peer_hits"] = sum(s["hits"]["peer"]["chunk"] for s in stats)
        out["peer_fallbacks"] = sum(s["peer_fallbacks"] for s in stats)
        out["placed"] = client.run_on_scheduler(_placed)
        out["passes"] += _concurrent(client, server, url2, opts, cfg)
        stats = list(client.run(_stats).values())
        out["peer_fallbacks_all"] = sum(s["peer_fallbacks"] for s in stats)
        reasons: dict[str, int] = {}
        for rs in client.run(_reasons).values():
            for r, c in rs.items():
                reasons[r] = reasons.get(r, 0) + c
        out["fallback_reasons"] = reasons
        if mode == "one cache":
            w = sorted(client.scheduler_info()["workers"])[0]
            peer, s3 = client.submit(
                _latencies, url, opts, cfg.to_dict(), 30, workers=[w], pure=False
            ).result()
            out["peer_ms"] = 1000 * statistics.median(peer) if peer else float("nan")
            out["s3_ms"] = 1000 * statistics.median(s3) if s3 else float("nan")


def run(workers: int, latency_ms: float, mode: str) -> dict[str, Any]:

    from xarray_zcache import CacheConfig
    from xarray_zcache.testing.s3server import LocalS3Server

    tmp = tempfile.mkdtemp(prefix="zcache-cluster-bench-")
    server = LocalS3Server().start()
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"  # moto's state may outlive a server
        server.create_bucket(bucket)
        url = f"s3://{bucket}/era5.zarr"
        expected = _write(server, url)
        server.create_bucket("bench2")
        url2 = "s3://bench2/era5.zarr"
        _write(server, url2)
        server.latency = latency_ms / 1000
        opts = server.storage_options()
        cfg = (
            CacheConfig()
            .with_name(f"bench-{mode}")
            .with_memory_size("64MB")
            .with_disk_cache(os.path.join(tmp, "cache"), "1GB")
            .with_peer_reads(mode != "per-worker caches")
            ._replace(
                per_worker=mode != "shared folder",
                report_interval=1.0,
                placement=mode == "one cache + placement",
            )
        )
        out: dict[str, Any] = {"mode": mode, "workers": workers, "passes": []}
        try:
            _measure(out, workers, mode, server, url, url2, bucket, expected, opts, cfg)
        except TimeoutError:  # a loaded machine: workers slow to close after the passes
            if "peer_fallbacks_all" not in out:
                raise
            print(f"({mode}, {workers} workers: the cluster was slow to close)", file=sys.stderr)
        fs = server.filesystem()
        out["distinct"] = sum(
            fs.info(p)["size"] for p in fs.find(f"{bucket}/era5.zarr/t") if "/c/" in p
        )
        return out
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    head = ["pass", *(f"{r['mode']}, {r['workers']} w" for r in results)]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    names = [p["pass"] for p in results[0]["passes"]]
    for i, name in enumerate(names):
        cells = [name]
        for r in results:
            p = r["passes"][i]
            mark = "" if p["correct"] else " WRONG"
            cells.append(f"{p['gets']} GETs, {p['seconds']:.2f} s{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "| passes 1-5 wall time | " + " | ".join(f"{r['seconds']:.2f} s" for r in results) + " |"
    )
    lines.append(
        "| disk stored / distinct (passes 1-5) | "
        + " | ".join(
            f"{r['stored'] / 2**20:.1f} / {r['distinct'] / 2**20:.1f} MiB "
            f"= {r['stored'] / r['distinct']:.2f}x"
            for r in results
        )
        + " |"
    )
    lines.append(
        "| peer hits, passes 1-5 (fallbacks; with C1-C2) | "
        + " | ".join(
            f"{r['peer_hits']} ({r['peer_fallbacks']}; {r['peer_fallbacks_all']})" for r in results
        )
        + " |"
    )
    for r in results:
        if r.get("fallback_reasons"):
            lines.append(
                f"\nfallbacks, {r['mode']}, {r['workers']} workers: {r['fallback_reasons']}"
            )
        if "peer_ms" in r:
            lines.append(
                f"\npeer hit vs S3 read, {r['workers']} workers (median per key): "
                f"{r['peer_ms']:.1f} ms vs {r['s3_ms']:.1f} ms "
                f"({r['peer_ms'] / r['s3_ms']:.2f} of an S3 read)"
            )
    return "\n".join(lines)


def reads_table(results: list[dict[str, Any]]) -> str:
    """Per pass: chunk reads that were local hits vs peer asks, bytes from peers."""
    peers = [r for r in results if r["mode"] != "per-worker caches"]
    head = ["pass", *(f"{r['mode']}, {r['workers']} w" for r in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (name, _) in enumerate(PASSES):
        cells = [name]
        for r in peers:
            p = r["passes"][i]
            total = p["local"] + p["asks"]
            share = p["local"] / total if total else float("nan")
            cells.append(
                f"{share:.0%} local ({p['local']} / {p['asks']} asks), "
                f"{p['peer_bytes'] / 2**20:.1f} MiB + {p['loads']} loads"
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| tasks placed | " + " | ".join(str(r.get("placed", 0)) for r in peers) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="*", default=[2, 4])
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument(
        "--modes",
        nargs="*",
        default=["per-worker caches", "one cache", "one cache + placement", "shared folder"],
    )
    args = p.parse_args()
    results = []
    for w in args.workers:
        for m in args.modes:
            results.append(run(w, args.latency_ms, m))
            print(json.dumps(results[-1]), flush=True)  # as it comes: a later run may fail
    print(f"S3 latency {args.latency_ms:.0f} ms; 192x128x256 f32, 384 chunks of 64 KiB")
    print(table(results))
    print()
    print(reads_table(results))


if __name__ == "__main__":
    main()
