"""``zcache warm``: read a dataset through `CachedStore`/`HybridCache` so that every chunk of the
selected variables lands in the disk tier, with back-pressure on the cache's disk writes.

The cache writes to disk in the background through a queue bounded by
``zcache.write-queue-size``, and drops a write when the queue is full. Warm never lets it
fill: each block read is followed by a look at ``HybridCache.disk_backlog``, and past a high
water mark the reader waits (``flush``) for the queue to drain. With at most one block in
flight per reader thread, the queue then holds at most ``high_water * size + threads *
block``: :func:`plan` picks the threads and the mark so that this fits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes

from xarray_zcache.cli.errors import EXIT_FAILURE, CliError
from xarray_zcache.cli.folders import folder
from xarray_zcache.cli.options import nested
from xarray_zcache.cli.output import note, plural, warn
from xarray_zcache.cli.warm_report import report

if TYPE_CHECKING:
    import numpy as np

    from xarray_zcache.cache.hybrid import HybridCache
    from xarray_zcache.config import CacheConfig

__all__ = ["BackPressure", "plan", "run"]


def plan(queue: int, max_block: int, threads: int) -> tuple[int, float]:
    """Reader threads and the backlog high-water mark (a fraction of the queue) of ``warm``.

    A stored chunk may be a little larger than its decoded block (incompressible data),
    hence the slack per block. Returns ``(threads, high_water)``.
    """
    slack = max(1, max_block + max_block // 4 + 4096)
    n = max(1, min(threads, (queue // 2) // slack))
    return n, max(0.0, (queue - n * slack) / max(1, queue))


class BackPressure:
    """The map_blocks function of ``warm``: after each block read, wait for the disk writes
    of the cache while its backlog is past ``high_water`` (one reader flushes, the others
    wait on the lock)."""

    def __init__(self, cache: HybridCache, high_water: float) -> None:
        self._cache = cache
        self._high = high_water
        self._lock = threading.Lock()

    def block(self, block: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Wait if needed; return the block's size as a 1-element block."""
        import numpy as np

        if self._cache.disk_backlog > self._high:
            with self._lock:
                if self._cache.disk_backlog > self._high:
                    self._cache.flush()
        return np.full((1,) * block.ndim, int(block.nbytes), dtype=np.int64)


def _check_source(url: str) -> None:
    """Fail early (before touching any cache folder) on a bad URL or a missing local path."""
    from xarray_zcache.backend import _chain_protocols, strip_prefix

    text = strip_prefix(url)
    if not text:
        raise CliError("URL: empty; expected s3://bucket/path.zarr, gs://..., or a local path")
    if "::" in text or ("://" in text and not text.startswith("file://")):
        import fsspec

        for scheme in _chain_protocols(text):
            try:
                fsspec.get_filesystem_class(scheme)
            except (ValueError, ImportError) as exc:
                raise CliError(
                    f"URL {url!r}: unknown or unavailable URL scheme {scheme!r}; expected "
                    "s3://, gs://, az://, http(s)://, file://, a local path, or a chain of "
                    f"fsspec protocols such as simplecache::s3://... ({exc})"
                ) from None
        return
    path = pathlib.Path(text.removeprefix("file://")).expanduser()
    if not path.exists():
        raise CliError(f"URL {url!r}: no such local dataset {str(path)!r}")
    if not path.is_dir():
        raise CliError(f"URL {url!r}: {str(path)!r} is not a Zarr folder")


def _cache_path(raw: str) -> pathlib.Path:
    """The ``--cache`` folder: a disk cache, an empty folder, or nothing yet (created)."""
    path = pathlib.Path(raw).expanduser()
    if not path.exists():
        if path.is_symlink():
            raise CliError(f"--cache {raw}: is a dangling symbolic link")
        return path.absolute()
    if path.is_dir() and not any(path.iterdir()):
        return path.resolve()
    found, state = folder(raw, option="--cache")
    if state.ok:
        return found
    if state.state == "damaged" and state.layout:
        raise CliError(
            f"--cache {raw}: the disk cache index is damaged: {state.detail}; run "
            f"'zcache verify {raw} --repair' first",
            EXIT_FAILURE,
        )
    raise CliError(
        f"--cache {raw}: is a non-empty folder that is not an xarray-zcache disk cache "
        f"({state.detail}); refusing to use it: choose a new or empty folder"
    )


def _config(args: argparse.Namespace) -> tuple[CacheConfig, pathlib.Path]:
    from xarray_zcache.config import CacheConfig

    try:
        base = CacheConfig()
    except ValueError as exc:
        raise CliError(
            f"invalid xarray-zcache configuration (dask config zcache.*): {exc}"
        ) from None
    raw = args.cache if args.cache is not None else base.disk_path
    if raw is None:
        raise CliError(
            "no disk cache folder: the configuration disables the disk tier "
            "(zcache.disk.enabled: false); pass --cache PATH"
        )
    try:
        # no read-ahead: it would read past the back-pressure; reader threads give concurrency
        size = args.cache_size
        if size is None:  # the size the folder was last opened with, else zcache.disk.size
            from xarray_zcache.cache.disk.folder import recorded_disk_size

            size = recorded_disk_size(os.path.expanduser(raw))
        config = base.with_disk_cache(raw, size).with_prefetch(0)
        if args.memory_size is not None:
            config = config.with_memory_size(args.memory_size)
    except ValueError as exc:
        message = str(exc)
        if args.cache is not None and message.startswith("disk_path: "):
            message = f"--cache {args.cache}: {message.removeprefix('disk_path: ')}"
        raise CliError(message) from None
    if config.disk_size <= 0:
        raise CliError("the disk tier size is 0 (zcache.disk.size); pass --cache-size SIZE")
    return config, pathlib.Path(str(raw))


