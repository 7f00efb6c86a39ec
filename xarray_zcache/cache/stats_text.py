"""The text and HTML forms of a `~xarray_zcache.cache.stats.CacheStats` (``str``, notebooks)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from xarray_zcache.cache.units import format_bytes

if TYPE_CHECKING:
    from xarray_zcache.cache.stats import CacheStats

__all__ = ["as_html", "as_text", "rows"]


def rows(stats: CacheStats) -> list[tuple[str, str]]:
    """The (label, value) rows of the text and HTML forms."""
    mem_hits = stats.total_hits(tier="memory")
    disk_hits = stats.total_hits(tier="disk")
    peer_hits = stats.total_hits(tier="peer")
    out = [
        ("hit rate", f"{stats.hit_rate():.1%}"),
        ("  chunks", f"{stats.hit_rate('chunk'):.1%}"),
        ("  metadata", f"{stats.hit_rate('metadata'):.1%}"),
        ("hits memory / disk / peer", f"{mem_hits} / {disk_hits} / {peer_hits}"),
        ("misses (requests sent)", str(stats.requests_sent)),
        ("requests saved", str(stats.requests_saved)),
        ("bytes saved", format_bytes(stats.bytes_saved)),
        ("bytes fetched", format_bytes(sum(stats.miss_bytes.values()))),
        (
            "memory used",
            f"{format_bytes(stats.memory_used)} / {format_bytes(stats.memory_capacity)} "
            f"({stats.memory_entries} entries)",
        ),
    ]
    if stats.decoded_capacity or stats.decoded_hits or stats.decoded_misses:
        out.append(
            (
                "decoded used (hits / misses)",
                f"{format_bytes(stats.decoded_used)} / {format_bytes(stats.decoded_capacity)} "
                f"({stats.decoded_entries} arrays; {stats.decoded_hits} / "
                f"{stats.decoded_misses})",
            )
        )
    if stats.disk_path is not None or stats.disk_capacity:
        out.append(
            (
                "disk used",
                f"{format_bytes(stats.disk_used)} / {format_bytes(stats.disk_capacity)} "
                f"({stats.disk_entries} entries)",
            )
        )
    if stats.prefetches or stats.prefetch_hits:
        out.append(("read ahead (hits on it)", f"{stats.prefetches} ({stats.prefetch_hits})"))
    if stats.peer_served or stats.peer_loads or stats.peer_fallbacks or peer_hits:
        out.append(
            (
                "peers: served / loads / fallbacks",
                f"{stats.peer_served} / {stats.peer_loads} / {stats.peer_fallbacks}",
            )
        )
    if stats.validations or stats.validation_errors:
        out.append(
            (
                "validations (listings, changed, failed)",
                f"{stats.validations} ({stats.validation_requests}, "
                f"{stats.validation_changes}, {stats.validation_errors})",
            )
        )
    out += [
        ("evictions memory / disk", f"{stats.evictions['memory']} / {stats.evictions['disk']}"),
        ("corrupt entries dropped", str(stats.corruptions)),
        ("errors from store (not cached)", str(stats.inner_errors)),
    ]
    return out


def as_text(stats: CacheStats) -> str:
    """``str(stats)``: an aligned table, then the hot keys."""
    table = rows(stats)
    width = max(len(k) for k, _ in table)
    lines = ["CacheStats"] + [f"  {k:<{width}}  {v}" for k, v in table]
    if stats.hot_keys:
        lines.append("  hot keys")
        lines += [f"    {c:>6}  {k}" for k, c in stats.hot_keys[:10]]
    return "\n".join(lines)


def as_html(stats: CacheStats) -> str:
    """``stats._repr_html_()``: the table of the notebook view."""
    cells = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k.strip())}</th>"
        f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in rows(stats)
    )
    hot = "".join(
        f"<tr><td>{c}</td><td style='text-align:left'><code>{html.escape(k)}</code></td></tr>"
        for k, c in stats.hot_keys[:10]
    )
    hot_table = f"<details><summary>hot keys</summary><table>{hot}</table></details>" if hot else ""
    return f"<div><strong>xarray-zcache</strong><table>{cells}</table>{hot_table}</div>"
