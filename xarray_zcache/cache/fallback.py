"""Losing the disk tier: a cache whose folder vanished or became unusable goes memory only.

The disk tier absorbs what it can wait out or repair (a full disk, a damaged index or
file). What it cannot (the folder removed under a running process, ``index.db`` replaced
by something that is not a file, a folder that can no longer be written) reaches the
cache as an exception from a disk operation; `DiskFallback._lose_disk` then drops the disk
tier for the rest of the process: its queued writes are discarded, the version book keeps
memory only, one warning names the folder and the ``disk_path`` setting, and a vanished
folder is re-created (mode 0700, not its parents) for the next process. Memory stays
consistent (every invalidation drops memory first), so no entry older than the last write
is served; nothing of the lost tier is read again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from xarray_zcache.cache.disk import DiskTier
    from xarray_zcache.cache.freshness import Freshness
    from xarray_zcache.cache.negatives import NegativeEntries
    from xarray_zcache.cache.settings import CacheSettings
    from xarray_zcache.cache.writer import DiskWriter

__all__ = ["DiskFallback", "recreate_folder"]

logger = logging.getLogger("xarray_zcache.cache")

_T = TypeVar("_T")


def recreate_folder(path: str) -> bool:
    """Re-create the vanished cache folder ``path`` (mode 0700; its parent must exist).

    Returns whether the folder exists now. Never raises.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return os.path.isdir(path)
    except OSError:
        return False
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)  # whatever the umask
    return True


class DiskFallback:
    """Part of `HybridCache` (its state is the cache's): dropping a disk tier that failed."""

    settings: CacheSettings
    _disk: DiskTier | None
    _writer: DiskWriter | None
    _negatives: NegativeEntries
    _freshness: Freshness
    _admit_lock: threading.Lock

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    @property
    def disk_lost(self) -> bool:
        """Whether this cache dropped its disk tier (the folder vanished or became unusable)."""
        return getattr(self, "_disk_lost", False)

    def _lose_disk(self, exc: BaseException, action: str) -> None:
        """Drop the disk tier after ``exc`` while ``action``; one warning. Never raises."""
        with self._admit_lock:
            disk, writer = self._disk, self._writer
            if disk is None:
                return
            # under the admission lock: no admission queues a write for the lost tier
            self._disk = None
            self._writer = None
            self._negatives.drop_disk()
            self._disk_lost = True
        try:
            if writer is not None:
                writer.abandon()
            self._freshness.book.detach()
            disk.abandon()
            path = str(disk.path)
            vanished = not os.path.isdir(path)
            if self.closed:
                logger.info(
                    "xarray-zcache: the cache folder %s vanished or cannot be used (%s, while "
                    "%s) as the cache closed",
                    path,
                    exc,
                    action,
                )
                return
            recreated = vanished and recreate_folder(path)
            logger.warning(
                "xarray-zcache: the cache folder %s (disk_path of cache %r) %s (while %s); "
                "caching in memory only until the cache is opened again%s",
                path,
                self.settings.name,
                "vanished" if vanished else f"cannot be used: {type(exc).__name__}: {exc}",
                action,
                "; the folder was re-created, empty, for the next process" if recreated else "",
            )
        except Exception:  # pragma: no cover - never raise from the fallback itself
            logger.exception("xarray-zcache: dropping the disk tier of %s failed", disk.path)

    def _on_disk(self, action: str, op: Callable[[DiskTier], _T], default: _T) -> _T:
        """``op(disk)``, or ``default`` without a disk tier or when it fails (then lost)."""
        disk = self._disk
        if disk is None:
            return default
        try:
            return op(disk)
        except Exception as exc:
            self._lose_disk(exc, action)
            return default
