"""A LocalCluster (worker processes) doing the same analysis twice through xarray-zcache.

The workers share one disk folder (the workers of one host), installed with
`xarray_zcache.distributed.install`. Pass 2 must send no chunk request to S3:
each chunk is in the memory of the worker that read it, or on the shared disk.
Then a cross-worker check: worker A reads one chunk of a fresh array (an S3
request) and flushes its background disk writes; worker B reads the same chunk:
it must be a disk hit on B, with no S3 request.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
from common import PROBE, VAR, Settings, quiet, request_counts, zcache_cluster


def _read_probe(url: str, so: dict[str, Any], cfg_dict: dict[str, Any], flush: bool) -> dict:
    """Runs on a worker: read chunk 0 of the probe array; return this worker's stats delta."""
    import zarr

    from xarray_zcache import CacheConfig, open_store
    from xarray_zcache.registry import get_cache

    cfg = CacheConfig.from_dict(cfg_dict)
    cache = get_cache(cfg)
    before = cache.stats()
    store = open_store(url, storage_options=so, cache_config=cfg)
    arr = zarr.open_array(store, mode="r")
    value = float(arr[0, 0, 0])
    if flush:
        cache.flush()
    d = cache.stats() - before
    return {
        "value": value,
        "memory_hits": d.total_hits(kind="chunk", tier="memory"),
        "disk_hits": d.total_hits(kind="chunk", tier="disk"),
        "misses": d.total_misses(kind="chunk"),
    }


def _worker_stats(dask_worker: Any) -> dict[str, Any]:
    state = getattr(dask_worker, "_zcache", None)
    if state is None:
        return {}
    st = state.cache.stats()
    return {
        "memory_hits": st.total_hits(kind="chunk", tier="memory"),
        "disk_hits": st.total_hits(kind="chunk", tier="disk"),
        "misses": st.total_misses(kind="chunk"),
    }


def run_cluster(s: Settings, server: Any, workdir: str, data: np.ndarray) -> dict[str, Any]:
    import cloudpickle
    import xarray as xr
    from readers import zcache_config

    from xarray_zcache import CacheConfig

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg_dict = zcache_config("bench-cluster", os.path.join(workdir, "cluster-zcache"))
    cfg = CacheConfig.from_dict(cfg_dict)
    so = server.default_storage_options("cluster")
    expect = data.mean(axis=(1, 2))
    out: dict[str, Any] = {"workers": s.cluster_workers, "threads_per_worker": s.cluster_threads}
    t0 = time.perf_counter()
    with zcache_cluster(cfg, s.cluster_workers, s.cluster_threads) as client:
        out["startup_seconds"] = time.perf_counter() - t0
        with quiet():
            ds = xr.open_dataset(
                s.url(), engine="zcache", chunks={}, storage_options=so, cache_config=cfg
            )
        passes = []
        for i in (1, 2):
            server.requests.reset()
            t = time.perf_counter()
            got = np.asarray(ds[VAR].mean(("y", "x")).compute().values)
            seconds = time.perf_counter() - t
            passes.append(
                {
                    "pass": i,
                    "seconds": seconds,
                    "correct": bool(np.allclose(got, expect, rtol=1e-5)),
                    **request_counts(server.requests.records()),
                    "workers": client.run(_worker_stats),
                }
            )
        ds.close()
        out["passes"] = passes
        # cross-worker: A fetches, B must hit the shared disk
        workers = sorted(client.scheduler_info()["workers"])
        a, b = workers[0], workers[-1]
        url = s.url(PROBE)
        server.requests.reset()
        ra = client.submit(_read_probe, url, so, cfg_dict, True, workers=[a], pure=False).result()
        gets_a = server.requests.chunk_gets()
        server.requests.reset()
        rb = client.submit(_read_probe, url, so, cfg_dict, False, workers=[b], pure=False).result()
        gets_b = server.requests.chunk_gets()
        out["cross_worker"] = {
            "worker_a": a,
            "worker_b": b,
            "a": {**ra, "chunk_gets": gets_a},
            "b": {**rb, "chunk_gets": gets_b},
            "ok": gets_b == 0 and rb["disk_hits"] == 1 and rb["misses"] == 0,
        }
    return out
