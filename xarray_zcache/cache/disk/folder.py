"""The cache folder: preparing it (mode 0700, owner, writable), its lock, its recorded
settings (``settings.json``), small file helpers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import stat
import threading
from collections.abc import Iterator
from typing import Any, Final

from xarray_zcache.cache.disk.format import LAYOUT

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("xarray_zcache.disk")

#: ``verify(repair=True)`` removes temp files older than this (younger ones may be in flight).
STALE_TEMP_AGE_S: Final = 600.0

#: The folder's own record of the settings it was last opened with (JSON, never pickle).
SETTINGS_FILE: Final = "settings.json"


class FolderGone(FileNotFoundError):
    """The cache folder vanished under a running process (``rm -rf``, a temp folder removed).

    The tier does not re-create it by itself: its owner decides (`HybridCache` goes memory
    only, with one warning).
    """


def require_folder(root: str) -> None:
    """Raise `FolderGone` if the cache folder ``root`` or one of its payload folders is gone
    (the folder was removed, or is being removed: nothing is written into it then)."""
    for sub in ("", *(sub for sub, _ext in LAYOUT.values())):
        if not os.path.isdir(os.path.join(root, sub)):
            raise FolderGone(2, "the cache folder vanished", os.path.join(root, sub))


def record_settings(path: str | os.PathLike[str], **settings: Any) -> None:
    """Remember ``settings`` (e.g. ``disk_size``) in ``path/settings.json``.

    Written atomically (a temp file renamed over it), only when they changed, so
    tools such as ``zcache stats`` report the size the cache runs with rather than
    whatever the current configuration says. Best effort: an error is logged at
    DEBUG, never raised (a read-only folder still serves reads).
    """
    if recorded_settings(path) == settings:
        return
    final = os.path.join(os.fspath(path), SETTINGS_FILE)
    temp = f"{final}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1, sort_keys=True)
        os.replace(temp, final)
    except OSError as exc:
        unlink_quietly(temp)
        logger.debug("disk cache %s: cannot record its settings (%s)", path, exc)


def recorded_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings ``path/settings.json`` records; empty if none (or unreadable)."""
    try:
        with open(os.path.join(os.fspath(path), SETTINGS_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_disk_size(path: str | os.PathLike[str]) -> int | None:
    """The disk tier size the folder was last opened with, or ``None`` if not recorded."""
    size = recorded_settings(path).get("disk_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def prepare_folder(path: pathlib.Path) -> None:
    """Create ``path`` and its payload subfolders (mode 0700) or check an existing one.

    Raises
    ------
    PermissionError
        If the folder is owned by another user or is not writable.
    NotADirectoryError
        If ``path`` exists and is not a folder.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except PermissionError as exc:
        raise PermissionError(
            f"cannot create the disk cache folder {path}: {exc.strerror}"
        ) from exc
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"disk cache path {path} exists and is not a directory")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise PermissionError(
            f"disk cache folder {path} is owned by uid {st.st_uid}, not by the current user "
            f"(uid {uid}); refusing to use it"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise PermissionError(f"disk cache folder {path} is not writable")
    for sub, _ext in LAYOUT.values():
        try:
            os.makedirs(path / sub, mode=0o700, exist_ok=True)
        except PermissionError as exc:
            raise PermissionError(
                f"disk cache folder {path} is not writable: {exc.strerror}"
            ) from exc


@contextlib.contextmanager
def folder_lock(lock_path: str) -> Iterator[None]:
    """Exclusive lock (``flock`` on ``lock_path``) for opening or replacing the index.

    Serializes, across processes, the steps SQLite cannot protect: creating ``index.db``,
    removing a damaged one with its ``-wal``/``-shm`` files, and closing a connection to an
    index that was replaced. Never held while waiting for SQLite locks held by others, and
    never nested.
    """
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        logger.debug("disk cache: no folder lock at %s (%s)", lock_path, exc)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def file_id(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path``, None if missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of one file, unchanged (not replaced by a newer value)."""
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (
        b.st_dev,
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
    )


def unlink_missing_ok(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def scandir(path: str) -> list[os.DirEntry[str]]:
    """The entries of folder ``path``; none if it is missing or not a folder."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def stale_temp(entry: os.DirEntry[str], now: float) -> bool:
    """Whether a temp file is abandoned: its writer (pid in the name) is dead, or it is old.

    Temp files are named ``.<hash>.<pid>.<uuid>.tmp``; the folder is shared by the processes
    of one host, so a pid that does not exist here means a writer that died (a crash).
    """
    try:
        if now - entry.stat().st_mtime > STALE_TEMP_AGE_S:
            return True
    except OSError:
        return False
    parts = entry.name.split(".")
    if len(parts) != 5 or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists (another user's) or cannot tell
    return False
