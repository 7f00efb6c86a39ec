"""The summary ``zcache warm`` prints: what was read, from where, and what the disk holds."""

from __future__ import annotations

import pathlib
from typing import Any

from dask.utils import format_bytes, format_time

from xarray_zcache.cli.errors import EXIT_FAILURE
from xarray_zcache.cli.output import emit, emit_json, error, plural, printable, table, warn

__all__ = ["report"]


def report(
    url: str,
    namespace: str,
    path: pathlib.Path,
    delta: Any,
    after: Any,
    elapsed: float,
    decoded: int,
    *,
    as_json: bool = False,
) -> int:
    """Print the summary of a warm (``delta``: the cache's stats during it); the exit status."""
    chunk_hits = delta.total_hits("chunk")
    chunk_misses = delta.total_misses("chunk")
    reads = chunk_hits + chunk_misses
    fetched = delta.miss_bytes["chunk"] + delta.miss_bytes["metadata"]
    served = sum(delta.hit_bytes[t][k] for t in delta.hit_bytes for k in delta.hit_bytes[t])
    meta = delta.total_hits("metadata") + delta.total_misses("metadata") + delta.negative_hits
    if as_json:
        emit_json(
            {
                "url": url,
                "namespace": namespace,
                "path": str(path),
                "chunk_reads": reads,
                "chunk_misses": chunk_misses,
                "chunk_hits": chunk_hits,
                "hit_rate": delta.hit_rate("chunk") if reads else None,
                "metadata_reads": meta,
                "bytes_fetched": fetched,
                "bytes_served": served,
                "array_bytes": decoded,
                "seconds": elapsed,
                "disk_entries": after.disk_entries,
                "disk_used": after.disk_used,
                "disk_capacity": after.disk_capacity,
                "disk_evictions": delta.evictions["disk"],
                "not_admitted": delta.not_admitted,
                "corruptions": delta.corruptions,
                "disk_write_failures": delta.disk_write_failures,
            }
        )
    else:
        rate = f"{100 * delta.hit_rate('chunk'):.1f}%" if reads else "-"
        speed = f", {format_bytes(int(fetched / elapsed))}/s" if elapsed > 0 and fetched else ""
        rows = [
            ("namespace", printable(namespace)),
            ("disk cache", str(path)),
            (
                "chunk reads",
                f"{reads}: {chunk_misses} sent to the source, {chunk_hits} served by the "
                f"cache (hit rate {rate})",
            ),
            ("metadata", f"{meta} reads"),
            (
                "bytes",
                f"{format_bytes(fetched)} fetched, {format_bytes(served)} served by the cache "
                f"({format_bytes(decoded)} of array data)",
            ),
            ("time", f"{format_time(elapsed)}{speed}"),
            (
                "disk tier",
                f"{after.disk_entries} entries, {format_bytes(after.disk_used)} of "
                f"{format_bytes(after.disk_capacity)}",
            ),
        ]
        emit("Done:")
        for line in table(rows):
            emit(line)
    if delta.evictions["disk"]:
        warn(
            f"{delta.evictions['disk']} entries were evicted from the disk tier to make room: "
            "the data read is larger than --cache-size, so part of it is not cached"
        )
    if delta.not_admitted:
        warn(
            f"{plural(delta.not_admitted, 'object')} larger than zcache.max-object-size "
            "were not cached"
        )
    if delta.corruptions:
        warn(f"{delta.corruptions} damaged payload files were found, removed and re-fetched")
    if delta.disk_write_failures:
        error(
            f"{delta.disk_write_failures} entries could not be written to the disk tier "
            "(a full disk or an unwritable folder: see the warnings above, if any); "
            "run the command again"
        )
        return EXIT_FAILURE
    return 0
