"""Checks of config values: sizes, durations, the disk folder, and where a bad value came from.

`xarray_zcache.config.CacheConfig` validates its fields with these; an error names the
field, the allowed values and, for a value from dask config or a ``DASK_*`` environment
variable, that origin.
"""

from __future__ import annotations

import ast
import errno
import math
import os
import stat

import dask.config
from dask.utils import parse_bytes, parse_timedelta

__all__ = ["default_disk_path"]

# dask config key -> CacheConfig field
_FIELD_OF = {
    "name": "name",
    "memory-size": "memory_size",
    "decoded-memory-size": "decoded_memory_size",
    "disk.size": "disk_size",
    "disk.pack-below": "disk_pack_below",
    "disk.index-cache": "disk_index_cache",
    "disk.location-map": "disk_location_map",
    "max-object-size": "max_object_size",
    "ttl.metadata": "metadata_ttl",
    "ttl.chunks": "chunk_ttl",
    "ttl.listing": "listing_ttl",
    "ttl.negative": "negative_ttl",
    "validation": "validation",
    "eviction-policy": "eviction_policy",
    "promotion-threshold": "promotion_threshold",
    "cache-on-write": "cache_on_write",
    "maintenance-interval": "maintenance_interval",
    "write-queue-size": "write_queue_size",
    "top-n": "top_n",
    "prefetch-depth": "prefetch_depth",
    "distributed.per-worker": "per_worker",
    "distributed.report-interval": "report_interval",
    "distributed.peer-reads": "peer_reads",
    "distributed.peer-timeout": "peer_timeout",
    "distributed.placement": "placement",
    "distributed.memory-fraction": "memory_fraction",
    "client": "client",
}


def default_disk_path() -> str:
    """The default folder of the disk tier: ``$XDG_CACHE_HOME/xarray-zcache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xarray-zcache")


def _size(field: str, value: object, *, allow_none: bool = False) -> int | None:
    """Parse a size (int bytes or a string such as ``"2GB"``) or raise naming ``field``."""
    if value is None and allow_none:
        return None
    allowed = "a non-negative int of bytes or a size string such as '512MiB' or '2GB'"
    if isinstance(value, bool):
        raise ValueError(f"{field}: invalid size {value!r}; expected {allowed}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{field}: invalid size {value!r}; expected {allowed}")
        n = int(value)
    elif isinstance(value, str):
        try:
            n = parse_bytes(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{field}: invalid size {value!r}; expected {allowed}") from exc
    else:
        raise ValueError(f"{field}: invalid size {value!r}; expected {allowed}")
    if n < 0:
        raise ValueError(f"{field}: invalid size {value!r}; expected {allowed}")
    return n


def _pack_below(value: object) -> int:
    """``disk_pack_below``: a size from 0 (off) to 64 KiB, or raise naming the field."""
    from xarray_zcache.cache.disk.segments import SEGMENT_THRESHOLD

    n = _size("disk_pack_below", value)
    assert n is not None
    if n > SEGMENT_THRESHOLD:
        raise ValueError(
            f"disk_pack_below: invalid size {value!r}; expected 0 (off) up to "
            f"{SEGMENT_THRESHOLD} bytes ('64KiB')"
        )
    return n


def _index_cache(value: object) -> int:
    """``disk_index_cache``: a size of at least 1 KiB, or raise naming the field."""
    n = _size("disk_index_cache", value)
    assert n is not None
    if n < 1024:
        raise ValueError(
            f"disk_index_cache: invalid size {value!r}; expected a size of at least 1024 bytes "
            "('1KiB') bounding the SQLite page cache of the disk index, such as '16MiB'"
        )
    return n


def _duration(field: str, value: object, *, allow_none: bool) -> float | None:
    """Parse a duration (seconds or a string such as ``"5 minutes"``) or raise naming ``field``."""
    allowed = "a non-negative number of seconds or a string such as '30s' or '5 minutes'"
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{field}: a duration is required; expected {allowed}")
    if isinstance(value, bool):
        raise ValueError(f"{field}: invalid duration {value!r}; expected {allowed}")
    try:
        seconds = parse_timedelta(value, default="seconds")  # type: ignore[call-overload]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{field}: invalid duration {value!r}; expected {allowed}") from exc
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{field}: invalid duration {value!r}; expected {allowed}")
    return float(seconds)


def _validation(value: object) -> float | None:
    """Parse the validation interval: a duration, or ``"never"``/``None``."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "never"):
        return None
    try:
        return _duration("validation", value, allow_none=False)
    except ValueError:
        raise ValueError(
            f"validation: invalid interval {value!r}; expected 'never' (or None) or a "
            "non-negative number of seconds or a string such as '30s' or '10 minutes'"
        ) from None


