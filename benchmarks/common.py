"""Shared pieces of the benchmark suite: settings, the dataset, the analysis, counting."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from xarray_zcache._quiet import silence_unclosed_sessions  # noqa: F401 (used by run.py)
from xarray_zcache.testing.writers import s3fs_store, write_zarr  # noqa: F401 (the writers)

BUCKET = "zcache-bench"
DATASET = "dataset.zarr"  # the main dataset (one variable, "t2m")
SHARDED = "sharded.zarr"  # the same data, sharded
PROBE = "probe.zarr"  # a small array for the cross-worker disk-hit check
VAR = "t2m"
METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


@dataclasses.dataclass
class Settings:
    """Everything a run depends on (also sent as JSON to child processes)."""

    nt: int = 96
    ny: int = 256
    nx: int = 256
    chunk_t: int = 1
    chunk_y: int = 128
    chunk_x: int = 128
    shard_t: int = 8  # sharded copy: shards of (shard_t, ny, nx) holding the same inner chunks
    latency: float = 0.05
    threads: int = 8
    reopens: int = 20
    zipf_alpha: float = 1.0
    zipf_accesses: int = 4000
    zipf_capacity: float = 0.25  # cache capacity as a fraction of the working set (bytes)
    cluster_workers: int = 4
    cluster_threads: int = 2
    index_small: int = 1_000
    index_large: int = 1_000_000
    micro_value: int = 1 << 20
    micro_calls: int = 10_000
    warm_rounds: int = 7  # round-robin warm reads of the cached readers (median)
    restart_runs: int = 3  # fresh processes for the restart column (median)
    cold_runs: int = 3  # cold reads of the rows the cold-read targets compare (median)
    seed: int = 0
    quick: bool = False
    skip: tuple[str, ...] = ()

    @property
    def chunks(self) -> tuple[int, int, int]:
        return (self.chunk_t, self.chunk_y, self.chunk_x)

    @property
    def n_chunks(self) -> int:
        return (
            -(-self.nt // self.chunk_t) * -(-self.ny // self.chunk_y) * -(-self.nx // self.chunk_x)
        )

    def url(self, name: str = DATASET) -> str:
        return f"s3://{BUCKET}/{name}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        d = dict(d)
        d["skip"] = tuple(d.get("skip", ()))
        return cls(**d)


def make_data(s: Settings) -> np.ndarray:
    """A float32 field: smooth large-scale pattern + noise (compresses a little, like real data)."""
    rng = np.random.default_rng(s.seed)
    y = np.linspace(0, 6, s.ny)[:, None]
    x = np.linspace(0, 6, s.nx)[None, :]
    t = np.arange(s.nt)[:, None, None]
    base = 280 + 10 * np.sin(y) * np.cos(x) + 3 * np.sin(2 * np.pi * t / 24)
    return (base + rng.normal(0, 1, (s.nt, s.ny, s.nx))).astype("float32")


def make_dataset(s: Settings) -> Any:
    import xarray as xr

    data = make_data(s)
    return xr.Dataset(
        {VAR: (("time", "y", "x"), data, {"units": "K"})},
        coords={
            "time": np.arange(s.nt, dtype="int64"),
            "y": np.arange(s.ny, dtype="float64"),
            "x": np.arange(s.nx, dtype="float64"),
        },
    )


def write_datasets(s: Settings, storage_options: dict[str, Any]) -> Any:
    """Write the main dataset, its sharded copy and the probe array; return the dataset."""
    import zarr

    ds = make_dataset(s)
    with (
        quiet(),
        s3fs_store(s.url(DATASET), storage_options) as main,
        s3fs_store(s.url(SHARDED), storage_options) as sharded,
        s3fs_store(s.url(PROBE), storage_options) as probe_store,
    ):
        ds.to_zarr(
            main,
            mode="w",
            zarr_format=3,
            consolidated=True,
            encoding={VAR: {"chunks": s.chunks}},
        )
        ds.to_zarr(
            sharded,
            mode="w",
            zarr_format=3,
            consolidated=True,
            encoding={VAR: {"chunks": s.chunks, "shards": (s.shard_t, s.ny, s.nx)}},
        )
        probe = zarr.open_array(
            probe_store,
            mode="w",
            shape=(4, s.chunk_y, s.chunk_x),
            chunks=(1, s.chunk_y, s.chunk_x),
            dtype="float32",
            zarr_format=3,
        )
        probe[:] = np.arange(1, 5, dtype="float32")[
            :, None, None
        ]  # no all-fill chunk (never stored)
    return ds


def expected_result(ds: Any) -> np.ndarray:
    return np.asarray(ds[VAR].values.mean(axis=(1, 2)))


def analysis(ds: Any, threads: int) -> np.ndarray:
    """The full read: the spatial mean per time step of every chunk (each chunk read once)."""
    import dask

    with dask.config.set(scheduler="threads", num_workers=threads):
        return np.asarray(ds[VAR].mean(("y", "x")).compute().values)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
        warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*coroutine.*")
        yield


def request_counts(records: list[Any]) -> dict[str, int]:
    """Split a request-log snapshot into kinds."""
    out = {"total": len(records), "get": 0, "head": 0, "list": 0, "chunk_get": 0, "meta_get": 0}
    for r in records:
        if r.method == "HEAD":
            out["head"] += 1
        elif r.method == "GET":
            if r.key is None:
                out["list"] += int(r.is_list)
            else:
                out["get"] += 1
                out["meta_get" if r.is_metadata else "chunk_get"] += 1
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@contextlib.contextmanager
def zcache_cluster(cfg: Any, workers: int, threads: int = 2) -> Iterator[Any]:
    """A `LocalCluster` of ``workers`` processes with the zcache plugin installed
    (``cfg``); yields its `Client`."""
    import logging

    from distributed import Client, LocalCluster

    import xarray_zcache.distributed as zd

    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        zd.install(client, cfg)
        yield client
