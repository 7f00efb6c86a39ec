"""Never stale beyond a bound: what validation costs, on the local S3 server.

Usage::

    .venv/bin/python benchmarks/freshness.py              # 10,000 chunks
    .venv/bin/python benchmarks/freshness.py --chunks 2000 --interval 10

An array of ``--chunks`` chunks (one time step each) is read once through zcache, so
that it is fully cached on disk. Then another writer (plain xarray, not through
zcache) rewrites 1% of the chunks in place and appends 10 time steps. Each later pass
is a new process on the same cache folder (a fresh cache: memory empty; simulated by
closing every cache of this process), reading the whole array:

* validation ``"never"`` (the first release's behaviour): no request, old values;
* validation on, before the interval has passed since the last validation: no
  request, old values (the bound: at most ``--interval`` seconds stale);
* validation due: `CachedStore.revalidate` (what ``zcache validate`` runs, and the
  same listings the read gate sends once the interval has run out), then the read:
  listings of the array plus one GET per changed or new chunk, values equal to the
  new source; then a warm pass.

Requests are counted by the S3 server itself: listings (``ListObjectsV2``) and GETs
of chunk objects (the metadata documents are counted apart).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def _dataset(n: int, width: int) -> Any:
    import xarray as xr

    data = np.arange(n * width, dtype="f4").reshape(n, width)
    return xr.Dataset({"v": (("time", "x"), data)}, coords={"time": np.arange(n)})


def _read(url: str, opts: dict[str, Any], cfg: Any) -> np.ndarray:
    import xarray as xr

    with xr.open_dataset(url, engine="zcache", storage_options=opts, cache_config=cfg) as ds:
        return np.asarray(ds.v.values)


def _source(url: str, opts: dict[str, Any]) -> np.ndarray:
    import xarray as xr

    from xarray_zcache.testing.writers import s3fs_store

    with (
        s3fs_store(url, opts, read_only=True) as store,
        xr.open_dataset(store, engine="zarr") as ds,
    ):
        return np.asarray(ds.v.values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=16, help="values per chunk")
    parser.add_argument(
        "--grid-rows", type=int, default=1000, help="rows of the 2-D array (10 chunks each)"
    )
    parser.add_argument(
        "--interval", type=float, default=300.0, help="validation interval (default 5 min)"
    )
    args = parser.parse_args()
    logging.getLogger("xarray_zcache").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")

    from zarr.core.sync import sync

    from xarray_zcache import CacheConfig, open_store
    from xarray_zcache.registry import close_all
    from xarray_zcache.testing.s3server import LocalS3Server
    from xarray_zcache.testing.writers import write_zarr

    server = LocalS3Server().start()
    server.create_bucket("fresh")
    opts = server.storage_options()
    url = "s3://fresh/series.zarr"
    n, width = args.chunks, args.width
    t0 = time.perf_counter()
    ds = _dataset(n, width)
    write_zarr(ds, url, opts, encoding={"v": {"chunks": (1, width)}}, zarr_format=3)
    print(f"wrote {n} chunks in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    folder = tempfile.mkdtemp(prefix="zcache-fresh-")
    base = CacheConfig().with_name("fresh").with_disk_cache(folder, "2GB").with_prefetch(0)
    log = server.requests
    rows: list[tuple[str, int, int, int, int, str, float]] = []

    def run(label: str, cfg: Any, restart: bool = True, validate: bool = False) -> None:
        if restart:
            close_all()
        lists, gets = log.lists("fresh"), log.chunk_gets("fresh")
        meta = log.count("GET", bucket="fresh") - gets - lists
        before = open_store(url, storage_options=opts, cache_config=cfg).stats()
        t = time.perf_counter()
        if validate:  # what `zcache validate URL` does, and the gate once the interval ran out
            sync(open_store(url, storage_options=opts, cache_config=cfg).revalidate())
        got = _read(url, opts, cfg)
        seconds = time.perf_counter() - t
        lists2, gets2 = log.lists("fresh"), log.chunk_gets("fresh")
        meta2 = log.count("GET", bucket="fresh") - gets2 - lists2
        stats = open_store(url, storage_options=opts, cache_config=cfg).stats() - before
        truth = _source(url, opts)
        same = got.shape == truth.shape and bool(np.array_equal(got, truth))
        # (counted before the comparison's own reads of the source, which follow)
        verdict = "yes" if same else "NO"
        checks = stats.validation_requests
        rows.append(
            (label, checks, lists2 - lists - checks, gets2 - gets, meta2 - meta, verdict, seconds)
        )

    on = base.with_validation(args.interval)
    # the first release at its most trusting: no validation, metadata kept until evicted
    never = base.with_validation("never").with_ttl(metadata=None)
    run("1 cold read", on, restart=False)
    run("2 warm, same process", on, restart=False)
    run("3 new process", on)
    run("3b new process, validation never", never)
    # another writer: 1% of the chunks rewritten in place, 10 time steps appended
    rng = np.random.default_rng(0)
    changed = np.sort(rng.choice(n, size=max(1, n // 100), replace=False))
    import xarray as xr

    for i in changed:
        part = xr.Dataset({"v": (("time", "x"), np.full((1, width), -1.0, dtype="f4"))})
        write_zarr(part, url, opts, region={"time": slice(int(i), int(i) + 1)})
    extra = _dataset(10, width)
    extra = extra.assign_coords(time=np.arange(n, n + 10))
    write_zarr(extra, url, opts, append_dim="time")
    print(f"rewrote {len(changed)} chunks and appended 10", file=sys.stderr)
    # each pass after the change starts from the same cached state: a copy of the folder
    # as the passes before the change left it (one pass's validation cannot serve another)
    close_all()
    copies = [tempfile.mkdtemp(prefix="zcache-fresh-copy-") for _ in range(3)]
    for copy in copies:
        shutil.copytree(folder, copy, dirs_exist_ok=True)
    at = [
        cfg.with_disk_cache(copy, "2GB") for cfg, copy in zip((never, on, on), copies, strict=True)
    ]
    run("4 after the change: new process, validation never", at[0])
    run("5 after the change: new process, validation on", at[1])
    run("6 after the change: new process, `zcache validate` then read", at[2], validate=True)
    run("7 warm again, same process", at[2], restart=False)
    region = _region_rows(server, opts, base.with_validation(args.interval), args)
    close_all()
    server.stop()
    for path in (folder, *copies):
        shutil.rmtree(path, ignore_errors=True)

    arrays = 2  # v and its coordinate time
    bound = math.ceil((n + 10) / 1000) + arrays
    print(f"\n{n} chunks cached; another writer rewrote {len(changed)} (1%) and appended 10;")
    print(f"validation interval {args.interval:g} s. Target after the change: <= {bound} ")
    print(f"listings (ceil(N/1000) + arrays) and {len(changed) + 10 + 1} chunk GETs at most")
    print("(changed + new + the last chunk of time).\n")
    print(
        "| pass | validation listings | other listings (xarray's) | chunk GETs "
        "| metadata GETs | values = source | seconds |"
    )
    print("|---|---:|---:|---:|---:|---|---:|")
    for label, checks, lists, gets, meta, same, seconds in rows:
        print(f"| {label} | {checks} | {lists} | {gets} | {meta} | {same} | {seconds:.1f} |")
    print(region)


def _region_rows(server: Any, opts: dict[str, Any], cfg: Any, args: Any) -> str:
    """A reader of one region of a large 2-D array: validation lists the cached rows only."""
    import xarray as xr
    from zarr.core.sync import sync

    from xarray_zcache import open_store
    from xarray_zcache.testing.writers import s3fs_store, write_zarr

    rows, cols, width = args.grid_rows, 10, args.width
    url = "s3://fresh/grid.zarr"
    data = np.arange(rows * cols * width, dtype="f4").reshape(rows, cols * width)
    write_zarr(
        xr.Dataset({"g": (("t", "x"), data)}),
        url,
        opts,
        encoding={"g": {"chunks": (1, width)}},
        zarr_format=3,
    )
    log = server.requests
    first, last = rows // 10, rows // 10 + 5  # 5 rows of the grid: 50 chunks
    kw = {"engine": "zcache", "storage_options": opts, "cache_config": cfg}
    with xr.open_dataset(url, **kw) as ds:
        ds.g[first:last].load()
    part = xr.Dataset({"g": (("t", "x"), np.full((1, width), -1.0, dtype="f4"))})
    for row in (first + 1, rows - 1):  # a cached chunk and one that is not cached
        write_zarr(part, url, opts, region={"t": slice(row, row + 1), "x": slice(0, width)})
    lists, gets = log.lists("fresh"), log.chunk_gets("fresh")
    report = sync(open_store(url, storage_options=opts, cache_config=cfg).revalidate())
    lists2 = log.lists("fresh")
    with xr.open_dataset(url, **kw) as ds:
        got = np.asarray(ds.g[first:last].values)
    gets2 = log.chunk_gets("fresh")
    with (
        s3fs_store(url, opts, read_only=True) as store,
        xr.open_dataset(store, engine="zarr") as ds,
    ):
        same = bool(np.array_equal(got, ds.g[first:last].values))
    whole = math.ceil((rows * cols + 1) / 1000)
    return (
        f"\nA region of a large array: {rows} x {cols} chunks ({rows * cols} objects, "
        f"{whole} pages to list whole); rows {first}-{last - 1} read (50 chunks); another "
        "writer rewrote one cached and one uncached chunk; `revalidate()` then the region "
        "read again:\n\n"
        "| validation listings (server) | listing the whole array would send | objects "
        "checked | changed | chunk GETs after | values = source |\n"
        "|---:|---:|---:|---:|---:|---|\n"
        f"| {lists2 - lists} | {whole} + 1 | {report.objects} | {report.changed} "
        f"| {gets2 - gets} | {'yes' if same else 'NO'} |"
    )


if __name__ == "__main__":
    main()
