"""``zcache validate``: check every cached entry of a dataset against the source now.

Opens the dataset's store over an existing disk cache folder and runs
`CachedStore.revalidate`: one listing per array with cached entries (one request per
1,000 objects on S3), dropping what changed, was deleted or was created at the source,
and marking the rest validated for every process that uses the folder. A progress bar
(one step per array) goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from xarray_zcache.cli.errors import EXIT_FAILURE, CliError
from xarray_zcache.cli.folders import configured_folder, folder
from xarray_zcache.cli.options import nested
from xarray_zcache.cli.output import emit, emit_json, note, plural

__all__ = ["Progress", "run"]


class Progress:
    """``[#####     ] 3/10 arrays`` on stderr, redrawn in place (nothing if ``quiet``)."""

    def __init__(self, quiet: bool, width: int = 30) -> None:
        self._quiet = quiet
        self._width = width
        self._t0 = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if self._quiet or total <= 0:
            return
        filled = self._width * done // total
        bar = "#" * filled + " " * (self._width - filled)
        elapsed = time.perf_counter() - self._t0
        end = "\n" if done >= total else ""
        print(f"\r[{bar}] {done}/{total} arrays | {elapsed:.1f}s", end=end, file=sys.stderr)
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from zarr.core.sync import sync

    from xarray_zcache._quiet import silence_unclosed_sessions
    from xarray_zcache.backend import open_store
    from xarray_zcache.cache.disk.folder import recorded_disk_size
    from xarray_zcache.config import CacheConfig

    raw = configured_folder(args.cache)
    path, state = folder(raw, option="--cache")
    if not state.ok:
        raise CliError(f"--cache {raw}: not a usable xarray-zcache disk cache ({state.detail})")
    try:
        config = CacheConfig().with_disk_cache(str(path), recorded_disk_size(os.fspath(path)))
    except ValueError as exc:
        raise CliError(f"invalid xarray-zcache configuration: {exc}") from None
    silence_unclosed_sessions()
    url = str(args.url)
    try:
        store = open_store(
            url, storage_options=nested(args.storage_option) or None, cache_config=config
        )
    except (ValueError, TypeError) as exc:
        raise CliError(f"URL {url!r}: {exc}") from None
    note(f"Validating the cached entries of {url} in {path}", as_json=args.json)
    try:
        report = sync(store.revalidate(progress=Progress(args.quiet or args.json)))
    except OSError as exc:
        raise CliError(f"URL {url!r}: a listing failed: {exc}", EXIT_FAILURE) from None
    finally:
        store.cache.flush()
    if args.json:
        emit_json(
            {
                "url": url,
                "cache": str(path),
                "arrays": report.units,
                "objects": report.objects,
                "changed": report.changed,
                "unverified": report.unverified,
                "requests": report.requests,
                "seconds": round(report.seconds, 3),
                "note": report.note,
            }
        )
    elif report.note and not report.units:
        emit(report.note)
    else:
        emit(
            f"Checked {plural(report.objects, 'cached object')} in "
            f"{plural(report.units, 'array')} with {plural(report.requests, 'listing request')} "
            f"in {report.seconds:.2f} s: {report.changed} changed at the source and dropped"
            + (
                f"; {report.unverified} without a recorded version (written through zcache) "
                "dropped, to be read again"
                if report.unverified
                else ""
            )
        )
    return 0
