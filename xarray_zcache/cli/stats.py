"""``zcache stats``: what a disk cache folder holds, from the tier's SQL summaries."""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

from dask.utils import format_bytes

from xarray_zcache.cli.folders import cache_folder, configured_folder, open_tier, recorded_capacity
from xarray_zcache.cli.output import emit, emit_json, plural, printable, show_key, table, when

__all__ = ["cache_summary", "group_usage", "run"]

_KINDS = ("chunk", "metadata")


def group_usage(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Totals of some rows of `DiskTier.usage` (one namespace, or all of them)."""
    kinds = {k: {"entries": 0, "bytes": 0} for k in _KINDS}
    out: dict[str, Any] = {"entries": 0, "bytes": 0, "kinds": kinds, "hits": 0}
    expired = {"entries": 0, "bytes": 0}
    oldest: list[float] = []
    newest: list[float] = []
    access: list[float] = []
    for part in parts:
        kind = kinds.setdefault(str(part["kind"]), {"entries": 0, "bytes": 0})
        kind["entries"] += int(part["entries"])
        kind["bytes"] += int(part["bytes"])
        out["entries"] += int(part["entries"])
        out["bytes"] += int(part["bytes"])
        out["hits"] += int(part["hits"])
        expired["entries"] += int(part["expired"])
        expired["bytes"] += int(part["expired_bytes"])
        oldest.append(float(part["oldest_created"]))
        newest.append(float(part["newest_created"]))
        access.append(float(part["last_access"]))
    out["expired"] = expired
    out["oldest_created"] = min(oldest, default=None)
    out["newest_created"] = max(newest, default=None)
    out["last_access"] = max(access, default=None)
    return out


def by_namespace(usage: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for part in usage:
        grouped.setdefault(str(part["namespace"]), []).append(part)
    return grouped


def cache_summary(path: pathlib.Path, *, top: int = 10, now: float | None = None) -> dict[str, Any]:
    """What ``zcache stats --json`` prints for the cache folder ``path``.

    Parameters
    ----------
    path : pathlib.Path
        A disk cache folder (checked with `cache_folder`).
    top : int
        Number of most hit entries to list.
    now : float, optional
        Current time (seconds since the epoch), for the expired counts.

    Returns
    -------
    dict
        JSON-friendly summary; sizes in bytes, times in seconds since the epoch.
    """
    t = time.time() if now is None else now
    with open_tier(path) as tier:
        usage = tier.usage(t)
        hot = tier.top_entries(top, "hits") if top else []
        ends = [tier.top_entries(1, by) for by in ("oldest", "newest")] if usage else []
    summary: dict[str, Any] = {"path": str(path), **group_usage(usage)}
    capacity, source = recorded_capacity(path)
    if capacity is not None:
        summary["capacity"], summary["capacity_source"] = capacity, source
    if ends and ends[0] and ends[1]:
        summary["oldest_key"] = ends[0][0]["key"]
        summary["newest_key"] = ends[1][0]["key"]
    namespaces = [{"namespace": ns, **group_usage(g)} for ns, g in by_namespace(usage).items()]
    namespaces.sort(key=lambda d: (-d["bytes"], d["namespace"]))
    summary["namespaces"] = namespaces
    columns = ("key", "namespace", "kind", "size", "hits", "last_access")
    summary["top_hits"] = [{c: row[c] for c in columns} for row in hot]
    summary["generated"] = t
    return summary


def _split(group: Mapping[str, Any]) -> str:
    chunk, meta = group["kinds"]["chunk"], group["kinds"]["metadata"]
    return (
        f"{plural(chunk['entries'], 'chunk')} ({format_bytes(chunk['bytes'])}), "
        f"{meta['entries']} metadata ({format_bytes(meta['bytes'])})"
    )


def format_stats(s: Mapping[str, Any]) -> str:
    """The text of ``zcache stats``."""
    now = float(s["generated"])
    rows: list[tuple[str, str]] = [
        ("entries", f"{s['entries']}: {_split(s)}"),
        ("size", format_bytes(s["bytes"])),
    ]
    if "capacity" in s:
        cap = int(s["capacity"])
        used = f"{100 * s['bytes'] / cap:.1f}% used" if cap else "disk tier disabled"
        source = s.get("capacity_source", "zcache.disk.size")
        rows.append(("capacity", f"{format_bytes(cap)} ({source}; {used})"))
    rows.append(("hits", str(s["hits"])))
    expired = s["expired"]
    text = f"{expired['entries']} entries, {format_bytes(expired['bytes'])}"
    if expired["entries"]:
        text += f" ('zcache clear {s['path']} --expired' removes them)"
    rows.append(("expired", text))
    rows.append(("oldest", when(s["oldest_created"], now)))
    rows.append(("newest", when(s["newest_created"], now)))
    rows.append(("last access", when(s["last_access"], now)))
    lines = [f"Disk cache {s['path']}", *table(rows)]

    namespaces = s["namespaces"]
    lines.append("")
    lines.append(f"Namespaces ({len(namespaces)})" if namespaces else "Namespaces: none")
    for ns in namespaces:
        lines.append(f"  {printable(ns['namespace']) or '(none)'}")
        lines.append(
            f"      {plural(ns['entries'], 'entry', 'entries')}, "
            f"{format_bytes(ns['bytes'])}: {_split(ns)}"
        )
        lines.append(
            f"      {plural(ns['hits'], 'hit')}, {ns['expired']['entries']} expired; "
            f"created {when(ns['oldest_created'], now)} .. {when(ns['newest_created'], now)}"
        )
    hot = s["top_hits"]
    if hot:
        lines.append("")
        lines.append(f"Most hit entries (top {len(hot)})")
        sizes = [format_bytes(h["size"]) for h in hot]
        hw = max(4, *(len(str(h["hits"])) for h in hot))
        sw = max(4, *(len(x) for x in sizes))
        lines.append(f"  {'HITS':>{hw}}  {'SIZE':>{sw}}  {'KIND':<8}  KEY")
        for h, size in zip(hot, sizes, strict=True):
            lines.append(f"  {h['hits']:>{hw}}  {size:>{sw}}  {h['kind']:<8}  {show_key(h['key'])}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    path = cache_folder(configured_folder(args.path))
    summary = cache_summary(path, top=args.top)
    if args.json:
        emit_json(summary)
    else:
        emit(format_stats(summary))
    return 0
