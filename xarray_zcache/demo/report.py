"""The demo's output: the table of passes, the cluster report, descriptions of the data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import xarray as xr
from dask.utils import format_bytes

from xarray_zcache.cache.stats import TIERS
from xarray_zcache.demo.passes import PassFigures, _numeric_vars

__all__ = ["format_table", "print_cluster_report"]


def _print(*lines: str) -> None:
    for text in lines:
        print(text, flush=True)


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
