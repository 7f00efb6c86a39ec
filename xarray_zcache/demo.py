"""``python -m xarray_zcache.demo``: read one dataset cold, warm and after a restart.

With no arguments the demo needs nothing but this package: it starts an embedded
S3 server (moto, on 127.0.0.1, with an injected round-trip latency), writes a
small ERA5-like sample dataset to ``s3://zcache-demo/era5-sample.zarr`` (zarr
format 3), and reads it three times through ``engine="zcache"``:

1. **cold**: a fresh cache folder; every chunk comes from S3 and fills the memory
   and disk tiers;
2. **warm**: the same process and cache; every chunk comes from memory;
3. **restart**: a new Python process on the same cache folder; every chunk comes
   from disk.

Each pass computes the same reductions over every variable; the demo prints a
table of wall time, requests sent to S3 (counted by the server, so the restart
process's requests are seen too), bytes served by S3 / memory / disk and the hit
rate, and checks that the three results are identical. It exits with status 1
if the warm or restart pass sent a chunk request to S3 (it doubles as a smoke
test), 0 otherwise.

``--url s3://bucket/path.zarr`` (with ``--storage-option KEY=VALUE``) runs the
same three passes against any dataset instead; request counts then come from the
cache's own miss counters.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import dask.base
import numpy as np
import xarray as xr
from dask.utils import format_bytes, parse_bytes

from xarray_zcache._quiet import silence_unclosed_sessions
from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.cache.stats import TIERS, CacheStats
from xarray_zcache.config import CacheConfig
from xarray_zcache.registry import get_cache

__all__ = ["PassFigures", "main", "make_sample_dataset"]

DEMO_BUCKET = "zcache-demo"
DEMO_PATH = "era5-sample.zarr"
DEMO_URL = f"s3://{DEMO_BUCKET}/{DEMO_PATH}"
DEMO_CACHE_NAME = "zcache-demo"
#: sample dataset: 8 days of hourly steps on a 64 x 128 global grid, 4 variables
SAMPLE_SHAPE = {"time": 192, "latitude": 64, "longitude": 128}
SAMPLE_CHUNKS = {"time": 24, "latitude": 16, "longitude": 32}
#: prefix of the line on which the restart process reports its figures to the parent
_RESULT_MARKER = "ZCACHE-DEMO-RESULT "
_RESTART_FLAG = "--_restart-pass"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


# -- the sample dataset ---------------------------------------------------------------------------


def make_sample_dataset(seed: int = 0) -> xr.Dataset:
    """An ERA5-like sample: 2 m temperature, 10 m wind and precipitation, float32.

    ``t2m`` has a latitude profile, a seasonal cycle (by day of year, opposite in
    the two hemispheres), a diurnal cycle following local solar time, and noise;
    ``u10``/``v10`` are westerlies/trades with noise; ``tp`` is hourly
    precipitation, non-negative with many dry cells. Dims are
    ``time x latitude x longitude`` (`SAMPLE_SHAPE`), with CF attributes.
    """
    rng = np.random.default_rng(seed)
    nt, ny, nx = SAMPLE_SHAPE["time"], SAMPLE_SHAPE["latitude"], SAMPLE_SHAPE["longitude"]
    time_ = np.datetime64("2024-01-01T00:00", "ns") + np.arange(nt) * np.timedelta64(1, "h")
    dy = 180.0 / ny
    lat = np.linspace(90 - dy / 2, -90 + dy / 2, ny)  # cell centres, north to south like ERA5
    lon = np.arange(nx) * (360.0 / nx)

    hours = (time_ - time_[0]) / np.timedelta64(1, "h")
    doy = (time_ - time_.astype("datetime64[Y]")) / np.timedelta64(1, "D")
    t = hours[:, None, None]
    phi = np.deg2rad(lat)[None, :, None]
    lam = lon[None, None, :]
    shape = (nt, ny, nx)

    # 2 m temperature [K]: warm tropics, cold poles; NH winter in January; afternoon maximum
    seasonal = -12.0 * np.sin(phi) * np.cos(2 * np.pi * (doy[:, None, None] - 15) / 365.25)
    local_hour = (t + lam / 15.0) % 24
    diurnal = 5.0 * np.cos(phi) * np.cos(2 * np.pi * (local_hour - 15) / 24)
    t2m = 300.0 - 45.0 * np.sin(phi) ** 2 + seasonal + diurnal + rng.normal(0, 1.5, shape)

    # 10 m wind [m s-1]: trades (easterly) in the tropics, westerlies at mid-latitudes
    wave = np.sin(2 * np.pi * (lam / 360.0 * 4 - t / 96.0))
    u10 = 9.0 * np.cos(phi) * (np.sin(phi) ** 2 * 2 - 0.5) + 2.0 * wave + rng.normal(0, 2.5, shape)
    v10 = 3.0 * np.cos(phi) * wave + rng.normal(0, 2.5, shape)

    # total precipitation [m] per hour: rain bands in the tropics and storm tracks, many dry cells
    wetness = 1.2 * np.exp(-((phi / 0.2) ** 2)) + 0.6 * np.exp(-(((np.abs(phi) - 0.8) / 0.2) ** 2))
    tp = np.maximum(0.0, rng.gamma(0.6, 1.0, shape) * wetness - 0.35) * 1e-3

    dims = ("time", "latitude", "longitude")

    def var(data: np.ndarray[Any, Any], units: str, long_name: str, std: str) -> xr.Variable:
        attrs = {"units": units, "long_name": long_name, "standard_name": std}
        return xr.Variable(dims, np.broadcast_to(data, shape).astype(np.float32), attrs)

    return xr.Dataset(
        {
            "t2m": var(t2m, "K", "2 metre temperature", "air_temperature"),
            "u10": var(u10, "m s**-1", "10 metre U wind component", "eastward_wind"),
            "v10": var(v10, "m s**-1", "10 metre V wind component", "northward_wind"),
            "tp": var(tp, "m", "Total precipitation", "precipitation_amount"),
        },
        coords={
            "time": ("time", time_, {"long_name": "time", "standard_name": "time"}),
            "latitude": (
                "latitude",
                lat.astype(np.float32),
                {"units": "degrees_north", "long_name": "latitude", "standard_name": "latitude"},
            ),
            "longitude": (
                "longitude",
                lon.astype(np.float32),
                {"units": "degrees_east", "long_name": "longitude", "standard_name": "longitude"},
            ),
        },
        attrs={
            "title": "ERA5-like synthetic sample (xarray-zcache demo)",
            "source": "generated by xarray_zcache.demo; not real observations",
            "Conventions": "CF-1.8",
        },
    )


def _chunk_counts(ds: xr.Dataset, chunks: dict[str, int]) -> dict[str, int]:
    """Number of stored chunks of each data variable for the given chunk sizes."""
    counts: dict[str, int] = {}
    for name, v in ds.data_vars.items():
        n = 1
        for dim, size in zip(v.dims, v.shape, strict=True):
            c = chunks.get(str(dim), size)
            n *= -(-size // c)
        counts[str(name)] = n
    return counts


def write_sample_dataset(ds: xr.Dataset, url: str, storage_options: dict[str, Any]) -> None:
    """Write ``ds`` to ``url`` as zarr format 3, chunked by `SAMPLE_CHUNKS`."""
    encoding: dict[str, dict[str, Any]] = {
        str(name): {"chunks": tuple(SAMPLE_CHUNKS[str(d)] for d in v.dims)}
        for name, v in ds.data_vars.items()
    }
    encoding["time"] = {"units": "hours since 2024-01-01", "dtype": "int64"}
    ds.to_zarr(
        url,
        mode="w",
        zarr_format=3,
        consolidated=True,
        encoding=encoding,
        storage_options=storage_options,
    )


# -- one pass -------------------------------------------------------------------------------------


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


def print_cluster_report(client: Any) -> None:
    """Per-worker figures and the aggregator's promotion decisions."""
    import xarray_zcache.distributed as zd

    stats = zd.cluster_stats(client)
    frame = stats.to_dataframe()
    for col in ("bytes_saved", "memory_used", "disk_used"):
        frame[col] = frame[col].map(format_bytes)
    frame["hit_rate"] = frame["hit_rate"].map("{:.1%}".format)
    cols = [
        "hit_rate",
        *(f"hits_{tier}" for tier in TIERS),
        "misses",
        "bytes_saved",
        "memory_used",
        "disk_used",
        "promotions",
    ]
    _print("Per worker (since the restart) and cluster total:", frame[cols].to_string(), "")
    decisions = zd.decisions(client, n=10)
    if decisions:
        _print(f"Promotion decisions (last {len(decisions)}):")
        for d in decisions:
            _print(f"  {d['action']:<8} on {d['worker']}: {d['key']} ({d['rate']:.1f} reads/s)")
    else:
        _print(
            "Promotion decisions: none (no key was read often enough from disk: every chunk is "
            "read once per pass)"
        )
    for line in stats.recommendations():
        _print(f"  advice: {line}")
    _print("")


