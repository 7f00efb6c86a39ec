"""Looking at a folder before opening it: does it hold a disk cache? Creates nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sqlite3

from xarray_zcache.cache.disk.format import LAYOUT
from xarray_zcache.cache.disk.schema import INDEX_NAME

__all__ = ["FolderState", "NotACacheFolder", "probe_folder"]


@dataclasses.dataclass(frozen=True)
class FolderState:
    """What a folder holds, as :meth:`DiskTier.probe` finds it (nothing created or changed).

    Attributes
    ----------
    state : {"ok", "missing", "damaged", "inaccessible", "foreign"}
        ``ok``: an index a tier opens as it is; ``missing``: no ``index.db``; ``damaged``:
        ``index.db`` is not readable as SQLite; ``inaccessible``: SQLite cannot open or read
        it (permissions, locks); ``foreign``: something else (another application's data).
    detail : str
        Why, for people (``"no index.db in it"``...); empty when ``ok``.
    layout : bool
        Whether ``chunks/`` and ``metadata/`` are laid out as a disk tier makes them (only
        two-hex-digit bucket folders in them): a lost or damaged index of such a folder can
        be rebuilt from its payload files.
    """

    state: str
    detail: str
    layout: bool

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    @property
    def recoverable(self) -> bool:
        """Whether the index is lost or damaged in a folder laid out as a disk cache."""
        return self.state in ("missing", "damaged") and self.layout


class NotACacheFolder(ValueError):
    """:meth:`DiskTier.open_existing` found no usable disk cache (see :attr:`folder`)."""

    def __init__(self, path: str, folder: FolderState) -> None:
        super().__init__(f"{path}: {folder.detail}")
        self.folder = folder


def _payload_layout(root: str) -> bool:
    for sub, _ext in LAYOUT.values():
        folder = os.path.join(root, sub)
        if os.path.islink(folder) or not os.path.isdir(folder):
            return False
        try:
            with os.scandir(folder) as it:
                names = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except OSError:
            return False
        for name, is_dir in names:
            if not (is_dir and len(name) == 2 and all(c in "0123456789abcdef" for c in name)):
                return False
    return True


def _probe_index(db: str, layout: bool) -> tuple[str, str]:
    if not os.path.exists(db):
        return "missing", f"no {INDEX_NAME} in it"
    if not os.path.isfile(db):
        return "foreign", f"{INDEX_NAME} is not a regular file"
    if os.path.getsize(db) == 0:  # created by a tier an instant before its schema
        if layout:
            return "ok", ""
        return "foreign", f"{INDEX_NAME} is empty and there are no chunks/ or metadata/ folders"
    try:
        uri = pathlib.Path(db).absolute().as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
            tables = {
                name
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
    except sqlite3.OperationalError as exc:  # cannot open or read (permissions, locks...)
        return "inaccessible", f"cannot read {INDEX_NAME}: {exc}"
    except sqlite3.DatabaseError as exc:  # not a database, malformed
        return "damaged", f"{INDEX_NAME} is unreadable ({exc})"
    if not {"entries", "totals"} <= tables:
        return "foreign", f"{INDEX_NAME} is an SQLite database without the tables of a zcache index"
    return "ok", ""


def probe_folder(path: str | os.PathLike[str]) -> FolderState:
    """Look at an existing folder: does it hold a disk cache? Creates and changes nothing.

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        If ``path`` does not exist, or is not a folder.
    """
    root = os.path.expanduser(os.fspath(path))
    os.stat(root)  # FileNotFoundError, PermissionError
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root} is not a folder")
    layout = _payload_layout(root)
    state, detail = _probe_index(os.path.join(root, INDEX_NAME), layout)
    return FolderState(state, detail, layout)
