"""obstore or s3fs inside zcache (issue 19, item 2): cold and warm full reads.

The local S3 server (moto, in a child process: `s3proc.S3Process`) with an injected
latency per request holds a 48 x 256 x 256 float32 dataset, zstd, in 192 chunks of
(1, 128, 128). Each reader opens it with xarray (one dask chunk per zarr chunk) and
computes the spatial mean per time step (every chunk read once), on dask's threaded
scheduler:

* ``zcache + s3fs``: ``engine="zcache"`` with ``zcache.client: s3fs`` (FsspecStore);
* ``zcache + obstore``: ``engine="zcache"`` with ``zcache.client: obstore`` (ObjectStore);
* ``bare ObjectStore``: ``engine="zarr"`` over zarr's `ObjectStore` (no cache: its warm
  read is another cold read).

Cold: a fresh cache (new memory tier, new empty disk folder) and a fresh open. Warm: the
same cache, opened again (memory hits). Medians of ``--runs`` (3) runs per latency of the
wall-clock and the CPU time of this process (all its threads: dask's, fsspec's event
loop, obstore's runtime), with the server's request counts of one cold read (GETs,
HEADs, listings).

Usage::

    python benchmarks/client.py                       # latencies 0.02 and 0.1 s
    python benchmarks/client.py --latency 0.02 --runs 5 --threads 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import Settings, make_dataset, median, quiet, request_counts, write_zarr
from s3proc import S3Process

BUCKET = "zcache-client"
URL = f"s3://{BUCKET}/client.zarr"
READERS = ("zcache + s3fs", "zcache + obstore", "bare ObjectStore")


def write(server: S3Process, opts: dict[str, Any]) -> Any:
    from zarr.codecs import ZstdCodec

    s = Settings(nt=48, ny=256, nx=256, chunk_t=1, chunk_y=128, chunk_x=128)
    ds = make_dataset(s)
    server.create_bucket(BUCKET)
    with quiet():
        write_zarr(
            ds,
            URL,
            opts,
            mode="w",
            zarr_format=3,
            consolidated=True,
            encoding={"t2m": {"chunks": s.chunks, "compressors": [ZstdCodec(level=3)]}},
        )
    return np.asarray(ds["t2m"].values.mean(axis=(1, 2)))


def opener(kind: str, server: S3Process, opts: dict[str, Any], folder: str) -> Any:
    import xarray as xr

    from xarray_zcache import CacheConfig

    if kind == "bare ObjectStore":
        from obstore.store import S3Store
        from zarr.storage import ObjectStore

        def open_bare() -> Any:
            obs = S3Store(
                BUCKET,
                prefix="client.zarr",
                endpoint=server.endpoint_url,
                access_key_id="testing",
                secret_access_key="testing",
                region="us-east-1",
                client_options={"allow_http": True},
            )
            return xr.open_dataset(ObjectStore(obs, read_only=True), engine="zarr", chunks={})

        return open_bare
    client = "s3fs" if "s3fs" in kind else "obstore"
    config = (
        CacheConfig(validation=None)
        .with_name(f"bench-{client}-{Path(folder).name}")
        .with_disk_cache(folder, "2GB")
        .with_memory_size("512MiB")
        .with_client(client)  # type: ignore[arg-type]
    )

    def open_zcache() -> Any:
        return xr.open_dataset(
            URL, engine="zcache", chunks={}, storage_options=opts, cache_config=config
        )

    return open_zcache


def full_read(open_: Any, threads: int) -> tuple[float, float, np.ndarray]:
    """Wall-clock and CPU seconds (every thread of this process, obstore's included) of
    one open and full read."""
    import dask

    t0 = time.perf_counter()
    c0 = time.process_time()
    with quiet():
        ds = open_()
        with dask.config.set(scheduler="threads", num_workers=threads):
            out = np.asarray(ds["t2m"].mean(("y", "x")).compute().values)
    took = time.perf_counter() - t0
    cpu = time.process_time() - c0
    ds.close()
    return took, cpu, out


def run(
    latency: float,
    runs: int,
    threads: int,
    server: S3Process,
    opts: dict[str, Any],
    expected: np.ndarray,
) -> dict[str, dict[str, Any]]:
    from xarray_zcache.registry import close_all

    server.latency = latency
    results: dict[str, dict[str, Any]] = {
        k: {"cold": [], "warm": [], "cold_cpu": [], "warm_cpu": []} for k in READERS
    }
    for i in range(runs):
        for kind in READERS:  # interleaved: drifts of the machine hit every reader alike
            folder = tempfile.mkdtemp(prefix=f"zc-client-{i}-")
            try:
                open_ = opener(kind, server, opts, folder)
                server.requests.reset()
                cold, cold_cpu, out = full_read(open_, threads)
                np.testing.assert_allclose(out, expected, rtol=1e-5)
                results[kind].setdefault("requests", request_counts(server.requests.records()))
                warm, warm_cpu, out = full_read(open_, threads)
                np.testing.assert_allclose(out, expected, rtol=1e-5)
                results[kind]["cold"].append(cold)
                results[kind]["warm"].append(warm)
                results[kind]["cold_cpu"].append(cold_cpu)
                results[kind]["warm_cpu"].append(warm_cpu)
            finally:
                close_all()
                shutil.rmtree(folder, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency", type=float, action="append", help="seconds (0.02 and 0.1)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    latencies = args.latency or [0.02, 0.1]
    server = S3Process(latency=0.0)
    try:
        opts = server.storage_options()
        expected = write(server, opts)
        table: dict[str, Any] = {}
        print(
            f"48x256x256 float32 zstd, 192 chunks; {args.threads} dask threads; "
            f"median of {args.runs}"
        )
        print()
        print(
            "| latency | reader | cold (s) | warm (s) | cold CPU (s) | warm CPU (s) "
            "| cold requests (GET/HEAD/list) |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
        for latency in latencies:
            res = run(latency, args.runs, args.threads, server, opts, expected)
            table[str(latency)] = res
            for kind in READERS:
                r = res[kind]
                c = r["requests"]
                print(
                    f"| {latency * 1000:g} ms | {kind} | {median(r['cold']):.3f} | "
                    f"{median(r['warm']):.3f} | {median(r['cold_cpu']):.2f} | "
                    f"{median(r['warm_cpu']):.2f} | {c['get']}/{c['head']}/{c['list']} |",
                    flush=True,
                )
        if args.json:
            args.json.write_text(json.dumps(table, indent=1))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