def _variables(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise CliError(f"--variables: no variable names in {text!r}")
    return names


def run(args: argparse.Namespace) -> int:
    url = str(args.url)
    names = _variables(args.variables)
    storage_options = nested(args.storage_option)
    config, raw = _config(args)
    _check_source(url)
    path = _cache_path(str(raw))

    from xarray_zcache._quiet import silence_unclosed_sessions
    from xarray_zcache.backend import open_store
    from xarray_zcache.registry import registered_caches

    silence_unclosed_sessions()
    try:
        store = open_store(url, storage_options=storage_options or None, cache_config=config)
    except (ValueError, TypeError) as exc:
        raise CliError(f"URL {url!r}: {exc}") from None
    created = not path.exists()
    preexisting = {id(c) for c in registered_caches()}
    try:
        cache = store.cache
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        raise CliError(f"--cache {path}: cannot open the disk cache: {exc}") from None
    if cache.disk_tier is None:  # memory only (see `open_disk`): nothing would be warmed
        if id(cache) not in preexisting:
            cache.close()
        raise CliError(
            f"--cache {path}: cannot use the disk cache folder "
            f"({cache.disk_refused or 'the cache runs in memory only'}); nothing was warmed",
            EXIT_FAILURE,
        )
    if created:
        note(f"Created disk cache folder {path}", as_json=args.json)
    try:
        before = cache.stats()
        t0 = time.perf_counter()
        decoded = _read(args, url, store, cache, config, names)
        cache.flush()
        elapsed = time.perf_counter() - t0
        after = cache.stats()
    finally:
        if id(cache) not in preexisting:
            cache.close()
    return report(
        url,
        str(store.namespace),
        path,
        after - before,
        after,
        elapsed,
        decoded,
        as_json=args.json,
    )


def _open(store: Any, url: str, group: str | None) -> Any:
    import xarray as xr

    try:
        with warnings.catch_warnings():
            # zarr: "consolidated metadata is not part of the Zarr format 3 spec"
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            return xr.open_dataset(
                store,
                engine="zcache",
                chunks={},
                group=group,
                mask_and_scale=False,
                decode_times=False,
                decode_timedelta=False,
                concat_characters=False,
            )
    except Exception as exc:
        raise CliError(f"cannot open {url}: {type(exc).__name__}: {exc}", EXIT_FAILURE) from None


def _select(ds: Any, names: Sequence[str] | None, url: str) -> Any:
    if not names:
        return ds
    missing = [n for n in names if n not in ds.variables]
    if missing:
        have = ", ".join(sorted(map(str, ds.data_vars))) or "none"
        raise CliError(
            f"--variables: {', '.join(map(repr, missing))} not in {url}; its data variables: {have}"
        )
    return ds[list(names)]


def _read(
    args: argparse.Namespace,
    url: str,
    store: Any,
    cache: HybridCache,
    config: CacheConfig,
    names: Sequence[str] | None,
) -> int:
    """Read every chunk of the selected variables and coordinates; their decoded bytes."""
    import dask.array as da
    import numpy as np
    from dask.base import compute, tokenize
    from dask.diagnostics.progress import ProgressBar

    with _open(store, url, args.group) as ds:
        selected = _select(ds, names, url)
        arrays = [v.data for v in selected.variables.values() if isinstance(v.data, da.Array)]
        max_block = max(
            (
                int(np.prod([max(c, default=0) for c in a.chunks])) * a.dtype.itemsize
                for a in arrays
            ),
            default=0,
        )
        queue = config.write_queue_size
        threads, high_water = plan(queue, max_block, args.threads)
        if max_block > queue:
            warn(
                f"chunks of up to {format_bytes(max_block)} are larger than "
                f"zcache.write-queue-size ({format_bytes(queue)}): such chunks cannot be "
                "written to the disk tier; raise it, e.g. DASK_ZCACHE__WRITE_QUEUE_SIZE="
                f"{format_bytes(4 * max_block).replace(' ', '')}"
            )
        pressure = BackPressure(cache, high_water)
        parts: list[Any] = []
        arr: Any
        for i, arr in enumerate(arrays):
            if arr.ndim == 0:
                arr = arr.reshape((1,))
            sizes = arr.map_blocks(
                pressure.block,
                dtype=np.int64,
                chunks=tuple((1,) * len(c) for c in arr.chunks),
                name=f"zcache-warm-{i}-{tokenize(arr)}",
                meta=np.empty((0,) * arr.ndim, dtype=np.int64),
            )
            parts.append(sizes.sum())
        data_vars = [str(n) for n in selected.data_vars]
        n_coords = len(selected.coords)
        n_blocks = sum(int(np.prod(a.numblocks)) for a in arrays)
        note(
            f"Warming {url}: {plural(len(data_vars), 'variable')}"
            f"{' (' + ', '.join(data_vars) + ')' if data_vars else ''}, "
            f"{plural(n_coords, 'coordinate')}, {plural(n_blocks, 'chunk')} to read "
            f"({plural(threads, 'thread')})",
            as_json=args.json,
        )
        cache.flush()  # the metadata read at open: the queue starts empty
        bar: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if not args.quiet:
            bar = ProgressBar(out=sys.stderr)  # type: ignore[no-untyped-call]
        try:
            with bar:
                sums = compute(*parts, scheduler="threads", num_workers=threads)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise CliError(
                f"reading {url} failed: {type(exc).__name__}: {exc}", EXIT_FAILURE
            ) from None
    return int(sum(sums))
