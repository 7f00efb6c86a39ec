"""The decoded-chunk tier: warm full reads with and without it, against zarr's MemoryStore.

A 48x256x256 float32 variable in 192 zstd chunks (zarr v3) on the local moto server
(its own process, `s3proc.S3Process`), and the same data in a `MemoryStore`. Readers:

* ``zarr MemoryStore``: xarray's zarr backend over the in-memory copy (the reference);
* ``zcache memory, no decoded tier``: ``engine="zcache"``, memory tier only,
  ``decoded_memory_size=0`` (every read decodes);
* ``zcache memory + decoded tier``: the same with the default decoded tier.

Two warm workloads per reader: ``ds.t.values`` (no Dask; ``cache=False`` so that xarray
reads again) and ``ds.t.compute()`` with ``chunks={}`` (Dask's threaded scheduler, one
task per chunk). Each figure is the median over 3 runs of the mean of 3 reads.

A second table: zarr's array API, warm ``a[:]`` (``zarr.open_array``), over the
`MemoryStore`, over zcache (memory tier only) without and with the decoded tier (which
zarr reads through `xarray_zcache.decoded_pipeline`), and TensorStore's zarr3 driver over
its s3 kvstore with a ``cache_pool`` (when tensorstore is installed).

Run: ``python benchmarks/decoded.py`` (prints a Markdown table).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])

from common import BUCKET, Settings, make_data, quiet, write_zarr
from s3proc import S3Process

RUNS, READS = 3, 3
URL = f"s3://{BUCKET}/decoded.zarr"


def _time(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process, every thread) per read, over `READS` reads."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(READS):
        fn()
    return (time.perf_counter() - w0) / READS, (time.process_time() - c0) / READS


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--api-only", action="store_true", help="only the array API table")
    p.add_argument("--rounds", type=int, default=RUNS * 3, help="array API: round-robin runs")
    args = p.parse_args()
    if args.api_only:
        api_only(args.rounds)
        return
    import xarray as xr

    from xarray_zcache import CacheConfig, get_cache

    s, data, server, opts, mem = _written()

    rows: list[tuple[str, float, float, str, float, float]] = []
    readers: list[tuple[str, Callable[..., Any], CacheConfig | None]] = [
        ("zarr MemoryStore", lambda **kw: xr.open_dataset(mem, engine="zarr", **kw), None)
    ]
    for label, decoded in (
        ("zcache memory, no decoded tier", 0),
        ("zcache memory + decoded tier", None),
    ):
        cfg = (
            CacheConfig()
            .with_name(f"bench-decoded-{decoded}")
            .without_disk_cache()
            .with_memory_size("256MB")
            .with_decoded_memory_size(decoded)
        )

        def opener(cfg: CacheConfig = cfg, **kw: Any) -> Any:
            return xr.open_dataset(
                URL, engine="zcache", storage_options=opts, cache_config=cfg, **kw
            )

        readers.append((label, opener, cfg))
    # round robin: each run times every reader in turn, so that the load of a shared
    # machine falls on all of them alike; the median over the runs is reported
    works = []
    with quiet():
        for _, open_, _ in readers:
            plain = open_(chunks=None, cache=False)
            lazy = open_(chunks={})
            assert np.array_equal(plain.t.values, data)  # warm (and exact)
            assert np.array_equal(lazy.t.compute().values, data)
            works.append((lambda p=plain: p.t.values, lambda z=lazy: z.t.compute()))
        times: list[list[tuple[float, float]]] = [[] for _ in range(2 * len(readers))]
        for _ in range(RUNS):
            for i, (values, dask) in enumerate(works):
                times[2 * i].append(_time(values))
                times[2 * i + 1].append(_time(dask))

    def med(i: int, part: int) -> float:
        return statistics.median(t[part] for t in times[i])

    for i, (label, _, cfg) in enumerate(readers):
        held = ""
        if cfg is not None:
            st = get_cache(cfg).stats()
            held = (
                f"{st.memory_used / 1e6:.1f} MB + {st.decoded_used / 1e6:.1f} MB"
                f" (decoded hits {st.decoded_hits})"
            )
        rows.append(
            (label, med(2 * i, 0), med(2 * i + 1, 0), held, med(2 * i, 1), med(2 * i + 1, 1))
        )
    base_v, base_d = rows[0][1], rows[0][2]
    print(
        f"48x256x256 float32, {s.n_chunks} zstd chunks (zarr v3); median of {RUNS} runs "
        f"(round robin over the readers) of the mean of {READS} warm reads; CPU: this "
        "process, all threads\n"
    )
    print(
        "| reader | `ds.t.values` | vs MemoryStore | CPU | Dask `.compute()` | vs MemoryStore "
        "| CPU | memory tier + decoded tier held |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, v, d, held, cv, cd in rows:
        print(
            f"| {label} | {v * 1e3:.1f} ms | {v / base_v:.2f}x | {cv * 1e3:.0f} ms "
            f"| {d * 1e3:.1f} ms | {d / base_d:.2f}x | {cd * 1e3:.0f} ms | {held} |"
        )
    array_api(s, data, mem, server, opts)
    server._call("stop")


def _written() -> tuple[Settings, np.ndarray, Any, dict[str, Any], Any]:
    """The benchmark's data written to a fresh local S3 server (and to a `MemoryStore`):
    ``(settings, data, server, storage options, memory store)``."""
    import xarray as xr
    import zarr
    from zarr.storage import MemoryStore

    s = Settings(nt=48)
    data = make_data(s)
    ds0 = xr.Dataset({"t": (("time", "y", "x"), data)})
    enc = {"t": {"chunks": s.chunks, "compressors": [zarr.codecs.ZstdCodec()]}}
    server = S3Process(latency=0.0)
    server.create_bucket(BUCKET)
    opts = server.storage_options("decoded")
    with quiet():
        write_zarr(ds0, URL, opts, zarr_format=3, encoding=enc, mode="w")
        mem = MemoryStore()
        ds0.to_zarr(mem, zarr_format=3, encoding=enc, consolidated=False)
    return s, data, server, opts, mem


def api_only(rounds: int) -> None:
    """The array API table alone (`array_api`), over freshly written data."""
    s, data, server, opts, mem = _written()
    array_api(s, data, mem, server, opts, rounds)
    server._call("stop")


def array_api(
    s: Settings,
    data: np.ndarray,
    mem: Any,
    server: Any,
    opts: dict[str, Any],
    rounds: int = RUNS * 3,
) -> None:
    """Warm ``a[:]`` through zarr's array API (and TensorStore's read), round robin."""
    import importlib.util
    import os

    import zarr

    from xarray_zcache import CacheConfig, open_store

    reads: list[tuple[str, Callable[[], Any]]] = []
    a = zarr.open_array(mem, path="t", mode="r")
    reads.append(("zarr a[:] over MemoryStore", lambda a=a: a[:]))
    for label, decoded in (
        ("zarr a[:] over zcache, no decoded tier", 0),
        ("zarr a[:] over zcache + decoded tier", None),
    ):
        cfg = (
            CacheConfig()
            .with_name(f"bench-decoded-api-{decoded}")
            .without_disk_cache()
            .with_memory_size("256MB")
            .with_decoded_memory_size(decoded)
        )
        store = open_store(URL, storage_options=opts, cache_config=cfg)
        arr = zarr.open_array(store, path="t", mode="r")
        reads.append((label, lambda arr=arr: arr[:]))
    if importlib.util.find_spec("tensorstore") is not None:
        import tensorstore as ts

        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
            os.environ.setdefault(k, v)
        spec: dict[str, Any] = {
            "driver": "zarr3",
            "kvstore": {
                "driver": "s3",
                "bucket": BUCKET,
                "path": "decoded.zarr/t/",
                "endpoint": server.endpoint_url,
                "aws_region": "us-east-1",
                "aws_credentials": {"type": "environment"},
            },
            "recheck_cached_data": "open",
        }
        ctx = ts.Context({"cache_pool": {"total_bytes_limit": 256_000_000}})
        t = ts.open(spec, read=True, context=ctx).result()
        reads.append(("TensorStore zarr3 + cache_pool", lambda t=t: t.read().result()))
    with quiet():
        for _, read in reads:
            assert np.array_equal(np.asarray(read()), data)  # cold, and exact
        times: list[list[tuple[float, float]]] = [[] for _ in reads]
        load0 = os.getloadavg()
        for _ in range(rounds):
            for i, (_, read) in enumerate(reads):
                times[i].append(_time(read))
        load1 = os.getloadavg()
    walls = [statistics.median(w for w, _ in t) for t in times]
    fastest = [min(w for w, _ in t) for t in times]
    base = walls[0]
    ts = len(reads) - 1 if reads[-1][0].startswith("TensorStore") else None
    print(
        f"\nzarr's array API: warm a[:], median (and fastest) of {rounds} runs (round robin) "
        f"of the mean of {READS} reads; load average {load0[0]:.1f} before, "
        f"{load1[0]:.1f} after\n"
    )
    print(
        "| reader | warm `a[:]` | fastest run | vs MemoryStore | vs TensorStore "
        "| vs TensorStore, per run: median (max) | CPU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (label, _), w, f, t in zip(reads, walls, fastest, times, strict=True):
        cpu = statistics.median(c for _, c in t)
        vs_ts = per_run = "-"
        if ts is not None:
            vs_ts = f"{w / walls[ts]:.2f}x"
            # each run's ratio to TensorStore's run of the same round (same load)
            ratios = [a / b for (a, _), (b, _) in zip(t, times[ts], strict=True)]
            per_run = f"{statistics.median(ratios):.2f}x ({max(ratios):.2f}x)"
        print(
            f"| {label} | {w * 1e3:.2f} ms | {f * 1e3:.2f} ms | {w / base:.2f}x | {vs_ts} "
            f"| {per_run} | {cpu * 1e3:.1f} ms |"
        )


if __name__ == "__main__":
    main()
