"""Which disk cache folder a subcommand works on, and opening its tier (never creating one).

What a folder holds is the disk tier's to say (:meth:`DiskTier.probe`); this module turns
its answer into the command's errors.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
from collections.abc import Iterator
from typing import TYPE_CHECKING

from xarray_zcache.cli.errors import EXIT_FAILURE, CliError

if TYPE_CHECKING:
    from xarray_zcache.cache.disk import DiskTier
    from xarray_zcache.cache.disk.tier import FolderState

__all__ = ["cache_folder", "configured_folder", "folder", "open_tier", "recorded_capacity"]

_LAYOUT = "holding index.db, chunks/ and metadata/"


def configured_folder(path: str | None) -> str:
    """``path``, or the configured disk cache folder when it is left out (None)."""
    if path is not None:
        return str(path)
    import dask.config

    from xarray_zcache.config import default_disk_path

    if not dask.config.get("zcache.disk.enabled", default=True):
        raise CliError(
            "no PATH given and the configuration disables the disk tier "
            "(zcache.disk.enabled: false): pass the disk cache folder PATH"
        )
    configured = dask.config.get("zcache.disk.path", default=None)
    found = os.path.expanduser(str(configured)) if configured else default_disk_path()
    if not os.path.lexists(found):
        raise CliError(
            f"{found}: no such folder: the configured disk cache folder (zcache.disk.path) "
            "does not exist yet, nothing was cached there; pass PATH for another folder",
            EXIT_FAILURE,
        )
    return found


def folder(raw: str, *, option: str = "") -> tuple[pathlib.Path, FolderState]:
    """The resolved existing folder ``raw`` and what it holds (nothing created or changed)."""
    from xarray_zcache.cache.disk import DiskTier

    label = f"{option} {raw}".strip()
    try:
        state = DiskTier.probe(raw)
    except FileNotFoundError:
        raise CliError(
            f"{label}: no such folder; expected an xarray-zcache disk cache folder "
            "(see 'zcache stats --help')"
        ) from None
    except NotADirectoryError:
        kind = "a regular file" if os.path.isfile(raw) else "not a folder"
        raise CliError(
            f"{label}: is {kind}; expected an xarray-zcache disk cache folder ({_LAYOUT})"
        ) from None
    except OSError as exc:
        raise CliError(f"{label}: cannot access it: {exc.strerror}") from None
    if state.state == "inaccessible":
        raise CliError(f"{label}: {state.detail}", EXIT_FAILURE)
    return pathlib.Path(raw).expanduser().resolve(), state


def cache_folder(raw: str) -> pathlib.Path:
    """The resolved folder ``raw``; a `CliError` unless it is a disk cache with a usable index."""
    path, state = folder(raw)
    if state.ok:
        return path
    if state.state == "damaged" and state.layout:
        raise CliError(
            f"{raw}: the disk cache index is damaged: {state.detail}; run "
            f"'zcache verify {raw} --repair' to rebuild it",
            EXIT_FAILURE,
        )
    raise CliError(
        f"{raw}: is not an xarray-zcache disk cache folder ({state.detail}); nothing was changed"
    )


@contextlib.contextmanager
def open_tier(path: pathlib.Path, *, rebuild: bool = False) -> Iterator[DiskTier]:
    """The disk tier of an existing cache folder (unlimited capacity: never evicts).

    With ``rebuild``, a lost or damaged index is rebuilt from the payload files.
    """
    from xarray_zcache.cache.disk import DiskTier
    from xarray_zcache.cache.disk.tier import NotACacheFolder

    try:
        tier = DiskTier.open_existing(path, rebuild=rebuild)
    except NotACacheFolder as exc:
        raise CliError(f"{exc}; nothing was changed") from None
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        raise CliError(f"{path}: cannot open the disk cache: {exc}", EXIT_FAILURE) from exc
    try:
        yield tier
    finally:
        tier.close()


def recorded_capacity(path: pathlib.Path) -> tuple[int | None, str]:
    """The capacity the folder is used with and where that figure comes from.

    The folder's own record (``settings.json``, written by the disk tier when it
    opens) first; else ``zcache.disk.size`` when ``path`` is the configured default
    disk folder; else ``(None, "")``.
    """
    from xarray_zcache.cache.disk.folder import recorded_disk_size
    from xarray_zcache.config import CacheConfig

    recorded = recorded_disk_size(path)
    if recorded is not None:
        return recorded, "recorded in the folder"
    try:
        config = CacheConfig()
    except ValueError:
        return None, ""
    if config.disk_path is None:
        return None, ""
    try:
        same = pathlib.Path(config.disk_path).resolve() == path
    except OSError:
        return None, ""
    return (config.disk_size, "zcache.disk.size") if same else (None, "")