def _interpret_env(text: str) -> object:
    """An environment value as dask reads it (`dask.config.collect_env`)."""
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def _env_var_of(key: str, value: object) -> str | None:
    """The ``DASK_*`` environment variable that set dask config ``key`` to ``value``, if any."""
    want = key.lower().replace("_", "-")
    for var, text in os.environ.items():
        if not var.startswith("DASK_"):
            continue
        if var[5:].lower().replace("__", ".").replace("_", "-") != want:
            continue
        if _interpret_env(text) == value or text == value:
            return var
    return None


def _origin(field: str, value: object, name: object) -> str | None:
    """Where an invalid ``value`` of ``field`` came from, if from dask config or the environment.

    ``"DASK_ZCACHE__MEMORY_SIZE (environment variable, dask config key 'zcache.memory-size')"``
    or ``"dask config key 'zcache.memory-size'"``; ``None`` when the value was passed
    directly (it differs from the configured one).
    """
    if field == "disk_path" and value == default_disk_path():
        return "the default folder ($XDG_CACHE_HOME/xarray-zcache or ~/.cache/xarray-zcache)"
    key = {f: k for k, f in _FIELD_OF.items()}.get(
        field, "disk.path" if field == "disk_path" else ""
    )
    if not key:
        return None
    keys = [f"zcache.{key}"]
    if isinstance(name, str) and name and "." not in name:
        keys.insert(0, f"zcache.caches.{name}.{key}")
    for dkey in keys:
        configured = dask.config.get(dkey, default=_MISSING)
        if configured is _MISSING or type(configured) is not type(value) or configured != value:
            continue
        env = _env_var_of(dkey, value)
        if env is not None:
            return f"{env} (environment variable, dask config key {dkey!r})"
        return f"dask config key {dkey!r}"
    return None


_MISSING = object()


def _check_disk_folder(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a folder or can be created as one.

    Nothing is created: ``path`` must be an existing folder, or its nearest existing
    parent a folder this process may write to. An existing folder that is not
    writable (a read-only filesystem) passes: the cache falls back to memory then.
    """
    hint = (
        "expected a folder for the disk tier (created if missing), or None for a "
        "memory-only cache (without_disk_cache(), dask config zcache.disk.enabled: false)"
    )
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as exc:
        raise ValueError(
            f"disk_path: cannot use the folder {path!r}: {exc.strerror}; {hint}"
        ) from None
    if mode is not None:
        if not stat.S_ISDIR(mode):
            kind = "an existing regular file" if stat.S_ISREG(mode) else "an existing file"
            raise ValueError(
                f"disk_path: cannot use the folder {path!r}: it is {kind}, not a "
                f"folder ({os.strerror(errno.EEXIST)}); {hint}"
            )
        return
    parent = os.path.dirname(path)
    while True:
        try:
            mode = os.stat(parent).st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            up = os.path.dirname(parent)
            if up == parent:
                return  # nothing exists up to the root: let the disk tier report it
            parent = up
        except OSError as exc:
            raise ValueError(
                f"disk_path: cannot create the folder {path!r}: cannot access {parent!r} "
                f"({exc.strerror}); {hint}"
            ) from None
    if not stat.S_ISDIR(mode):
        raise ValueError(
            f"disk_path: cannot create the folder {path!r}: {parent!r} is a file, not a "
            f"folder ({os.strerror(errno.ENOTDIR)}); {hint}"
        )
    # root passes access(2) everywhere but read-only mounts: also ask for a write bit, so
    # that /proc or /sys (mode 0555, where mkdir fails) are refused
    writable = os.access(parent, os.W_OK | os.X_OK)
    if writable and os.geteuid() == 0 and not mode & 0o222:
        writable = False
    if not writable:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            # a read-only file system: the data stays readable, the cache works in memory
            # only (with a warning naming the folder) when it is first used
            return
        reason = os.strerror(errno.EACCES)
        raise ValueError(
            f"disk_path: cannot create the folder {path!r}: {parent!r} is not writable "
            f"({reason}); {hint}"
        )
