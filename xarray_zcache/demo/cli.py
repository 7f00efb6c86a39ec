"""``python -m xarray_zcache.demo``: the command line, and the run of the three passes (`main`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import xarray as xr
from dask.utils import format_bytes

from xarray_zcache._quiet import silence_unclosed_sessions
from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.demo.options import _nested, build_parser
from xarray_zcache.demo.passes import (
    _RESULT_MARKER,
    PassFigures,
    ReadSpec,
    _numeric_vars,
    _quiet_warnings,
    run_cluster_pass,
    run_pass,
    run_restart_pass,
)
from xarray_zcache.demo.report import (
    _dask_chunks,
    _describe,
    _other_requests,
    _print,
    _same,
    format_table,
    print_cluster_report,
)
from xarray_zcache.demo.sample import (
    DEMO_BUCKET,
    DEMO_PATH,
    DEMO_URL,
    SAMPLE_CHUNKS,
    _chunk_counts,
    make_sample_dataset,
    write_sample_dataset,
)
from xarray_zcache.registry import get_cache

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# -- the restart pass (a child process) -----------------------------------------------------------


def _restart_child() -> int:
    """Entry point of the restart process: spec as JSON on stdin, figures as JSON on stdout."""
    spec = ReadSpec(**json.loads(sys.stdin.read()))
    cache = get_cache(spec.config())
    figures, result = run_pass("restart", spec, cache)
    cache.close()
    # results travel as Zarr in a temporary folder (no pickle anywhere in this package)
    out = tempfile.mkdtemp(prefix="zcache-demo-result-")
    means, maximum = result
    with _quiet_warnings():
        means.to_zarr(os.path.join(out, "means.zarr"), zarr_format=3)
        maximum.to_dataset(name=maximum.name or "max").to_zarr(
            os.path.join(out, "max.zarr"), zarr_format=3
        )
    payload = {"figures": dataclasses.asdict(figures), "result": out}
    sys.stdout.write(_RESULT_MARKER + json.dumps(payload) + "\n")
    sys.stdout.flush()
    return EXIT_OK


# -- main -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    silence_unclosed_sessions()
    if args.restart_pass:
        return _restart_child()
    if args.url is None and (args.storage_option or args.variables or args.isel):
        parser.error("--storage-option, --variable and --isel only apply with --url")

    keep_cache = args.cache_dir is not None
    cache_dir = (
        os.path.abspath(os.path.expanduser(args.cache_dir))
        if keep_cache
        else tempfile.mkdtemp(prefix="zcache-demo-")
    )
    server: Any = None
    cache: HybridCache | None = None
    stack = contextlib.ExitStack()
    try:
        if args.url is None:
            from xarray_zcache.testing.s3server import LocalS3Server

            server = LocalS3Server(latency=0.0).start()
            spec = ReadSpec(
                url=DEMO_URL,
                storage_options=server.storage_options(),
                cache_dir=cache_dir,
                memory_size=args.memory_size,
                disk_size=args.disk_size,
            )
            sample = make_sample_dataset()
            counts = _chunk_counts(sample, SAMPLE_CHUNKS)
            _print(
                "xarray-zcache demo: cold / warm / restart reads of a Zarr dataset on S3",
                f"  local S3 server  {server.endpoint_url} (moto; {args.latency * 1000:g} ms "
                "added per request)",
                f"  dataset          {DEMO_URL} (zarr format 3)",
                f"                   {_describe(sample)}",
                f"                   chunks {tuple(SAMPLE_CHUNKS.values())}: "
                f"{sum(counts.values())} chunks ({len(counts)} x {max(counts.values())}) "
                f"+ {len(sample.coords)} coordinate chunks",
            )
            t0 = time.perf_counter()
            server.create_bucket(DEMO_BUCKET)
            with _quiet_warnings():
                write_sample_dataset(sample, DEMO_URL, server.storage_options())
            stored = int(server.filesystem().du(f"{DEMO_BUCKET}/{DEMO_PATH}"))
            _print(
                f"                   {format_bytes(sample.nbytes)} uncompressed, "
                f"{format_bytes(stored)} stored (written in {time.perf_counter() - t0:.1f} s)"
            )
            server.latency = args.latency
        else:
            spec = ReadSpec(
                url=args.url,
                storage_options=_nested(args.storage_option),
                cache_dir=cache_dir,
                memory_size=args.memory_size,
                disk_size=args.disk_size,
                variables=args.variables,
                isel=dict(args.isel) or None,
            )
            _print(
                "xarray-zcache demo: cold / warm / restart reads of a Zarr dataset",
                f"  dataset          {args.url}",
            )
            # inspect with the plain zarr engine: the zcache passes start cold
            with _quiet_warnings():
                peek = xr.open_dataset(
                    args.url,
                    engine="zarr",
                    chunks={},
                    storage_options=spec.storage_options or None,
                )
            if spec.variables:
                peek = peek[spec.variables]
            if spec.isel:
                peek = peek.isel({d: slice(0, n) for d, n in spec.isel.items()})
            selected = peek[_numeric_vars(peek)]
            _print(
                f"                   {_describe(peek)}",
                f"                   {_dask_chunks(peek)} chunks, "
                f"{format_bytes(selected.nbytes)} to read (uncompressed)",
            )
            if selected.nbytes > args.memory_size:
                _print(
                    "  note: the data read is larger than the memory tier: the warm pass will "
                    "also read from disk (raise --memory-size, or narrow with --variable/--isel)"
                )
            peek.close()

        config = spec.config()
        cache = get_cache(config)
        existing = cache.stats().disk_entries
        _print(
            f"  cache folder     {cache_dir}"
            + (" (kept)" if keep_cache else " (temporary, removed at the end)"),
            f"  cache tiers      memory {format_bytes(config.memory_size)}, "
            f"disk {format_bytes(config.disk_size)}",
        )
        if existing and server is not None:
            _print(
                f"  note: the cache folder already holds {existing} entries from earlier runs; "
                "they do not match (each run's server has a new address)"
            )
        elif existing:
            _print(
                f"  note: the cache folder already holds {existing} entries: the cold pass "
                "may be served partly from disk"
            )
        _print("")

        results: list[Any] = []
        rows: list[PassFigures] = []

        def record(figures: PassFigures, result: Any) -> None:
            if server is not None:
                # count server-side: sees every process, and every kind of request
                figures.requests = len(server.requests)
                figures.chunk_requests = server.requests.chunk_gets(DEMO_BUCKET)
                figures.other_requests = _other_requests(server.requests.records())
            rows.append(figures)
            results.append(result)

        client: Any = None
        if args.workers:
            from distributed import Client, LocalCluster

            import xarray_zcache.distributed as zd

            cluster = LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=args.workers, threads_per_worker=2, dashboard_address=":0"
            )
            client = Client(cluster)  # type: ignore[no-untyped-call]
            stack.callback(cluster.close)
            stack.callback(client.close)
            zd.install(client, config)
            _print(
                f"  dask cluster     {args.workers} workers, dashboard {client.dashboard_link}", ""
            )
        settle = 2.5 * config.report_interval

        for name in ("cold", "warm"):
            _print(f"pass {len(rows) + 1}: {name} ...")
            if server is not None:
                server.requests.reset()
            if client is not None:
                record(*run_cluster_pass(name, spec, client, settle))
            else:
                record(*run_pass(name, spec, cache))

        if client is not None:
            _print("pass 3: restart (every worker restarted, same cache folder) ...")
            client.restart_workers(list(client.scheduler_info()["workers"]))
            if server is not None:
                server.requests.reset()
            record(*run_cluster_pass("restart", spec, client, settle))
        else:
            # the restart process must find every chunk of passes 1-2 on disk
            cache.flush()
            _print("pass 3: restart (new Python process, same cache folder) ...")
            if server is not None:
                server.requests.reset()
            try:
                record(*run_restart_pass(spec))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                _print(f"FAILED: the restart pass did not complete: {exc}")
                return EXIT_FAILED

        _print("", format_table(rows), "")
        if client is not None:
            print_cluster_report(client)
        notes = [
            f"  {r.name}: {r.requests - r.chunk_requests} other request(s): "
            + ", ".join(r.other_requests)
            for r in rows[1:]
            if r.other_requests
        ]
        if notes:
            _print("Requests other than chunk GETs after the cold pass:", *notes)
            if any(".zgroup" in o or ".zmetadata" in o for r in rows for o in r.other_requests):
                _print(
                    "  (.zgroup/.zattrs/.zmetadata -> 404: zarr probes for Zarr v2 metadata "
                    "when opening;",
                    "   'missing' answers are cached in memory only, so a new process asks again)",
                )
            _print("")
        if server is None:
            _print(
                "S3 requests / chunk GETs: the cache's own miss counts (reads it sent to the "
                "store), since",
                "a remote server cannot be asked; listings and existence checks are not counted.",
                "",
            )
        identical = all(_same(results[0], r) for r in results[1:])
        _print(f"results identical across passes: {'yes' if identical else 'NO'}")

        cold, warm, restart = rows
        warm_saved = max(0, cold.chunk_requests - warm.chunk_requests)
        if restart.chunk_requests:
            restart_how = "read from S3 again"
        elif restart.bytes_disk:
            restart_how = "served from disk"
        else:
            restart_how = "served from the cache"
        speedup = cold.seconds / warm.seconds if warm.seconds > 0 else float("inf")
        _print(
            f"warm pass: {warm.chunk_requests} chunk requests to S3 ({warm_saved} saved), "
            f"{speedup:.0f}x faster than cold; restart pass: {restart.chunk_requests} chunk "
            f"requests ({restart_how})"
        )

        status = EXIT_OK
        for row in (warm, restart):
            if row.chunk_requests:
                _print(
                    f"FAILED: the {row.name} pass sent {row.chunk_requests} chunk request(s) "
                    "to S3; expected 0"
                )
                tier, size = (
                    ("memory", config.memory_size)
                    if row is warm
                    else ("disk", config.disk_path and config.disk_size)
                )
                if cold.bytes_s3 > (size or 0):
                    _print(
                        f"  (the {tier} tier, {format_bytes(size or 0)}, is smaller than the "
                        f"{format_bytes(cold.bytes_s3)} read: raise --{tier}-size)"
                    )
                status = EXIT_FAILED
        if not identical:
            _print("FAILED: the passes computed different results")
            status = EXIT_FAILED
        return status
    finally:
        stack.close()
        if cache is not None:
            cache.close()
        if server is not None:
            server.stop()
        if not keep_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
