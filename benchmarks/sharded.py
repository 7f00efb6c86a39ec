"""A sharded array: the same data in shards of ``(shard_t, ny, nx)`` holding the same chunks.

xarray opens a sharded variable with one dask chunk per *inner* chunk, so a full
read costs, per inner chunk, a read of the shard index (a suffix range) and a
ranged read of the chunk, both through zarr's sharding codec (``get`` with a
``byte_range``, ``get_ranges``). Two workloads, each on a fresh cache:

* ``full``: the full read (``mean`` over y, x), cold then warm;
* ``point``: a point time series ``t2m[:, y, x]``: one inner chunk per time step,
  cold then warm.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from common import SHARDED, VAR, Settings, analysis, quiet, request_counts, timed
from readers import CACHE_SIZE, opener, zcache_config


def _point(ds: Any, threads: int) -> np.ndarray:
    import dask

    with dask.config.set(scheduler="threads", num_workers=threads):
        return np.asarray(ds[VAR][:, 5, 5].compute().values)


def run_sharded(s: Settings, server: Any, workdir: str, data: np.ndarray) -> dict[str, Any]:
    url = s.url(SHARDED)
    expect = {"full": data.mean(axis=(1, 2)), "point": data[:, 5, 5]}
    work = {"full": lambda ds: analysis(ds, s.threads), "point": lambda ds: _point(ds, s.threads)}

    def specs(tag: str) -> dict[str, dict[str, Any]]:
        return {
            "no cache (s3fs max_concurrency=1)": {
                "type": "zarr",
                "url": url,
                "so": server.storage_options(f"shard-nocache-{tag}"),
            },
            "fsspec simplecache": {
                "type": "fsspec_cache",
                "protocol": "simplecache",
                "url": url,
                "so": server.default_storage_options(f"shard-simplecache-{tag}"),
                "cache_dir": os.path.join(workdir, f"shard-simplecache-{tag}"),
            },
            "zarr CacheStore (memory)": {
                "type": "cachestore",
                "cache": "memory",
                "url": url,
                "so": server.default_storage_options(f"shard-cachestore-{tag}"),
                "max_size": CACHE_SIZE,
            },
            "xarray-zcache (memory + disk)": {
                "type": "zcache",
                "url": url,
                "so": server.default_storage_options(f"shard-zcache-{tag}"),
                "config": zcache_config(
                    f"bench-shard-{tag}", os.path.join(workdir, f"shard-zcache-{tag}")
                ),
            },
        }

    out: dict[str, Any] = {"shards": (s.shard_t, s.ny, s.nx), "inner_chunks": s.chunks, "rows": {}}
    for workload in ("full", "point"):
        for label, spec in specs(workload).items():
            open_ = opener(spec)
            row: dict[str, Any] = {}
            try:
                with quiet():
                    ds = open_()
                phases = ("cold",) if label.startswith("no cache") else ("cold", "warm")
                for phase in phases:  # without a cache, warm = cold: not repeated
                    server.requests.reset()
                    seconds, got = timed(lambda: work[workload](ds))  # noqa: B023
                    recs = server.requests.records()
                    ok = bool(np.allclose(got, expect[workload], rtol=1e-5))
                    row[phase] = {"seconds": seconds, "correct": ok, **request_counts(recs)}
                ds.close()
            except Exception as exc:  # e.g. fsspec simplecache cannot serve suffix ranges
                row = {"error": f"{type(exc).__name__}: {exc}"}
            out["rows"].setdefault(label, {})[workload] = row
    return out
