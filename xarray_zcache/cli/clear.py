"""``zcache clear``: remove every entry, the expired ones, or one namespace's, by the tier's
own bulk deletes; ``--dry-run`` counts the same entries from the tier's SQL summary."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Mapping
from typing import Any

from dask.utils import format_bytes

from xarray_zcache.cli.errors import EXIT_FAILURE, CliError
from xarray_zcache.cli.folders import cache_folder, configured_folder, open_tier
from xarray_zcache.cli.output import emit, emit_json, plural, printable

__all__ = ["run"]


def _per_namespace(usage: Iterable[Mapping[str, Any]], *, expired: bool) -> list[dict[str, Any]]:
    """Entries and bytes (all, or only expired ones) per namespace, largest first."""
    counts: dict[str, list[int]] = {}
    for part in usage:
        n = int(part["expired"] if expired else part["entries"])
        size = int(part["expired_bytes"] if expired else part["bytes"])
        if n:
            total = counts.setdefault(str(part["namespace"]), [0, 0])
            total[0] += n
            total[1] += size
    order = sorted(counts.items(), key=lambda item: (-item[1][1], item[0]))
    return [{"namespace": ns, "entries": n, "bytes": b} for ns, (n, b) in order]


def run(args: argparse.Namespace) -> int:
    path = cache_folder(configured_folder(args.path))
    dry = bool(args.dry_run)
    namespace = None if args.namespace is None else (args.namespace.rstrip("/") or args.namespace)
    strays = 0
    now = time.time()
    with open_tier(path) as tier:
        usage = tier.usage(now)
        if args.expired:
            scope, what = "expired", "expired {entries}"
            gone = _per_namespace(usage, expired=True)
            removed = sum(g["entries"] for g in gone) if dry else tier.drop_expired(now)
        elif namespace is not None:
            scope, what = "namespace", "{entries} of namespace " + printable(namespace)
            gone = [g for g in _per_namespace(usage, expired=False) if g["namespace"] == namespace]
            if not gone:
                known = sorted({str(part["namespace"]) for part in usage})
                listing = "; ".join(map(printable, known)) if known else "the cache is empty"
                raise CliError(
                    f"no entries of namespace {namespace!r} in {path}; "
                    f"namespaces present: {listing}",
                    EXIT_FAILURE,
                )
            # by the namespace column: a dataset nested under this path is spared
            removed = gone[0]["entries"] if dry else tier.delete_namespace(namespace)
        else:
            scope, what = "all", "{entries}"
            gone = _per_namespace(usage, expired=False)
            removed = sum(g["entries"] for g in gone) if dry else tier.delete_prefix("")
            # payload files without an index row (a crash, tampering) and stale temp files
            leftovers = tier.verify(repair=not dry)
            strays = leftovers["orphan_files"] + leftovers["corrupt"]
    total = sum(g["bytes"] for g in gone)
    if args.json:
        emit_json(
            {
                "path": str(path),
                "dry_run": dry,
                "scope": scope,
                "namespace": namespace if scope == "namespace" else None,
                "entries": removed,
                "bytes": total,
                "stray_files": strays,
                "namespaces": gone,
            }
        )
        return 0
    what = what.replace("{entries}", "entry" if removed == 1 else "entries")
    extra = f" and {plural(strays, 'stray payload file')}" if strays else ""
    emit(
        f"{'Would remove' if dry else 'Removed'} {removed} {what} ({format_bytes(total)})"
        f"{extra} from {path}"
    )
    for g in gone:
        emit(
            f"  {printable(g['namespace']) or '(none)'}: "
            f"{plural(g['entries'], 'entry', 'entries')}, {format_bytes(g['bytes'])}"
        )
    if dry:
        emit("Dry run: nothing was removed.")
    return 0