# -- output ---------------------------------------------------------------------------------------

_COLUMNS = (
    ("pass", 8, "<"),
    ("time (s)", 9, ">"),
    ("S3 requests", 12, ">"),
    ("chunk GETs", 11, ">"),
    ("from S3", 10, ">"),
    ("from memory", 12, ">"),
    ("from disk", 10, ">"),
    ("hit rate", 9, ">"),
)


def format_table(rows: Sequence[PassFigures]) -> str:
    """The table of passes, one row each."""

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{c:{align}{w}}" for c, (_, w, align) in zip(cells, _COLUMNS, strict=True)
        )

    out = [line([c[0] for c in _COLUMNS]), "  ".join("-" * w for _, w, _ in _COLUMNS)]
    for r in rows:
        out.append(
            line(
                [
                    r.name,
                    f"{r.seconds:.2f}",
                    str(r.requests),
                    str(r.chunk_requests),
                    format_bytes(r.bytes_s3),
                    format_bytes(r.bytes_memory),
                    format_bytes(r.bytes_disk),
                    f"{r.hit_rate:.1%}",
                ]
            )
        )
    return "\n".join(out)


def _describe(ds: xr.Dataset) -> str:
    dims = " x ".join(f"{d}={n}" for d, n in ds.sizes.items())
    names = ", ".join(map(str, ds.data_vars))
    dtypes = ", ".join(sorted({str(v.dtype) for v in ds.data_vars.values()}))
    n = len(ds.data_vars)
    return f"{dims}; {n} variable{'' if n == 1 else 's'} ({names}), {dtypes}"


