"""xarray-zcache benchmark suite: one run, the same data, every reader and workload.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run.py            # the full default run (a few minutes)
    .venv/bin/python benchmarks/run.py --quick    # a small smoke run (< 1 minute)
    .venv/bin/python benchmarks/run.py --help     # sizes, latency, threads, sections...

What it does: starts moto's S3 (`xarray_zcache.testing.s3server.LocalS3Server`,
in a child process so that its request handling does not compete with the reader
for the GIL) with a fixed injected latency per request and server-side request
counting; writes one dataset (and a sharded copy); then measures, on that data:

* full reads cold / warm / after a restart (a fresh process) with: no cache
  (s3fs defaults, and ``max_concurrency=1``), fsspec ``simplecache`` /
  ``filecache`` / ``blockcache``, zarr's ``CacheStore`` (MemoryStore and
  LocalStore caches), xarray-zcache (memory only, memory + disk), and zarr
  ``MemoryStore`` / ``LocalStore`` copies as upper bounds; plus N re-opens each;
* Zipf-skewed chunk reads with a cache smaller than the working set, against
  plain LRU and Belady's optimum computed offline on the same trace;
* a sharded copy of the data (full read and a point time series);
* a LocalCluster doing the same analysis twice, and a cross-worker disk hit;
* micro-benchmarks: memory-hit ``get``, disk-hit latency vs index size,
  bookkeeping bytes per memory entry.

It prints the tables and the verdict on each target of issue 5, writes
``benchmarks/results/latest.json`` (and ``latest.md``) and the plot
``docs/_static/benchmarks.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

SECTIONS = ("readers", "restart", "zipf", "sharded", "cluster", "micro", "fsspec-extra")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="xarray-zcache benchmarks against no cache, fsspec and zarr caches",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small smoke run (< 1 minute)")
    p.add_argument("--shape", default=None, help="dataset shape T,Y,X (default 96,256,256)")
    p.add_argument("--chunks", default=None, help="chunk shape T,Y,X (default 1,128,128)")
    p.add_argument("--latency-ms", type=float, default=None, help="S3 latency per request (50)")
    p.add_argument("--threads", type=int, default=None, help="Dask threads (8)")
    p.add_argument("--reopens", type=int, default=None, help="re-opens per reader (20)")
    p.add_argument("--repeat", type=int, default=None, help="warm in-process reads, median (3)")
    p.add_argument("--zipf-alpha", type=float, default=None, help="Zipf exponent (1.0)")
    p.add_argument("--zipf-accesses", type=int, default=None, help="Zipf trace length (4000)")
    p.add_argument(
        "--zipf-capacity", type=float, default=None, help="cache / working set, bytes (0.25)"
    )
    p.add_argument("--workers", type=int, default=None, help="LocalCluster workers (4)")
    p.add_argument("--index-entries", type=int, default=None, help="large index size (1000000)")
    p.add_argument(
        "--skip",
        default="",
        help=f"comma-separated sections to skip: {', '.join(SECTIONS)}",
    )
    p.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "_static", "benchmarks.png"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Any:
    from common import Settings

    s = Settings()
    if args.quick:
        s.nt, s.latency, s.reopens, s.repeat = 16, 0.02, 5, 1
        s.zipf_accesses, s.cluster_workers, s.cluster_threads = 600, 2, 2
        s.index_large, s.micro_calls, s.shard_t = 20_000, 300, 4
        s.quick = True
    if args.shape:
        s.nt, s.ny, s.nx = (int(x) for x in args.shape.split(","))
    if args.chunks:
        s.chunk_t, s.chunk_y, s.chunk_x = (int(x) for x in args.chunks.split(","))
    for attr, val in (
        ("latency", None if args.latency_ms is None else args.latency_ms / 1000),
        ("threads", args.threads),
        ("reopens", args.reopens),
        ("repeat", args.repeat),
        ("zipf_alpha", args.zipf_alpha),
        ("zipf_accesses", args.zipf_accesses),
        ("zipf_capacity", args.zipf_capacity),
        ("cluster_workers", args.workers),
        ("index_large", args.index_entries),
    ):
        if val is not None:
            setattr(s, attr, val)
    s.skip = tuple(x.strip() for x in args.skip.split(",") if x.strip())
    unknown = set(s.skip) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--skip: unknown section(s) {sorted(unknown)}; expected {SECTIONS}")
    return s


def machine() -> dict[str, Any]:
    import dask
    import distributed
    import fsspec
    import numpy
    import s3fs
    import xarray
    import zarr

    import xarray_zcache

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "xarray-zcache": getattr(xarray_zcache, "__version__", "?"),
            "zarr": zarr.__version__,
            "xarray": xarray.__version__,
            "dask": dask.__version__,
            "distributed": distributed.__version__,
            "fsspec": fsspec.__version__,
            "s3fs": s3fs.__version__,
            "numpy": numpy.__version__,
        },
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- full reads ---------------------------------------------------------------------------------


def measure_reader(reader: Any, s: Any, server: Any, expect: Any) -> dict[str, Any]:
    import numpy as np

    from common import analysis, median, quiet, request_counts, timed
    from readers import opener

    open_ = opener(reader.spec)
    out: dict[str, Any] = {"label": reader.label}
    server.requests.reset()
    with quiet():
        t, ds = timed(open_)
    out["open"] = {"seconds": t, **request_counts(server.requests.records())}

    def read(phase: str) -> dict[str, Any]:
        server.requests.reset()
        seconds, got = timed(lambda: analysis(ds, s.threads))
        return {
            "seconds": seconds,
            "correct": bool(np.allclose(got, expect, rtol=1e-5)),
            **request_counts(server.requests.records()),
        }

    out["cold"] = read("cold")
    warm = read("warm")
    runs = [warm["seconds"]]
    if warm["seconds"] < 1.5:  # cheap: repeat, report the median
        for _ in range(s.repeat - 1):
            runs.append(read("warm")["seconds"])
    warm["runs"] = runs
    warm["seconds"] = median(runs)
    out["warm"] = warm
    ds.close()
    cfg = getattr(open_, "config", None)
    if cfg is not None:
        from xarray_zcache.registry import get_cache

        cache = get_cache(cfg)
        cache.flush()  # a later process (the restart column) must find every chunk on disk
        out["zcache_stats"] = cache.stats().to_dict()
    per_open, times = [], []
    server.requests.reset()
    for _ in range(s.reopens):
        before = len(server.requests)
        with quiet():
            t, ds = timed(open_)
        ds.close()
        per_open.append(len(server.requests) - before)
        times.append(t)
    out["reopen"] = {
        "requests": sum(per_open),
        "per_open": per_open,
        "after_first": sum(per_open[1:]),
        "seconds_median": median(times),
        **{f"kind_{k}": v for k, v in request_counts(server.requests.records()).items()},
    }
    return out


def run_restart(s: Any, server: Any, readers: list[Any]) -> dict[str, dict[str, Any]]:
    """Read again in a fresh process, with each reader that keeps a persistent tier."""
    from common import request_counts

    order = sorted(
        (r for r in readers if r.restartable),
        key=lambda r: (not r.key.startswith("zcache"), r.bound),  # zcache first
    )
    job = {"settings": s.to_dict(), "readers": [[r.key, r.spec] for r in order]}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "restart_child.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def send(line: str) -> None:
        proc.stdin.write(line + "\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    def expect_line(prefix: str) -> str:
        while True:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"restart process ended (status {proc.wait()})")
            if line.startswith(prefix):
                return line

    out: dict[str, dict[str, Any]] = {}
    try:
        send(json.dumps(job))
        expect_line("READY")
        for r in order:
            server.requests.reset()
            send("OPEN")
            expect_line("OPENED")
            opened = request_counts(server.requests.records())
            server.requests.reset()
            send("READ")
            res = json.loads(expect_line("{"))
            res["open"] = opened
            res["read"] = request_counts(server.requests.records())
            out[r.key] = res
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=120)
    return out


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    import numpy as np

    from common import BUCKET, DATASET, expected_result, silence_unclosed_sessions, write_datasets
    from readers import build_readers, copy_to_local, memory_store_from
    from report import (
        cluster_table,
        evaluate_targets,
        main_table,
        micro_table,
        plot,
        sharded_table,
        targets_table,
        zipf_table,
    )
    from s3proc import S3Process

    silence_unclosed_sessions()
    t_start = time.perf_counter()
    workdir = args.workdir or tempfile.mkdtemp(prefix="zcache-bench-")
    os.makedirs(workdir, exist_ok=True)
    res: dict[str, Any] = {
        "settings": {**s.to_dict(), "n_chunks": s.n_chunks},
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "readers": {},
    }
    log(
        f"xarray-zcache benchmarks: {s.nt}x{s.ny}x{s.nx} float32, chunks {s.chunks} "
        f"({s.n_chunks} chunks), {s.latency * 1000:g} ms latency, {s.threads} threads"
        + (" [quick]" if s.quick else "")
    )
    server = S3Process(latency=0.0)
    try:
        server.create_bucket(BUCKET)
        t0 = time.perf_counter()
        ds = write_datasets(s, server.storage_options())
        data = np.asarray(ds["t2m"].values)
        expect = expected_result(ds)
        fs = server.filesystem()
        stored = int(fs.du(f"{BUCKET}/{DATASET}"))
        res["dataset"] = {"stored_bytes": stored, "raw_bytes": int(data.nbytes)}
        readers = build_readers(
            s, server, workdir, include_fsspec_extra="fsspec-extra" not in s.skip
        )
        local = next(r for r in readers if r.key == "localstore").spec["path"]
        copy_to_local(fs, f"{BUCKET}/{DATASET}", local)
        next(r for r in readers if r.key == "memorystore").spec["store"] = memory_store_from(local)
        log(f"  data written ({stored / 2**20:.1f} MiB stored) in {time.perf_counter() - t0:.1f} s")
        server.latency = s.latency

        if "readers" not in s.skip:
            for r in readers:
                log(f"  full reads + re-opens: {r.label} ...")
                try:
                    res["readers"][r.key] = measure_reader(r, s, server, expect)
                except Exception as exc:  # keep going: report the failure in the table
                    traceback.print_exc()
                    res["readers"][r.key] = {"label": r.label, "error": repr(exc)}
            if "restart" not in s.skip:
                log("  restart: a fresh process reading from the persistent caches ...")
                try:
                    for key, rr in run_restart(s, server, readers).items():
                        res["readers"][key]["restart"] = rr
                except Exception as exc:
                    traceback.print_exc()
                    res["restart_error"] = repr(exc)

        sections = [
            ("zipf", "Zipf-skewed chunk reads", lambda: __import__("zipf").run_zipf(s, server, workdir)),
            (
                "sharded",
                "sharded array",
                lambda: __import__("sharded").run_sharded(s, server, workdir, data),
            ),
            (
                "cluster",
                f"{s.cluster_workers}-worker LocalCluster",
                lambda: __import__("cluster").run_cluster(s, server, workdir, data),
            ),
        ]
        for key, title, fn in sections:
            if key in s.skip:
                continue
            log(f"  {title} ...")
            t0 = time.perf_counter()
            try:
                res[key] = fn()
            except Exception as exc:
                traceback.print_exc()
                res[key + "_error"] = repr(exc)
            log(f"    ({time.perf_counter() - t0:.1f} s)")
        if "micro" not in s.skip:
            import micro

            log("  micro-benchmarks ...")
            res["micro"] = {}
            for key, fn in (
                ("memory_hit", lambda: micro.memory_hit(s, server)),
                ("index", lambda: micro.disk_index_scale(s, workdir)),
                ("bookkeeping", micro.entry_bookkeeping),
            ):
                try:
                    res["micro"][key] = fn()
                except Exception as exc:
                    traceback.print_exc()
                    res["micro"][key + "_error"] = repr(exc)
    finally:
        server.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    res["targets"] = evaluate_targets(res)
    res["seconds"] = time.perf_counter() - t_start
    m = res["machine"]
    v = m["versions"]
    parts = [
        f"## xarray-zcache benchmarks ({res['started']}, {res['seconds']:.0f} s)",
        "",
        f"Machine: {m.get('nproc')} cores ({m.get('cpu', '?')}), {m.get('memory_gib', '?')} GiB; "
        f"Python {m['python']}, zarr {v['zarr']}, xarray {v['xarray']}, dask {v['dask']}, "
        f"s3fs {v['s3fs']}.",
        f"Data: {s.nt}×{s.ny}×{s.nx} float32, chunks {s.chunks} = {s.n_chunks} chunks, "
        f"{res.get('dataset', {}).get('stored_bytes', 0) / 2**20:.1f} MiB stored (zstd); "
        f"{s.latency * 1000:g} ms per S3 request; {s.threads} Dask threads.",
    ]
    if res["readers"]:
        parts += ["", "### Full reads and re-opens", "", main_table(res)]
    if "zipf" in res:
        z = res["zipf"]
        parts += [
            "",
            f"### Zipf-skewed chunk reads (α={z['alpha']}, {z['accesses']} reads of "
            f"{z['distinct_chunks']} distinct chunks, capacity {z['capacity_bytes'] / 2**20:.1f}"
            f" MiB = {100 * z['capacity_fraction']:.0f} % of the working set)",
            "",
            zipf_table(z),
        ]
    if "sharded" in res:
        sh = res["sharded"]
        parts += [
            "",
            f"### Sharded copy (shards {tuple(sh['shards'])}, inner chunks "
            f"{tuple(sh['inner_chunks'])})",
            "",
            sharded_table(sh),
        ]
    if "cluster" in res:
        cl = res["cluster"]
        cw = cl["cross_worker"]
        parts += [
            "",
            f"### Dask LocalCluster ({cl['workers']} worker processes × "
            f"{cl['threads_per_worker']} threads, shared disk tier)",
            "",
            cluster_table(cl),
            "",
            f"Cross-worker: worker A read a fresh chunk ({cw['a']['chunk_gets']} S3 GET, "
            f"{cw['a']['misses']} miss); worker B then read it: {cw['b']['chunk_gets']} S3 GET, "
            f"{cw['b']['disk_hits']} disk hit, {cw['b']['misses']} miss.",
        ]
    if res.get("micro"):
        parts += ["", "### Micro-benchmarks", "", micro_table(res["micro"])]
    parts += ["", "### Targets (issue 5)", "", targets_table(res["targets"])]
    errors = {k: v for k, v in res.items() if k.endswith("_error")}
    if errors:
        parts += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
    text = "\n".join(parts)
    print(text)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, tuple | set):
            return list(o)
        return repr(o)

    with open(args.json, "w") as f:
        json.dump(res, f, indent=1, default=default)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
        f.write(text + "\n")
    log(f"\nwrote {args.json}")
    if not args.no_plot and res["readers"]:
        os.makedirs(os.path.dirname(args.plot), exist_ok=True)
        plot(res, args.plot)
        log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
