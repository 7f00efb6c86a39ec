"""The demo's command line: `build_parser` and the parsers of its option values."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from dask.utils import parse_bytes

from xarray_zcache.demo.passes import _RESTART_FLAG

__all__ = ["build_parser"]


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
