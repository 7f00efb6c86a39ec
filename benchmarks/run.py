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
  bookkeeping bytes per memory entry;
* against the strongest peers (`peers.py`, its own S3 server and data, at 20 and
  100 ms): zcache with s3fs / obstore inside, bare `ObjectStore`, Icechunk's chunk
  cache, TensorStore's ``cache_pool``, `MemoryStore` and the raw-fetch floor; its table
  goes to ``benchmarks/results/peers.md`` and its plot to
  ``docs/_static/bench-peers.png``.

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

DEFAULT_JSON = os.path.join(HERE, "results", "latest.json")
SECTIONS = (
    "readers",
    "restart",
    "prefetch",
    "zipf",
    "sharded",
    "cluster",
    "micro",
    "fsspec-extra",
    "peers",
)


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
    p.add_argument(
        "--warm-rounds", type=int, default=None, help="round-robin warm reads, median (7)"
    )
    p.add_argument("--restart-runs", type=int, default=None, help="fresh processes, median (3)")
    p.add_argument("--cold-runs", type=int, default=None, help="cold reads, median (3)")
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
    p.add_argument("--json", default=DEFAULT_JSON, help="where to write the results")
    p.add_argument(
        "--from-json", default=None, help="only re-render the report and plot from saved results"
    )
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "_static", "benchmarks.png"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--workdir", default=None, help="where to create the scratch folder (default: $TMPDIR)"
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (caches)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Any:
    from common import Settings

    s = Settings()
    if args.quick:
        s.nt, s.latency, s.reopens, s.warm_rounds, s.restart_runs = 16, 0.02, 5, 3, 1
        s.cold_runs = 1
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
        ("warm_rounds", args.warm_rounds),
        ("restart_runs", args.restart_runs),
        ("cold_runs", args.cold_runs),
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


def git_state() -> dict[str, Any]:
    """The commit measured and the files modified in the working tree (others edit concurrently)."""

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.rstrip("\n")

    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "dirty": [line[3:] for line in git("status", "--porcelain").splitlines() if line[3:]],
    }


