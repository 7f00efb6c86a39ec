"""The demo's passes: one read of the dataset, in this process, a new one, or on a cluster."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Hashable, Iterator
from typing import Any

import dask.base
import numpy as np
import xarray as xr

from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.cache.stats import CacheStats
from xarray_zcache.config import CacheConfig
from xarray_zcache.demo.sample import DEMO_CACHE_NAME

__all__ = [
    "PassFigures",
    "ReadSpec",
    "analysis",
    "open_selected",
    "run_cluster_pass",
    "run_pass",
    "run_restart_pass",
]

#: prefix of the line on which the restart process reports its figures to the parent
_RESULT_MARKER = "ZCACHE-DEMO-RESULT "
_RESTART_FLAG = "--_restart-pass"


@dataclasses.dataclass
class ReadSpec:
    """What a pass reads and with which cache (sent as JSON to the restart process)."""

    url: str
    storage_options: dict[str, Any]
    cache_dir: str
    memory_size: int
    disk_size: int
    variables: list[str] | None = None
    isel: dict[str, int] | None = None

    def config(self) -> CacheConfig:
        return (
            CacheConfig()
            .with_name(DEMO_CACHE_NAME)
            .with_memory_size(self.memory_size)
            .with_disk_cache(self.cache_dir, self.disk_size)
            .with_ttl(chunks=None)
            .with_promotion_threshold(0)
            ._replace(report_interval=0.5)
        )


@dataclasses.dataclass
class PassFigures:
    """The figures of one pass (one row of the table)."""

    name: str
    seconds: float
    requests: int  # requests sent to S3 (all kinds)
    chunk_requests: int  # chunk GETs sent to S3
    bytes_s3: int
    bytes_memory: int
    bytes_disk: int
    hit_rate: float
    chunk_hits: int = 0
    #: the requests other than chunk GETs, e.g. ``"GET .zgroup (404)"`` (server-side counts)
    other_requests: list[str] = dataclasses.field(default_factory=list)


def open_selected(spec: ReadSpec) -> xr.Dataset:
    """Open ``spec.url`` through the zcache engine, lazily (one dask chunk per zarr chunk)."""
    ds = xr.open_dataset(
        spec.url,
        engine="zcache",
        chunks={},
        storage_options=spec.storage_options or None,
        cache_config=spec.config(),
    )
    if spec.variables:
        ds = ds[spec.variables]
    if spec.isel:
        ds = ds.isel({dim: slice(0, stop) for dim, stop in spec.isel.items()})
    return ds


def _numeric_vars(ds: xr.Dataset) -> list[Hashable]:
    return [name for name, v in ds.data_vars.items() if np.issubdtype(v.dtype, np.number)]


def analysis(ds: xr.Dataset) -> tuple[xr.Dataset, xr.DataArray]:
    """What every pass computes: spatial means of every variable and the maximum of the first.

    Means are over every dimension but time (or, without a ``time`` dimension, the
    first dimension), so every chunk of every numeric variable is read. Both
    reductions run in one ``dask.compute`` call, so each chunk is read once.
    """
    names = _numeric_vars(ds)
    if not names:
        raise ValueError("the dataset has no numeric data variables to compute")
    sub = ds[names]
    keep = "time" if "time" in sub.dims else next(iter(sub[names[0]].dims), None)
    over = [d for d in sub.dims if d != keep] or list(sub.dims)
    means, maximum = dask.base.compute(  # type: ignore[no-untyped-call]
        sub.mean(over), sub[names[0]].max()
    )
    return means, maximum


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not part of the zarr v3 spec yet
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        yield


def _figures(name: str, seconds: float, d: CacheStats) -> PassFigures:
    """One row of the table from the cache counters of a pass (a `CacheStats` delta)."""
    return PassFigures(
        name=name,
        seconds=seconds,
        requests=d.requests_sent,
        chunk_requests=d.misses["chunk"],
        bytes_s3=sum(d.miss_bytes.values()),
        bytes_memory=sum(d.hit_bytes["memory"].values()),
        bytes_disk=sum(d.hit_bytes["disk"].values()),
        hit_rate=d.hit_rate(),
        chunk_hits=d.total_hits(kind="chunk"),
    )


def _timed_analysis(spec: ReadSpec) -> tuple[float, Any]:
    """Open the dataset, run `analysis`, close it; return the wall time and the result."""
    t0 = time.perf_counter()
    with _quiet_warnings():
        ds = open_selected(spec)
        try:
            result = analysis(ds)
        finally:
            ds.close()
    return time.perf_counter() - t0, result


def run_pass(name: str, spec: ReadSpec, cache: HybridCache) -> tuple[PassFigures, Any]:
    """Open, compute and time one pass; figures come from the cache's own counters."""
    before = cache.stats()
    seconds, result = _timed_analysis(spec)
    d = cache.stats() - before
    return _figures(name, seconds, d), result


def run_restart_pass(spec: ReadSpec, timeout: float = 600) -> tuple[PassFigures, Any]:
    """Run the restart pass in a new Python process on the same cache folder."""
    # the spec (which may hold credentials) travels on stdin, never on the command line
    proc = subprocess.run(
        [sys.executable, "-m", "xarray_zcache.demo", _RESTART_FLAG],
        input=json.dumps(dataclasses.asdict(spec)),
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            payload = json.loads(line[len(_RESULT_MARKER) :])
            if proc.returncode != 0:
                break
            out = payload["result"]
            try:
                with _quiet_warnings():
                    means = xr.open_zarr(os.path.join(out, "means.zarr")).load()
                    maximum = next(
                        iter(xr.open_zarr(os.path.join(out, "max.zarr")).load().values())
                    )
            finally:
                shutil.rmtree(out, ignore_errors=True)
            return PassFigures(**payload["figures"]), (means, maximum)
    raise RuntimeError(
        f"the restart process failed (exit status {proc.returncode}); its output:\n{proc.stdout}"
    )


# -- on a Dask cluster (--workers N) -------------------------------------------------------------


def _cluster_totals(client: Any, settle: float) -> CacheStats:
    """Cluster totals from the aggregator, after the workers' next report."""
    import xarray_zcache.distributed as zd

    time.sleep(settle)
    return zd.cluster_stats(client).total


def run_cluster_pass(
    name: str, spec: ReadSpec, client: Any, settle: float
) -> tuple[PassFigures, Any]:
    """One pass computed on the cluster; figures from the aggregator's totals."""
    before = _cluster_totals(client, settle)
    seconds, result = _timed_analysis(spec)
    d = _cluster_totals(client, settle) - before
    return _figures(name, seconds, d), result
