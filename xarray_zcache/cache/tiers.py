"""Opening the tiers: the disk tier, or memory only when its folder is read-only."""

from __future__ import annotations

import dataclasses
import errno
import logging
from typing import Protocol

from xarray_zcache.cache.disk import DiskTier, NewerIndex
from xarray_zcache.cache.disk.folder import record_settings
from xarray_zcache.cache.request import Read
from xarray_zcache.cache.settings import CacheSettings

__all__ = ["SharedAnswer", "SharedTier", "open_disk", "open_disk_tier"]

logger = logging.getLogger("xarray_zcache.cache")


@dataclasses.dataclass(frozen=True, slots=True)
class SharedAnswer:
    """What a shared tier answered: the bytes, and whether it had them (``saved``).

    ``saved=False``: the tier read the source for this read (a request was sent,
    counted where it was sent), so the read saved nothing. ``confirmed``: when the
    answering cache last confirmed the bytes' version at the source (on this
    process's clock: a peer answer is dated from its age, not the owner's clock);
    a replica kept here is served until ``confirmed`` + the validation interval
    at most, then asked for again (None: no validation, the kind's TTL rules).
    """

    value: bytes
    saved: bool
    confirmed: float | None = None


class SharedTier(Protocol):
    """A tier after the disk tier, shared with other caches (e.g. a key's owner).

    `HybridCache` asks it on a miss in memory and on disk, never for reads made on
    behalf of a peer. ``None``: no answer (owned here, unreachable, busy, bad
    answer): the cache reads the source itself.
    """

    name: str

    async def lookup(self, read: Read) -> SharedAnswer | None:
        """The bytes of ``read.key`` if this tier has (or can fetch) them, else ``None``."""


_OFFLINE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def open_disk(settings: CacheSettings) -> DiskTier | None:
    """The disk tier, or ``None`` (memory only, with a warning) on a read-only folder or on
    one a newer xarray-zcache has written (its index is left as it is: nothing it holds is
    lost, and that version goes on using it)."""
    return open_disk_tier(settings)[0]


def open_disk_tier(settings: CacheSettings) -> tuple[DiskTier | None, str | None]:
    """`open_disk`, with why the folder was refused: ``(tier, None)``, or ``(None, reason)``
    when the cache runs in memory only although a folder was given (``reason`` completes
    "cannot use the cache folder ...": it cannot be written; a newer xarray-zcache wrote
    it). No folder or a size of 0: ``(None, None)``."""
    if settings.disk_path is None or settings.disk_size <= 0:
        return None, None
    try:
        disk = DiskTier(
            settings.disk_path,
            settings.disk_size,
            max_object_size=settings.max_object_size,
            segment_threshold=settings.disk_pack_below or -1,
            index_cache_bytes=settings.disk_index_cache,
            location_map=settings.disk_location_map,
        )
    except NewerIndex as exc:
        logger.warning(
            "xarray-zcache: the cache folder %s (disk_path) was written by a newer "
            "xarray-zcache (%s); caching in memory only. Upgrade xarray-zcache, or give this "
            "version a folder of its own",
            settings.disk_path,
            exc,
        )
        return None, (
            f"it was written by a newer xarray-zcache: {exc}; upgrade xarray-zcache, "
            "or give this version a folder of its own"
        )
    except OSError as exc:
        if exc.errno in _OFFLINE_ERRNOS:
            logger.warning(
                "xarray-zcache: the cache folder %s (disk_path) cannot be written (%s); "
                "caching in memory only",
                settings.disk_path,
                exc.strerror or exc,
            )
            return None, f"it cannot be written: {exc.strerror or exc}"
        raise type(exc)(
            exc.errno,
            f"xarray-zcache: cannot use the cache folder {settings.disk_path} (disk_path): "
            f"{exc.strerror or exc}",
        ) from exc
    # the folder remembers its size: `zcache stats` and `zcache warm` report it
    record_settings(disk.path, disk_size=disk.capacity, max_object_size=settings.max_object_size)
    return disk, None