def _dask_chunks(ds: xr.Dataset) -> int:
    """Number of chunks of the numeric data variables (as opened with ``chunks={}``)."""
    total = 0
    for name in _numeric_vars(ds):
        data = ds[name].data
        total += int(getattr(data, "npartitions", 1))
    return total


def _other_requests(records: Sequence[Any]) -> list[str]:
    """``["GET zarr.json (200)", "2x HEAD ..."]``: the requests that are not chunk GETs."""
    counts: Counter[str] = Counter()
    for rec in records:
        if rec.method == "GET" and rec.key is not None and not rec.is_metadata:
            continue
        target = rec.basename if rec.key is not None else "(listing)" if rec.is_list else "/"
        counts[f"{rec.method} {target} ({rec.status})"] += 1
    return [f"{n}x {what}" if n > 1 else what for what, n in counts.items()]


def _same(a: Any, b: Any) -> bool:
    try:
        for x, y in zip(a, b, strict=True):
            xr.testing.assert_identical(x, y)
    except AssertionError:
        return False
    return True


# -- main -----------------------------------------------------------------------------------------


def _storage_option(text: str) -> tuple[list[str], Any]:
    """Parse ``KEY=VALUE``; VALUE as JSON when it parses (``true``, ``3``), else a string.

    A dotted KEY (``client_kwargs.region_name=eu-west-1``) makes nested options.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: Any
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = {"True": True, "False": False, "None": None}.get(raw, raw)
    return key.split("."), value


def _isel(text: str) -> tuple[str, int]:
    dim, sep, raw = text.partition("=")
    try:
        stop = int(raw)
    except ValueError:
        stop = -1
    if not sep or not dim or stop < 1:
        raise argparse.ArgumentTypeError(f"expected DIM=N with N >= 1, got {text!r}")
    return dim, stop


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 512MB, 2GiB)") from exc


def _latency(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xarray_zcache.demo",
        description=(
            "Read a Zarr dataset three times through xarray-zcache: cold (from S3), warm "
            "(same process: from memory) and after a restart (new process: from disk), and "
            "compare wall times and S3 requests. With no arguments, an embedded local S3 "
            "server (moto) is started and an ERA5-like sample dataset is written to it: no "
            "credentials or network needed."
        ),
        epilog=(
            "Exit status: 0 on success; 1 if the warm or restart pass sent a chunk request to "
            "S3, or the passes disagree (with the local server); 2 on a usage error. "
            "Examples: 'python -m xarray_zcache.demo --latency 0.05'; 'python -m "
            "xarray_zcache.demo --url s3://bucket/data.zarr --storage-option anon=true "
            "--isel time=48'."
        ),
    )
    parser.add_argument(
        "--latency",
        type=_latency,
        default=0.02,
        metavar="SECONDS",
        help="round-trip delay the local S3 server adds to each request (default: 0.02)",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="PATH",
        help="cache folder to use and keep (default: a fresh temporary folder, removed at the end)",
    )
    parser.add_argument(
        "--memory-size",
        type=_size,
        default=parse_bytes("512MiB"),
        metavar="SIZE",
        help="memory tier size (default: 512MiB; keep it larger than the data read)",
    )
    parser.add_argument(
        "--disk-size",
        type=_size,
        default=parse_bytes("2GiB"),
        metavar="SIZE",
        help="disk tier size (default: 2GiB)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help=(
            "run the passes on a local Dask cluster of N worker processes with the zcache "
            "plugin (the third pass then restarts the workers instead of this process)"
        ),
    )
    remote = parser.add_argument_group(
        "reading a real dataset instead (no local server, nothing is written)"
    )
    remote.add_argument(
        "--url",
        metavar="URL",
        help="Zarr dataset to read, e.g. s3://bucket/path.zarr",
    )
    remote.add_argument(
        "--storage-option",
        action="append",
        type=_storage_option,
        default=[],
        metavar="KEY=VALUE",
        help=(
            "fsspec/s3fs option for --url (repeatable), e.g. anon=true, "
            "endpoint_url=https://..., client_kwargs.region_name=eu-west-1; "
            "VALUE is parsed as JSON when it can be"
        ),
    )
    remote.add_argument(
        "--variable",
        action="append",
        dest="variables",
        metavar="NAME",
        help="only read this variable (repeatable; default: all)",
    )
    remote.add_argument(
        "--isel",
        action="append",
        type=_isel,
        default=[],
        metavar="DIM=N",
        help="only read the first N elements along DIM (repeatable), to bound the data read",
    )
    parser.add_argument(
        _RESTART_FLAG, action="store_true", dest="restart_pass", help=argparse.SUPPRESS
    )
    return parser


def _nested(options: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in options:
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SystemExit(f"--storage-option: {'.'.join(path)} conflicts with {part}=...")
            node = child
        node[path[-1]] = value
    return out


def _print(*lines: str) -> None:
    for text in lines:
        print(text, flush=True)


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


if __name__ == "__main__":
    sys.exit(main())