def server_capacity(server: Any, bucket: str, key: str, n: int = 200) -> dict[str, Any]:
    """Time per request of the local S3 with no injected latency: sequential and 16 at once."""
    import asyncio

    fs = server.filesystem(asynchronous=False)
    path = f"{bucket}/{key}"
    fs.cat_file(path)
    t0 = time.perf_counter()
    for _ in range(n // 4):
        fs.cat_file(path)
    seq = (time.perf_counter() - t0) / (n // 4)

    async def burst() -> float:
        afs = server.filesystem(asynchronous=True)
        session = await afs.set_session()
        sem = asyncio.Semaphore(16)

        async def one() -> None:
            async with sem:
                await afs._cat_file(path)

        await one()
        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        dt = time.perf_counter() - t
        await session.close()
        return dt

    par = asyncio.run(burst())
    return {"sequential_ms": seq * 1e3, "concurrent16_per_s": n / par}


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- full reads ---------------------------------------------------------------------------------


def _other_requests(records: list[Any]) -> list[str]:
    """The requests of a read other than chunk GETs, e.g. ``"GET t2m/zarr.json 200"``."""
    return [
        f"{r.method} {r.key or ('?' + r.query if r.query else '/')} {r.status}"
        for r in records
        if not (r.method == "GET" and r.key is not None and not r.is_metadata)
    ]


def measure_reader(reader: Any, s: Any, server: Any, expect: Any) -> dict[str, Any]:
    """Open (untimed), cold read, one warm read right after, then the re-opens."""
    import numpy as np
    from common import analysis, median, quiet, request_counts, timed
    from readers import opener

    open_ = opener(reader.spec)
    reader.open = open_  # the round-robin warm reads reuse it (CacheStore keeps state in it)
    out: dict[str, Any] = {"label": reader.label}
    server.requests.reset()
    with quiet():
        t, ds = timed(open_)
    out["open"] = {"seconds": t, **request_counts(server.requests.records())}

    def read() -> dict[str, Any]:
        server.requests.reset()
        seconds, got = timed(lambda: analysis(ds, s.threads))
        recs = server.requests.records()
        return {
            "seconds": seconds,
            "correct": bool(np.allclose(got, expect, rtol=1e-5)),
            **request_counts(recs),
            "other_requests": _other_requests(recs)[:20],
        }

    out["cold"] = read()
    warm = read()  # right after the cold read (background work of the cold read may still run)
    warm["first_seconds"] = warm["seconds"]
    warm["runs"] = [warm["seconds"]]
    out["warm"] = warm
    if reader.key == "nocache_mc1" and s.cold_runs > 2:
        out["cold"]["extra"] = [read() for _ in range(s.cold_runs - 2)]
    ds.close()
    cfg = getattr(open_, "config", None)
    if cfg is not None:
        from xarray_zcache.registry import get_cache

        cache = get_cache(cfg)
        t0 = time.perf_counter()
        cache.flush()  # a later process (the restart column) must find every chunk on disk
        out["flush_seconds"] = time.perf_counter() - t0
        out["zcache_stats"] = cache.stats().to_dict()
    extra_cold_runs(reader, s, out, expect)
    if not reader.reopen:
        out["reopen"] = None
        return out
    per_open, times = [], []
    server.requests.reset()
    for _ in range(s.reopens):
        before = len(server.requests)
        with quiet():
            t, ds = timed(open_)
        ds.close()
        per_open.append(len(server.requests) - before)
        times.append(t)
    recs = server.requests.records()
    out["reopen"] = {
        "requests": sum(per_open),
        "per_open": per_open,
        "after_first": sum(per_open[1:]),
        "seconds_median": median(times),
        "kinds": request_counts(recs),
        "sample": _other_requests(recs)[: max(1, per_open[0] if per_open else 0) + 2],
    }
    return out


def extra_cold_runs(reader: Any, s: Any, out: dict[str, Any], expect: Any) -> None:
    """More cold reads (``cold_runs`` in all) for the rows the cold-read targets compare.

    A single cold read over the network varies by +-30 % from run to run here; the
    targets use the median. xarray-zcache: each run on a fresh cache (a new cache name
    and disk folder). No cache: every read is cold (the warm read counts as one too).
    """
    import numpy as np
    from common import analysis, median, quiet, timed
    from readers import opener

    from xarray_zcache import CacheConfig
    from xarray_zcache.registry import get_cache

    cold = out["cold"]
    runs = [cold["seconds"]]
    if reader.key.startswith("nocache"):
        runs.append(out["warm"]["seconds"])  # uncached: the warm read is another cold read
    runs += [r["seconds"] for r in cold.pop("extra", [])]
    if reader.key.startswith("zcache"):
        for i in range(1, s.cold_runs):
            spec = dict(reader.spec)
            cfg = dict(spec["config"])
            cfg["name"] = f"{cfg['name']}-run{i}"
            if cfg.get("disk_path"):
                cfg["disk_path"] = f"{cfg['disk_path']}-run{i}"
            spec["config"] = cfg
            with quiet():
                ds = opener(spec)()
            seconds, got = timed(lambda: analysis(ds, s.threads))  # noqa: B023
            ds.close()
            get_cache(CacheConfig.from_dict(cfg)).close()
            runs.append(seconds)
            cold["correct"] = cold["correct"] and bool(np.allclose(got, expect, rtol=1e-5))
    cold["runs"] = runs
    cold["first_seconds"] = runs[0]
    cold["seconds"] = median(runs)


def warm_round_robin(readers: list[Any], s: Any, results: dict[str, Any], expect: Any) -> None:
    """Warm reads of every caching reader, in rotation, ``warm_rounds`` times; the median.

    On 2 cores a 0.2-0.5 s read varies by ±50 % from run to run; rotating the readers
    spreads whatever disturbs the machine over all of them.
    """
    import numpy as np
    from common import analysis, median, quiet, timed
    from readers import opener

    chosen = []
    for r in readers:
        res = results.get(r.key)
        if res is None or "error" in res or res["warm"]["total"] > 0:
            continue  # no cache (the warm read goes to S3 again): not repeated
        with quiet():
            ds = (r.open or opener(r.spec))()
        chosen.append((r, ds))
    runs: dict[str, list[float]] = {r.key: [] for r, _ in chosen}
    for _ in range(s.warm_rounds):
        for r, ds in chosen:
            seconds, got = timed(lambda: analysis(ds, s.threads))  # noqa: B023
            runs[r.key].append(seconds)
            if not np.allclose(got, expect, rtol=1e-5):
                results[r.key]["warm"]["correct"] = False
    for r, ds in chosen:
        ds.close()
        w = results[r.key]["warm"]
        w["runs"] = runs[r.key]
        w["seconds"] = median(runs[r.key])
        w["min_seconds"] = min(runs[r.key])


def prefetch_sweep(s: Any, server: Any) -> dict[str, Any] | None:
    """Cold full reads (memory-only cache) with read-ahead off, default, 2x and 4x deeper."""
    import dataclasses

    from common import analysis, median, quiet, request_counts, timed
    from readers import opener, zcache_config

    from xarray_zcache import CacheConfig

    default = getattr(CacheConfig(), "prefetch_depth", None)
    if default is None:
        return None  # this version has no read-ahead
    depths = sorted({0, default, 2 * max(default, 16), 4 * max(default, 16)})
    rows = []
    for depth in depths:
        name = f"bench-prefetch-{depth}"
        spec = {
            "type": "zcache",
            "url": s.url(),
            "so": server.default_storage_options(),  # no tag: obstore inside
            "config": zcache_config(name, None),
        }
        spec["config"] = dataclasses.replace(
            CacheConfig.from_dict(spec["config"]), prefetch_depth=depth
        ).to_dict()
        runs = []
        for i in range(min(2, s.cold_runs)):  # each on a fresh cache
            run_spec = {**spec, "config": {**spec["config"], "name": f"{name}-{i}"}}
            with quiet():
                ds = opener(run_spec)()
            server.requests.reset()
            seconds, _ = timed(lambda: analysis(ds, s.threads))  # noqa: B023
            ds.close()
            runs.append(seconds)
        rows.append(
            {
                "depth": depth,
                "seconds": median(runs),
                "runs": runs,
                **request_counts(server.requests.records()),
            }
        )
    return {"default": default, "rows": rows}


def run_restart(s: Any, server: Any, readers: list[Any]) -> dict[str, dict[str, Any]]:
    """`restart_once` ``restart_runs`` times; per reader the median time, the first counts."""
    from common import median

    runs = [restart_once(s, server, readers) for _ in range(max(1, s.restart_runs))]
    out = runs[0]
    for key, first in out.items():
        times = [r[key]["seconds"] for r in runs]
        first["runs"] = times
        first["seconds"] = median(times)
        first["correct"] = all(r[key]["correct"] for r in runs)
        first["chunk_gets_all_runs"] = [r[key]["read"]["chunk_get"] for r in runs]
    return out


def restart_once(s: Any, server: Any, readers: list[Any]) -> dict[str, dict[str, Any]]:
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
            recs = server.requests.records()
            res["read"] = request_counts(recs)
            res["other_requests"] = _other_requests(recs)[:20]
            out[r.key] = res
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=120)
    return out


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:  # re-render tables and plot from saved results
        with open(args.from_json) as f:
            res = json.load(f)
        from report import evaluate_targets

        res["targets"] = evaluate_targets(res)
        if args.json == DEFAULT_JSON:
            args.json = args.from_json
        write_outputs(res, args)
        return 0
    s = settings_from(args)
    import numpy as np
    from common import (
        BUCKET,
        DATASET,
        expected_result,
        quiet,
        silence_unclosed_sessions,
        write_datasets,
    )
    from readers import build_readers, copy_to_local, memory_store_from
    from report import evaluate_targets
    from s3proc import S3Process

    silence_unclosed_sessions()
    t_start = time.perf_counter()
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    # always a fresh folder: the caches on disk must start empty
    workdir = tempfile.mkdtemp(prefix="zcache-bench-", dir=args.workdir)
    res: dict[str, Any] = {
        "settings": {**s.to_dict(), "n_chunks": s.n_chunks},
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git": git_state(),
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
        ds = write_datasets(s, server.storage_options(skip_instance_cache=True))
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
        mem_store = memory_store_from(local)
        next(r for r in readers if r.key == "memorystore").spec["store"] = mem_store
        log(f"  data written ({stored / 2**20:.1f} MiB stored) in {time.perf_counter() - t0:.1f} s")
        try:
            res["server"] = server_capacity(server, BUCKET, f"{DATASET}/t2m/c/0/0/0")
        except Exception as exc:  # informative only
            res["server"] = {"error": repr(exc)}
        server.latency = s.latency
        from restart_child import _warm_up

        with quiet():  # one-time costs (dask imports distributed at its first compute...)
            _warm_up(s.threads)

        if "readers" not in s.skip:
            for r in readers:
                log(f"  full reads + re-opens: {r.label} ...")
                t0 = time.perf_counter()
                try:
                    res["readers"][r.key] = measure_reader(r, s, server, expect)
                    log(f"    ({time.perf_counter() - t0:.1f} s)")
                except Exception as exc:  # keep going: report the failure in the table
                    traceback.print_exc()
                    res["readers"][r.key] = {"label": r.label, "error": repr(exc)}
            log("  warm reads, round robin ...")
            try:
                warm_round_robin(readers, s, res["readers"], expect)
            except Exception as exc:
                traceback.print_exc()
                res["warm_error"] = repr(exc)
            if "restart" not in s.skip:
                log("  restart: a fresh process reading from the persistent caches ...")
                try:
                    for key, rr in run_restart(s, server, readers).items():
                        res["readers"][key]["restart"] = rr
                except Exception as exc:
                    traceback.print_exc()
                    res["restart_error"] = repr(exc)

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
        sections = [
            (
                "zipf",
                "Zipf-skewed chunk reads",
                lambda: __import__("zipf").run_zipf(s, server, workdir, mem_store),
            ),
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
        sections.insert(
            0,
            (
                "prefetch",
                "cold read vs read-ahead depth",
                lambda: prefetch_sweep(s, server),
            ),
        )
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
    finally:
        from xarray_zcache.registry import close_all

        close_all()  # flush and close every cache before its folder goes
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    res["targets"] = evaluate_targets(res)
    res["seconds"] = time.perf_counter() - t_start
    write_outputs(res, args)
    if "peers" not in s.skip:
        run_peers(s, args)
    return 0


def run_peers(s: Any, args: argparse.Namespace) -> None:
    """The comparison with the strongest peers (`peers.py`), after the rest (its own server)."""
    import peers

    log("\nagainst the strongest peers (benchmarks/peers.py) ...")
    out = os.path.dirname(os.path.abspath(args.json))
    argv = [
        "--json",
        os.path.join(out, "peers.json"),
        "--md",
        os.path.join(out, "peers.md"),
    ]
    if s.quick:
        argv.append("--quick")
    if not args.no_plot:
        argv += [
            "--plot",
            os.path.join(os.path.dirname(os.path.abspath(args.plot)), "bench-peers.png"),
        ]
    if args.workdir:
        argv += ["--workdir", args.workdir]
    try:
        peers.main(argv)
    except Exception:
        traceback.print_exc()


def write_outputs(res: dict[str, Any], args: argparse.Namespace) -> None:
    """JSON first (so a failure below loses nothing), then the report, the markdown, the plot."""
    import numpy as np
    from report import plot, render

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, tuple | set):
            return list(o)
        return repr(o)

    if not args.from_json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=default)
        log(f"\nwrote {args.json}")
    text = render(res)
    print(text)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
        f.write(text + "\n")
    if not args.no_plot and res["readers"]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log("no plot: matplotlib is not installed (pip install matplotlib)")
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(res, args.plot)
        log(f"wrote {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
