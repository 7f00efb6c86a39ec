"""Against the strongest peers (issue 19, item 6): one run, the same data, every reader.

The local S3 server (moto in a child process, `s3proc.S3Process`, a fixed injected
latency per request) holds one zarr v3 array, 48 x 256 x 256 float32 in 192 zstd chunks
of (1, 128, 128) (``--quick``: 4 x 64 x 64 in 16 chunks), written once as plain zarr
and once into an Icechunk repository on the same server. Every reader reads the whole
array into memory (the values are checked bit-identical to the data written, and to
each other, for every read):

* xarray (``chunks={}``, one dask chunk per zarr chunk, dask's threaded scheduler with
  ``--threads`` threads) over: zcache with s3fs inside, zcache with obstore inside
  (memory only), the same with memory + disk, the same with the decoded tier (when this
  version of `CacheConfig` has ``decoded_memory_size``; the other zcache rows then set it
  to 0: bytes tiers only), zarr's bare `ObjectStore` (no
  cache), Icechunk with its chunk cache (``CachingConfig(num_bytes_chunks=...)``), and
  zarr's `MemoryStore` (the data already in memory: a bound);
* zarr's array API (``a[:]``) over zcache (obstore, memory only; and the same with the
  decoded tier, which zarr's array API reads through `xarray_zcache.decoded_pipeline`),
  over the bare `ObjectStore` and over `MemoryStore`;
* TensorStore's zarr3 driver over its s3 kvstore, with a ``cache_pool`` (and
  ``recheck_cached_data="open"``) and without a cache;
* the raw-fetch floor: the chunk objects fetched raw with obstore (no decoding, no
  zarr), at 8, 16 and 32 requests in flight; the best of the three.

*Cold*: a fresh reader (a new, empty cache: new zcache memory tier and disk folder, a
new Icechunk `Repository`, a new TensorStore `Context`), its open and its first read.
*Warm*: reading again through the same open handle (dataset, array, TensorStore); a
reader without a cache goes to S3 again. Each run is one cold read and ``--reads - 1``
warm reads per reader, the readers interleaved (whatever disturbs the machine hits
them all); the figures are medians over ``--runs`` runs (warm: of every warm read).

Targets (issue 19): cold zcache <= 1.0x bare `ObjectStore` and <= 1.1x TensorStore
without a cache, at every latency.

Usage::

    python benchmarks/peers.py --latency 0.02 --latency 0.1 --runs 3 \\
        --plot docs/_static/bench-peers.png
    python benchmarks/peers.py --quick          # tiny data, one run (a smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import Settings, make_dataset, median, quiet, request_counts, s3fs_store

BUCKET = "zcache-peers"
PREFIX = "peers.zarr"
ICE_PREFIX = "peers-icechunk"
VAR = "t2m"
CACHE_BYTES = 256 << 20  # every cache holds the whole array
KEY, SECRET, REGION = "testing", "testing", "us-east-1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLOT = ROOT / "docs" / "_static" / "bench-peers.png"
CONCURRENCIES = (8, 16, 32)

#: the rows compared with the targets, and the peers they are compared with
ZCACHE_COLD_ROWS = ("zc_s3fs", "zc_obstore", "zc_disk", "zc_decoded", "arr_zcache")
TARGETS = (("bare", 1.0), ("ts_nocache", 1.1))


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- the readers ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Reader:
    """One row: ``fresh(run)`` builds the reader with empty caches and returns ``open``,
    which opens it and returns a function reading the whole array."""

    key: str
    label: str
    family: str  # "xarray", "array", "tensorstore"
    fresh: Callable[[int], Callable[[], Callable[[], np.ndarray]]]
    cached: bool = True
    library: str = ""


@dataclasses.dataclass
class Env:
    """What every reader needs: the server, the data, a scratch folder."""

    server: Any
    settings: Settings
    threads: int
    workdir: str
    icechunk_storage: dict[str, Any] | None = None
    memory_store: Any = None
    rows: frozenset[str] | None = None  # only these rows (``--rows``); None: every row
    closers: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    @property
    def url(self) -> str:
        return f"s3://{BUCKET}/{PREFIX}"

    def s3_store(self, prefix: str = PREFIX) -> Any:
        from obstore.store import S3Store

        return S3Store(
            BUCKET,
            prefix=prefix,
            endpoint=self.server.endpoint_url,
            access_key_id=KEY,
            secret_access_key=SECRET,
            region=REGION,
            client_options={"allow_http": True},
        )


def has_decoded_tier() -> bool:
    from xarray_zcache import CacheConfig

    return hasattr(CacheConfig, "with_decoded_memory_size") or any(
        f.name == "decoded_memory_size" for f in dataclasses.fields(CacheConfig)
    )


def zcache_config(
    env: Env, name: str, client: str, *, disk: bool = False, decoded: bool = False
) -> Any:
    from xarray_zcache import CacheConfig

    cfg = CacheConfig().with_name(name).with_memory_size(CACHE_BYTES).with_client(client)  # type: ignore[arg-type]
    if disk:
        folder = tempfile.mkdtemp(prefix=f"{name}-", dir=env.workdir)
        cfg = cfg.with_disk_cache(folder, "2GiB")
    else:
        cfg = cfg.without_disk_cache()
    if has_decoded_tier():
        # the decoded tier only in its own row (its default may be on: half of memory)
        size = CACHE_BYTES if decoded else 0
        if hasattr(cfg, "with_decoded_memory_size"):
            cfg = cfg.with_decoded_memory_size(size)
        else:
            cfg = dataclasses.replace(cfg, decoded_memory_size=size)
    return cfg


def xarray_read(ds: Any, threads: int) -> Callable[[], np.ndarray]:
    import dask

    def read() -> np.ndarray:
        with dask.config.set(scheduler="threads", num_workers=threads):
            return np.asarray(ds[VAR].data.compute())

    return read


def zcache_xarray(env: Env, key: str, client: str, **kw: Any) -> Callable[[int], Any]:
    def fresh(run: int) -> Callable[[], Callable[[], np.ndarray]]:
        import xarray as xr

        cfg = zcache_config(env, f"peers-{key}-{run}-{time.monotonic_ns()}", client, **kw)
        # no user_agent_extra tag (s3fs only: obstore would fall back to s3fs)
        so = env.server.storage_options()

        def open_() -> Callable[[], np.ndarray]:
            with fallbacks() as seen:
                ds = xr.open_dataset(
                    env.url, engine="zcache", chunks={}, storage_options=so, cache_config=cfg
                )
            assert client != "obstore" or not seen, f"{key}: read through fsspec: {seen}"
            env.closers.append(ds.close)
            return xarray_read(ds, env.threads)

        return open_

    return fresh


@contextlib.contextmanager
def fallbacks() -> Iterator[list[str]]:
    """The backend's messages saying a URL is read through fsspec instead of obstore."""
    import logging

    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "through fsspec" in msg:
                seen.append(msg)

    logger = logging.getLogger("xarray_zcache.backend")
    handler, level = Catch(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def store_xarray(
    env: Env, make_store: Callable[[int], Any], **open_kw: Any
) -> Callable[[int], Any]:
    def fresh(run: int) -> Callable[[], Callable[[], np.ndarray]]:
        def open_() -> Callable[[], np.ndarray]:
            import xarray as xr

            ds = xr.open_dataset(make_store(run), engine="zarr", chunks={}, **open_kw)
            env.closers.append(ds.close)
            return xarray_read(ds, env.threads)

        return open_

    return fresh


def bare_store(env: Env) -> Callable[[int], Any]:
    def make(run: int) -> Any:
        from zarr.storage import ObjectStore

        return ObjectStore(env.s3_store(), read_only=True)

    return make


def icechunk_store(env: Env) -> Callable[[int], Any]:
    def make(run: int) -> Any:
        import icechunk

        assert env.icechunk_storage is not None
        config = icechunk.RepositoryConfig(
            caching=icechunk.CachingConfig(num_bytes_chunks=CACHE_BYTES)
        )
        repo = icechunk.Repository.open(icechunk.s3_storage(**env.icechunk_storage), config=config)
        return repo.readonly_session("main").store

    return make


def array_reader(env: Env, make_store: Callable[[int], Any]) -> Callable[[int], Any]:
    def fresh(run: int) -> Callable[[], Callable[[], np.ndarray]]:
        def open_() -> Callable[[], np.ndarray]:
            import zarr

            a = zarr.open_array(make_store(run), path=VAR, mode="r")
            return lambda: np.asarray(a[:])

        return open_

    return fresh


def zcache_array_store(env: Env, *, decoded: bool = False) -> Callable[[int], Any]:
    def make(run: int) -> Any:
        from zarr.storage import ObjectStore

        from xarray_zcache import CachedStore

        name = f"peers-arr{'-dec' if decoded else ''}-{run}-{time.monotonic_ns()}"
        cfg = zcache_config(env, name, "obstore", decoded=decoded)
        return CachedStore(ObjectStore(env.s3_store(), read_only=True), cfg)

    return make


def tensorstore_reader(env: Env, cache: bool) -> Callable[[int], Any]:
    def fresh(run: int) -> Callable[[], Callable[[], np.ndarray]]:
        import tensorstore as ts

        ctx = ts.Context({"cache_pool": {"total_bytes_limit": CACHE_BYTES if cache else 0}})
        spec: dict[str, Any] = {
            "driver": "zarr3",
            "kvstore": {
                "driver": "s3",
                "bucket": BUCKET,
                "path": f"{PREFIX}/{VAR}/",
                "endpoint": env.server.endpoint_url,
                "aws_region": REGION,
                "aws_credentials": {"type": "environment"},
            },
        }
        if cache:
            spec["recheck_cached_data"] = "open"

        def open_() -> Callable[[], np.ndarray]:
            t = ts.open(spec, read=True, context=ctx).result()
            return lambda: np.asarray(t.read().result())

        return open_

    return fresh


def build_readers(env: Env) -> tuple[list[Reader], list[str]]:
    """The rows, in order, and notes on the rows left out."""
    notes: list[str] = []
    readers = [
        Reader(
            "zc_s3fs",
            "xarray + zcache (s3fs inside)",
            "xarray",
            zcache_xarray(env, "zc_s3fs", "s3fs"),
            library="s3fs",
        ),
        Reader(
            "zc_obstore",
            "xarray + zcache (obstore inside)",
            "xarray",
            zcache_xarray(env, "zc_obstore", "obstore"),
            library="obstore",
        ),
        Reader(
            "zc_disk",
            "xarray + zcache (obstore, memory + disk)",
            "xarray",
            zcache_xarray(env, "zc_disk", "obstore", disk=True),
            library="obstore",
        ),
    ]
    if has_decoded_tier():
        readers.append(
            Reader(
                "zc_decoded",
                "xarray + zcache (obstore, decoded tier)",
                "xarray",
                zcache_xarray(env, "zc_decoded", "obstore", decoded=True),
                library="obstore",
            )
        )
    else:
        notes.append(
            "xarray + zcache (decoded tier): skipped, this CacheConfig has no "
            "decoded_memory_size (the decoded tier is not merged yet)"
        )
    readers += [
        Reader(
            "bare",
            "xarray + bare ObjectStore (no cache)",
            "xarray",
            store_xarray(env, bare_store(env)),
            cached=False,
            library="obstore",
        ),
        Reader(
            "icechunk",
            "xarray + Icechunk (chunk cache)",
            "xarray",
            store_xarray(env, icechunk_store(env), consolidated=False),
            library="icechunk",
        ),
        Reader(
            "memorystore",
            "xarray + zarr MemoryStore (bound)",
            "xarray",
            store_xarray(env, lambda run: env.memory_store),
        ),
        Reader(
            "arr_zcache",
            "zarr a[:] over zcache (obstore)",
            "array",
            array_reader(env, zcache_array_store(env)),
            library="obstore",
        ),
    ]
    if has_decoded_tier():
        readers.append(
            Reader(
                "arr_decoded",
                "zarr a[:] over zcache (obstore, decoded tier)",
                "array",
                array_reader(env, zcache_array_store(env, decoded=True)),
                library="obstore",
            )
        )
    readers += [
        Reader(
            "arr_bare",
            "zarr a[:] over bare ObjectStore (no cache)",
            "array",
            array_reader(env, bare_store(env)),
            cached=False,
            library="obstore",
        ),
        Reader(
            "arr_memorystore",
            "zarr a[:] over MemoryStore (bound)",
            "array",
            array_reader(env, lambda run: env.memory_store),
        ),
        Reader(
            "ts_cache",
            "TensorStore zarr3 + cache_pool",
            "tensorstore",
            tensorstore_reader(env, cache=True),
            library="tensorstore",
        ),
        Reader(
            "ts_nocache",
            "TensorStore zarr3, no cache",
            "tensorstore",
            tensorstore_reader(env, cache=False),
            cached=False,
            library="tensorstore",
        ),
    ]
    kept = []
    for r in readers:
        if env.rows is not None and r.key not in env.rows:
            continue
        if r.library and importlib.util.find_spec(r.library) is None:
            notes.append(f"{r.label}: skipped, {r.library} is not installed")
        elif r.key == "icechunk" and env.icechunk_storage is None:
            notes.append(f"{r.label}: skipped, the Icechunk repository could not be written")
        else:
            kept.append(r)
    return kept, notes


# -- the data ------------------------------------------------------------------------------------


def settings_for(quick: bool) -> Settings:
    if quick:
        return Settings(nt=4, ny=64, nx=64, chunk_t=1, chunk_y=32, chunk_x=32)
    return Settings(nt=48, ny=256, nx=256, chunk_t=1, chunk_y=128, chunk_x=128)


def write_data(env: Env) -> np.ndarray:
    """Write the array as zarr and into an Icechunk repository; fill the MemoryStore."""
    from zarr.codecs import ZstdCodec
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    s = env.settings
    ds = make_dataset(s)
    env.server.create_bucket(BUCKET)
    encoding = {VAR: {"chunks": s.chunks, "compressors": [ZstdCodec(level=3)]}}
    opts = env.server.storage_options(skip_instance_cache=True)
    with quiet(), s3fs_store(env.url, opts) as store:
        ds.to_zarr(store, mode="w", zarr_format=3, consolidated=True, encoding=encoding)
    fs = env.server.filesystem()
    proto = default_buffer_prototype()
    objects = {}
    base = f"{BUCKET}/{PREFIX}"
    for path in fs.find(base):
        objects[path[len(base) :].lstrip("/")] = proto.buffer.from_bytes(fs.cat_file(path))
    env.memory_store = MemoryStore(store_dict=objects)
    if importlib.util.find_spec("icechunk") is not None:
        try:
            env.icechunk_storage = write_icechunk(env, ds, encoding)
        except Exception:
            traceback.print_exc()
            env.icechunk_storage = None
    return np.asarray(ds[VAR].values)


def write_icechunk(env: Env, ds: Any, encoding: dict[str, Any]) -> dict[str, Any]:
    import icechunk

    storage_kw: dict[str, Any] = {
        "bucket": BUCKET,
        "prefix": ICE_PREFIX,
        "endpoint_url": env.server.endpoint_url,
        "access_key_id": KEY,
        "secret_access_key": SECRET,
        "region": REGION,
        "allow_http": True,
        "force_path_style": True,
    }
    repo = icechunk.Repository.create(icechunk.s3_storage(**storage_kw))
    session = repo.writable_session("main")
    with quiet():
        ds.to_zarr(session.store, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    session.commit("the peers benchmark's data")
    return storage_kw


def chunk_keys(env: Env) -> list[str]:
    fs = env.server.filesystem()
    base = f"{BUCKET}/{PREFIX}/{VAR}/c/"
    return [p[len(f"{BUCKET}/{PREFIX}/") :] for p in fs.find(base)]


# -- measuring -----------------------------------------------------------------------------------


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def closing(env: Env) -> Iterator[None]:
    try:
        yield
    finally:
        from xarray_zcache.registry import close_all

        for close in env.closers:
            with contextlib.suppress(Exception):
                close()
        env.closers.clear()
        close_all()


def measure_run(
    reader: Reader, env: Env, run: int, reads: int, expected: np.ndarray
) -> dict[str, Any]:
    """One cold read (fresh reader, its open included) and ``reads - 1`` warm reads."""
    out: dict[str, Any] = {"warm": [], "warm_requests": []}
    with closing(env), quiet():
        open_ = reader.fresh(run)
        env.server.requests.reset()
        t0, wall0 = time.perf_counter(), time.time()
        read = open_()
        opened = time.perf_counter() - t0
        got = read()
        out["cold"] = time.perf_counter() - t0
        records = env.server.requests.records()
        out["cold_requests"] = request_counts(records)
        out["cold_phases"] = cold_phases(records, wall0, opened, out["cold"])
        check(reader, got, expected)
        out["digest"] = digest(got)
        for _ in range(reads - 1):
            env.server.requests.reset()
            t0 = time.perf_counter()
            got = read()
            out["warm"].append(time.perf_counter() - t0)
            out["warm_requests"].append(len(env.server.requests))
            check(reader, got, expected)
    return out


def cold_phases(records: list[Any], wall0: float, opened: float, total: float) -> dict[str, float]:
    """Where a cold read's time went, from the server's arrival times (seconds from the
    start): the open; the first and last arrival of a chunk request; the requests that
    arrived before the first chunk request (metadata, probes: what the open waits for)."""
    chunks = [r.arrived - wall0 for r in records if r.arrived and not r.is_metadata and r.key]
    return {
        "open": opened,
        "first_chunk": min(chunks, default=float("nan")),
        "last_chunk": max(chunks, default=float("nan")),
        "total": total,
        "before_chunks": float(
            sum(1 for r in records if r.arrived - wall0 < min(chunks, default=0))
        ),
    }


def check(reader: Reader, got: np.ndarray, expected: np.ndarray) -> None:
    """Bit-identical to the data written: same dtype, shape and bytes."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, (reader.key, got.dtype)
    assert got.tobytes() == expected.tobytes(), f"{reader.key}: values differ from the data"


def raw_floor(env: Env, keys: list[str], runs: int) -> dict[str, Any]:
    """Fetch every chunk object raw with obstore at each concurrency; medians per concurrency."""
    import obstore

    store = env.s3_store()

    async def fetch_all(concurrency: int) -> int:
        sem = asyncio.Semaphore(concurrency)

        async def one(key: str) -> int:
            async with sem:
                resp = await obstore.get_async(store, key)
                return len(await resp.bytes_async())

        return sum(await asyncio.gather(*(one(k) for k in keys)))

    asyncio.run(fetch_all(4))  # connections and the runtime up
    per: dict[str, list[float]] = {str(c): [] for c in CONCURRENCIES}
    nbytes = 0
    for _ in range(runs):
        for c in CONCURRENCIES:
            t0 = time.perf_counter()
            nbytes = asyncio.run(fetch_all(c))
            per[str(c)].append(time.perf_counter() - t0)
    medians = {c: median(v) for c, v in per.items()}
    best = min(medians, key=lambda c: medians[c])
    return {
        "runs": per,
        "medians": medians,
        "best_concurrency": int(best),
        "seconds": medians[best],
        "objects": len(keys),
        "bytes": nbytes,
    }


def warm_up(env: Env, expected: np.ndarray, readers: list[Reader]) -> None:
    """One-time costs (imports, dask's first compute, TensorStore's runtime) out of the runs."""
    with env.server.latency_set(0.0):
        for r in readers:
            try:
                measure_run(r, env, -1, 1, expected)
            except Exception:
                traceback.print_exc()


def run_latency(
    env: Env, readers: list[Reader], latency: float, runs: int, reads: int, expected: np.ndarray
) -> dict[str, Any]:
    env.server.latency = latency
    rows: dict[str, dict[str, Any]] = {
        r.key: {"label": r.label, "family": r.family, "cached": r.cached, "runs": []}
        for r in readers
    }
    for run in range(runs):
        for r in readers:  # interleaved: drifts of the machine hit every reader alike
            try:
                rows[r.key]["runs"].append(measure_run(r, env, run, reads, expected))
            except AssertionError:
                raise
            except Exception as exc:
                traceback.print_exc()
                rows[r.key]["error"] = repr(exc)
        log(f"    run {run + 1}/{runs} done")
    for row in rows.values():
        done = row["runs"]
        if not done:
            continue
        row["cold"] = median([x["cold"] for x in done])
        warm = [w for x in done for w in x["warm"]]
        row["warm"] = median(warm) if warm else float("nan")
        row["cold_requests"] = done[0]["cold_requests"]
        phases = [x["cold_phases"] for x in done if "cold_phases" in x]
        if phases:
            row["cold_phases"] = {k: median([p[k] for p in phases]) for k in phases[0]}
        row["warm_requests"] = max((w for x in done for w in x["warm_requests"]), default=0)
        row["digests"] = sorted({x["digest"] for x in done})
    floor = raw_floor(env, chunk_keys(env), runs)
    return {"latency": latency, "rows": rows, "floor": floor}


def evaluate(res: dict[str, Any]) -> None:
    """Per zcache row and latency: cold / peer cold against each target."""
    for lat in res["latencies"]:
        rows = lat["rows"]
        for key in ZCACHE_COLD_ROWS:
            row = rows.get(key)
            if not row or "cold" not in row:
                continue
            checks = {}
            for peer, limit in TARGETS:
                p = rows.get(peer)
                if p and "cold" in p:
                    ratio = row["cold"] / p["cold"]
                    checks[peer] = {"ratio": ratio, "limit": limit, "pass": ratio <= limit}
            row["targets"] = checks


# -- the report ----------------------------------------------------------------------------------


def render(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [
        f"{s['nt']}x{s['ny']}x{s['nx']} float32, {res['n_chunks']} zstd chunks of "
        f"{tuple(s['chunks'])}, zarr v3; xarray rows: dask, {res['threads']} threads; "
        f"medians of {res['runs']} runs of {res['reads']} reads (1 cold + "
        f"{res['reads'] - 1} warm); all values bit-identical: {res['identical']}",
        "",
        "| latency | reader | cold (s) | warm (s) | cold / bare ObjectStore "
        "| cold / TensorStore no cache | requests cold / warm | targets |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for lat in res["latencies"]:
        ms = f"{lat['latency'] * 1000:g} ms"
        rows = lat["rows"]
        bare = rows.get("bare", {}).get("cold")
        tsn = rows.get("ts_nocache", {}).get("cold")
        for row in rows.values():
            if "cold" not in row:
                lines.append(f"| {ms} | {row['label']} | error: {row.get('error', '?')} |||||")
                continue
            ratio_b = f"{row['cold'] / bare:.2f}x" if bare else "-"
            ratio_t = f"{row['cold'] / tsn:.2f}x" if tsn else "-"
            t = row.get("targets")
            verdict = (
                ", ".join(
                    f"{'<=' if c['pass'] else '>'} {c['limit']:g}x "
                    f"{'bare' if peer == 'bare' else 'TS'}: {'pass' if c['pass'] else 'FAIL'}"
                    for peer, c in t.items()
                )
                if t
                else ""
            )
            req = f"{row['cold_requests']['total']} / {row['warm_requests']}"
            lines.append(
                f"| {ms} | {row['label']} | {row['cold']:.3f} | {row['warm']:.3f} "
                f"| {ratio_b} | {ratio_t} | {req} | {verdict} |"
            )
        f = lat["floor"]
        lines.append(
            f"| {ms} | raw-fetch floor (obstore, {f['objects']} chunk objects, best of "
            f"{'/'.join(str(c) for c in CONCURRENCIES)} in flight: {f['best_concurrency']}) "
            f"| {f['seconds']:.3f} | - | {f['seconds'] / bare:.2f}x | "
            f"{f['seconds'] / tsn:.2f}x | {f['objects']} / - | |"
            if bare and tsn
            else f"| {ms} | raw-fetch floor | {f['seconds']:.3f} | - | - | - | - | |"
        )
    lines += render_phases(res)
    for note in res["notes"]:
        lines.append(f"\n* {note}")
    return "\n".join(lines)


def render_phases(res: dict[str, Any]) -> list[str]:
    """The cold read's timeline per reader (medians of the runs), from the server's log."""
    lines = [
        "",
        "Cold read, where the time goes (seconds from the start; the server's arrival times):",
        "",
        "| latency | reader | open returned | first chunk request | last chunk request "
        "| done | requests before the first chunk |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lat in res["latencies"]:
        ms = f"{lat['latency'] * 1000:g} ms"
        for row in lat["rows"].values():
            p = row.get("cold_phases")
            if p:
                lines.append(
                    f"| {ms} | {row['label']} | {p['open']:.3f} | {p['first_chunk']:.3f} "
                    f"| {p['last_chunk']:.3f} | {p['total']:.3f} | {p['before_chunks']:.0f} |"
                )
    return lines if len(lines) > 5 else []


def seconds_label(x: float) -> str:
    return f"{x:.2f}" if x >= 0.01 else f"{x * 1000:.1f} ms"


def plot(res: dict[str, Any], path: str | os.PathLike[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lats = res["latencies"]
    fig, axes = plt.subplots(
        1, len(lats), figsize=(7.5 * len(lats), 6.5), sharey=True, squeeze=False
    )
    for ax, lat in zip(axes[0], lats, strict=True):
        rows = [r for r in lat["rows"].values() if "cold" in r]
        labels = [r["label"] for r in rows] + ["raw-fetch floor"]
        cold = [r["cold"] for r in rows] + [lat["floor"]["seconds"]]
        warm = [r["warm"] for r in rows] + [np.nan]
        y = np.arange(len(labels))
        h = 0.4
        ax.barh(y - h / 2, cold, height=h, color="#d62728", label="cold")
        ax.barh(y + h / 2, warm, height=h, color="#2ca02c", label="warm")
        for yi, (c, w) in enumerate(zip(cold, warm, strict=True)):
            ax.text(c, yi - h / 2, f" {seconds_label(c)}", va="center", fontsize=7)
            if np.isfinite(w):
                ax.text(w, yi + h / 2, f" {seconds_label(w)}", va="center", fontsize=7)
        families = [r["family"] for r in rows] + ["floor"]
        for yi in range(1, len(families)):
            if families[yi] != families[yi - 1]:
                ax.axhline(yi - 0.5, color="black", lw=0.6)
        ax.axvline(lat["floor"]["seconds"], color="grey", ls=":", lw=1)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("seconds, full read of the array (log scale; shorter is better)")
        ax.set_title(f"{lat['latency'] * 1000:g} ms per S3 request")
    axes[0][0].invert_yaxis()
    # one legend, above the panels: inside one it hid the floor's label
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="upper right", ncols=2)
    s = res["settings"]
    fig.suptitle(
        f"Against the strongest peers: full read of {s['nt']}x{s['ny']}x{s['nx']} float32, "
        f"{res['n_chunks']} zstd chunks, on a local S3 (moto)\n"
        f"medians of {res['runs']} runs; {res['machine']} (shared: noisy); "
        f"dotted line: the raw-fetch floor",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------


def run(
    latencies: list[float],
    runs: int,
    reads: int,
    threads: int,
    quick: bool,
    workdir: str | None = None,
    rows: frozenset[str] | None = None,
) -> dict[str, Any]:
    from s3proc import S3Process

    # (no filter on aiohttp's "Unclosed client session": the data is written through
    # s3fs_store, which closes its session, and the readers close theirs)
    # TensorStore's s3 kvstore reads its credentials from the environment
    for k, v in (
        ("AWS_ACCESS_KEY_ID", KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_REGION", REGION),
    ):
        os.environ.setdefault(k, v)
    s = settings_for(quick)
    scratch = tempfile.mkdtemp(prefix="zcache-peers-", dir=workdir)
    server = S3Process(latency=0.0)
    try:
        env = Env(server=server, settings=s, threads=threads, workdir=scratch, rows=rows)
        t0 = time.perf_counter()
        expected = write_data(env)
        log(f"peers: data written in {time.perf_counter() - t0:.1f} s ({s.n_chunks} chunks)")
        readers, notes = build_readers(env)
        warm_up(env, expected, readers)
        res: dict[str, Any] = {
            "settings": {"nt": s.nt, "ny": s.ny, "nx": s.nx, "chunks": list(s.chunks)},
            "n_chunks": s.n_chunks,
            "threads": threads,
            "runs": runs,
            "reads": reads,
            "notes": notes,
            "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start",
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "latencies": [],
        }
        for latency in latencies:
            log(f"  {latency * 1000:g} ms per request ...")
            res["latencies"].append(run_latency(env, readers, latency, runs, reads, expected))
        digests = {
            d
            for lat in res["latencies"]
            for row in lat["rows"].values()
            for d in row.get("digests", [])
        }
        res["digest"] = sorted(digests)
        res["identical"] = len(digests) == 1 and digests == {digest(expected)}
        assert res["identical"], f"the readers returned different values: {digests}"
        evaluate(res)
        res["load_end"] = os.getloadavg()[0]
        return res
    finally:
        from xarray_zcache.registry import close_all

        close_all()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency", type=float, action="append", help="seconds (0.02 and 0.1)")
    p.add_argument("--runs", type=int, default=None, help="runs, medians (3; --quick: 1)")
    p.add_argument("--reads", type=int, default=3, help="reads per run: 1 cold, the rest warm")
    p.add_argument("--threads", type=int, default=8, help="dask threads (xarray rows)")
    p.add_argument("--quick", action="store_true", help="tiny data, one run, 5 ms")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--md", type=Path, default=None, help="write the table here")
    p.add_argument("--plot", type=Path, default=None, help=f"the plot (e.g. {DEFAULT_PLOT})")
    p.add_argument("--workdir", default=None)
    p.add_argument("--from-json", type=Path, default=None, help="only render saved results")
    p.add_argument(
        "--rows",
        default=None,
        help="only these rows, comma-separated keys (e.g. arr_zcache,arr_decoded,"
        "arr_memorystore,ts_cache); default: every row",
    )
    args = p.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        write_outputs(res, args)
        return 0
    latencies = args.latency or ([0.005] if args.quick else [0.02, 0.1])
    runs = args.runs or (1 if args.quick else 3)
    rows = None if args.rows is None else frozenset(args.rows.split(","))
    res = run(latencies, runs, args.reads, args.threads, args.quick, args.workdir, rows)
    write_outputs(res, args)
    return 0


def write_outputs(res: dict[str, Any], args: argparse.Namespace) -> None:
    text = render(res)
    print(text)
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            log("no plot: matplotlib is not installed")
        else:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            plot(res, args.plot)
            log(f"wrote {args.plot}")


if __name__ == "__main__":
    raise SystemExit(main())
