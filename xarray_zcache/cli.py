"""The ``zcache`` command: look into, clear, fill and check a disk cache folder.

Subcommands (``zcache SUBCOMMAND --help`` for each):

``zcache stats [PATH] [--json] [--top N]``
    What a disk cache folder holds: entries, bytes, per dataset namespace (with the
    chunk/metadata split and hit counts), oldest and newest entries, most hit entries,
    expired entries. Read from the SQLite index.
``zcache clear [PATH] [--expired | --namespace NS] [--dry-run] [--json]``
    Remove every entry, only the expired ones, or only those of one namespace
    (``--dry-run``: only say what would be removed).
``zcache warm URL [--variables V1,V2] [--cache PATH] [--json] ...``
    Read a dataset through the ``zcache`` engine so that every chunk of the selected
    variables ends up in the disk tier.
``zcache verify [PATH] [--repair] [--json]``
    Check every payload file against its header, checksum and index row.

PATH defaults to the configured disk cache folder (dask config ``zcache.disk.path``,
by default ``$XDG_CACHE_HOME/xarray-zcache``). Every subcommand prints JSON with
``--json``. A closed output pipe (``zcache stats --json | head``) ends the command
quietly with status 0.

Safety rules kept by every subcommand: a PATH that does not exist, is not a folder, or
is a folder without an xarray-zcache index (``index.db``) is refused with an error and
nothing is created or changed there; nothing outside the cache folder is ever deleted,
and inside it only cache files (payloads, temp files of unfinished writes, the index)
are. ``warm`` creates its cache folder only when it does not exist yet (or is empty).

Exit status: 0 on success, 1 when the work failed (``verify`` found damage it did not
repair, a read failed during ``warm``), 2 on bad usage (bad path, URL, size or option).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import sqlite3
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

from dask.utils import format_bytes, format_time, parse_bytes

if TYPE_CHECKING:
    import numpy as np

    from xarray_zcache.cache.disk import DiskTier
    from xarray_zcache.cache.hybrid import HybridCache
    from xarray_zcache.config import CacheConfig

__all__ = ["CliError", "build_parser", "main"]

PROG: Final = "zcache"

#: Exit status of a failed operation (damage found, a read failed).
EXIT_FAILURE: Final = 1
#: Exit status of bad usage (bad path, URL, size or option), as argparse uses.
EXIT_USAGE: Final = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED: Final = 130

_INDEX: Final = "index.db"
#: The index and the files SQLite keeps beside it (WAL mode).
_INDEX_FILES: Final = (_INDEX, _INDEX + "-wal", _INDEX + "-shm")
#: Subfolders of the payload files (see :mod:`xarray_zcache.cache.disk`).
_PAYLOAD_DIRS: Final = ("chunks", "metadata")
#: Capacity given to a DiskTier opened for inspection: never evicts anything.
_NO_LIMIT: Final = sys.maxsize
_DAMAGE: Final = ("corrupt", "missing_files", "orphan_files", "mismatched", "index_damaged")
_VERIFY_LABELS: Final = {
    "ok": "entries whose payload file and index row agree",
    "corrupt": "damaged payload files (bad header, length or checksum)",
    "missing_files": "index rows without a payload file",
    "orphan_files": "payload files without an index row",
    "mismatched": "payload file and index row disagree (size or checksum)",
    "temp_files": "temp files of unfinished writes (in flight, or left by a crash)",
    "unknown_files": "files the cache does not know (never touched)",
    "index_damaged": "index.db failed SQLite's integrity check",
}
_SIZE_FORM: Final = "a number of bytes or a size such as '512MiB', '10GB' or '1.5TiB'"

logger = logging.getLogger("xarray_zcache.cli")


class CliError(Exception):
    """An error reported as ``zcache: error: MESSAGE`` with a non-zero exit status.

    Parameters
    ----------
    message : str
        What went wrong, and what is expected instead.
    status : int, default 2
        Exit status: 2 for bad usage (paths, URLs, sizes, options), 1 for failures.
    """

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


# -- argument parsing ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors read ``zcache: error: ...`` (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the line breaks of descriptions and epilogs (examples) as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # never break "zcache.memory-size" or "eu-west-1" at a hyphen
        return textwrap.wrap(
            " ".join(text.split()), width, break_on_hyphens=False, break_long_words=False
        )


def _size(text: str) -> int:
    """Parse a positive byte size with `dask.utils.parse_bytes` (an argparse ``type``)."""
    try:
        value = parse_bytes(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; expected {_SIZE_FORM}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}; expected a size > 0: {_SIZE_FORM}"
        )
    return value


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid thread count {text!r}; expected an integer >= 1")
    return value


def _top(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}; expected an integer >= 0")
    return value


def _storage_option(text: str) -> tuple[list[str], Any]:
    """Parse ``KEY=VALUE``: VALUE as JSON when it parses (``true``, ``3``, ``{...}``), else str.

    A dotted KEY (``client_kwargs.region_name=eu-west-1``) builds nested options.
    """
    key, sep, raw = text.partition("=")
    parts = key.split(".")
    if not sep or not all(parts):
        raise argparse.ArgumentTypeError(
            f"invalid storage option {text!r}; expected KEY=VALUE, e.g. anon=true or "
            "endpoint_url=http://127.0.0.1:9000 (dotted KEY for nested options)"
        )
    value: Any
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def _nested(options: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """Merge parsed ``--storage-option`` values into one (nested) dict."""
    out: dict[str, Any] = {}
    for path, value in options:
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise CliError(
                    f"--storage-option {'.'.join(path)}: conflicts with {where}=..., "
                    "which is not a mapping"
                )
            node = child
        node[path[-1]] = value
    return out


_MAIN_EPILOG = """\
examples:
  zcache stats ~/.cache/xarray-zcache                # what the disk cache holds
  zcache stats ~/.cache/xarray-zcache --json         # the same, for scripts
  zcache clear ~/.cache/xarray-zcache --expired      # drop expired entries only
  zcache clear ~/.cache/xarray-zcache --namespace s3://bucket/era5.zarr
  zcache warm s3://bucket/era5.zarr --variables t2m,tp --cache /scratch/zcache
  zcache verify ~/.cache/xarray-zcache --repair      # check every file, fix damage

PATH is a disk cache folder; without PATH, the configured one: the dask config key
zcache.disk.path (DASK_ZCACHE__DISK__PATH), by default $XDG_CACHE_HOME/xarray-zcache
(~/.cache/xarray-zcache). The command never deletes anything outside that folder, and
refuses a PATH that is not a cache folder. --json prints JSON on every subcommand.

exit status: 0 success (also when the reader closes the output pipe early); 1 failure
(damage found by verify and not repaired, a read failed during warm); 2 bad usage (bad
path, URL, size or option).
"""

_STATS_EPILOG = """\
examples:
  zcache stats                                       # the configured folder
  zcache stats /scratch/zcache --top 20
  zcache stats /scratch/zcache --json | jq '.namespaces[].namespace'

A namespace names the data a cache entry belongs to (protocol, endpoint, bucket and
path, never credentials): pass it to 'zcache clear PATH --namespace NS'. The capacity
is shown only for the configured default folder (zcache.disk.size): the folder itself
does not record the size it was used with. In --json output times are seconds since
the epoch and sizes are bytes.
"""

_CLEAR_EPILOG = """\
examples:
  zcache clear ~/.cache/xarray-zcache                # remove every entry
  zcache clear --dry-run                             # what would go (configured folder)
  zcache clear ~/.cache/xarray-zcache --expired      # only entries past their TTL
  zcache clear /scratch/zcache --namespace s3://bucket/era5.zarr

Only cache files are removed: the folder, its index (emptied) and any file the cache
does not know stay. Safe while other processes use the folder: a read that started
before the clear does not put its (possibly stale) bytes back. 'zcache stats PATH'
lists the namespaces.
"""

_WARM_EPILOG = """\
examples:
  zcache warm s3://bucket/era5.zarr --cache /scratch/zcache --cache-size 200GB
  zcache warm s3://bucket/era5.zarr --variables t2m,tp --storage-option anon=true
  zcache warm s3://bucket/data.zarr --group forecast \\
      --storage-option endpoint_url=http://127.0.0.1:9000 \\
      --storage-option config_kwargs.s3.addressing_style=path
  zcache warm /data/local.zarr --cache /scratch/zcache
  zcache warm simplecache::s3://bucket/data.zarr --storage-option s3.anon=true --json

Every chunk of the selected variables and of their coordinates is read once through
the cache (a cheap reduction per chunk: the data is never held in memory as a whole)
and written to the disk tier, which is flushed before the command exits. Later reads
with the same disk folder and the same URL (same endpoint) are served from disk.
--storage-option values are parsed as JSON when they can be (true, 3, {"a": 1}),
otherwise kept as strings; quote a string that looks like JSON: key='"123"'.
"""

_VERIFY_EPILOG = """\
examples:
  zcache verify                                      # the configured folder
  zcache verify ~/.cache/xarray-zcache --repair
  zcache verify /scratch/zcache --json

Every payload file is read and checked against its header (magic, version, lengths,
checksums, key) and its index row; the index gets SQLite's integrity check. --repair
removes damaged files and their rows, rows without a file, files without a row,
mismatched pairs and temp files older than 10 minutes, then checks again. A missing
or damaged index.db is rebuilt by --repair from the payload files' headers (each
records its key, namespace, size, checksum and expiry; hit counts start again at 0).
Run --repair when no other process is writing to the folder.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``zcache`` argument parser (also used to render the CLI docs).

    Returns
    -------
    argparse.ArgumentParser
        The parser with its four subcommands.
    """
    parser = _Parser(
        prog=PROG,
        description=(
            "Look into, clear, fill and check an xarray-zcache disk cache folder\n"
            "(the persistent tier of the cache behind xr.open_dataset(..., engine='zcache'))."
        ),
        epilog=_MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    folder_help = f"the disk cache folder (default: {_default('disk.path')})"
    json_help = "print JSON instead of text"

    stats = sub.add_parser(
        "stats",
        help="show what a disk cache folder holds",
        description=(
            "Show what a disk cache folder holds: entries and bytes (chunks and metadata),\n"
            "per dataset namespace, oldest and newest entries, hit counts, the most hit\n"
            "entries and how many entries are expired. Nothing is modified."
        ),
        epilog=_STATS_EPILOG,
        formatter_class=_Formatter,
    )
    stats.add_argument("path", metavar="PATH", nargs="?", help=folder_help)
    stats.add_argument("--json", action="store_true", help=json_help)
    stats.add_argument(
        "--top",
        type=_top,
        default=10,
        metavar="N",
        help="how many of the most hit entries to list (default: 10)",
    )
    stats.set_defaults(func=_cmd_stats)

    clear = sub.add_parser(
        "clear",
        help="remove entries (all, expired ones, or one namespace's)",
        description=(
            "Remove entries from a disk cache folder: all of them (the default), only the\n"
            "expired ones, or only those of one dataset namespace. Prints what was removed."
        ),
        epilog=_CLEAR_EPILOG,
        formatter_class=_Formatter,
    )
    clear.add_argument("path", metavar="PATH", nargs="?", help=folder_help)
    clear.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would be removed, remove nothing",
    )
    clear.add_argument("--json", action="store_true", help=json_help)
    which = clear.add_mutually_exclusive_group()
    which.add_argument(
        "--expired", action="store_true", help="remove only entries past their time to live"
    )
    which.add_argument(
        "--namespace",
        metavar="NS",
        help="remove only the entries of this namespace (as listed by 'zcache stats')",
    )
    clear.set_defaults(func=_cmd_clear)

    warm = sub.add_parser(
        "warm",
        help="read a dataset through the cache so later reads come from disk",
        description=(
            "Open a Zarr dataset through the zcache engine with a disk cache and read every\n"
            "chunk of the selected variables (and of their coordinates), with a progress\n"
            "bar, so that later reads are served from the disk cache. Prints a summary."
        ),
        epilog=_WARM_EPILOG,
        formatter_class=_Formatter,
    )
    warm.add_argument(
        "url",
        metavar="URL",
        help="the dataset: s3://bucket/path.zarr, gs://..., file://... or a local path",
    )
    warm.add_argument(
        "--variables",
        metavar="V1,V2",
        help="comma-separated variables to read (default: all data variables)",
    )
    warm.add_argument(
        "--cache",
        metavar="PATH",
        help=f"disk cache folder, created if missing (default: {_default('disk.path')})",
    )
    warm.add_argument(
        "--cache-size",
        type=_size,
        metavar="SIZE",
        help="disk tier capacity, e.g. 200GB (default: the size recorded in the folder, "
        f"else {_default('disk.size')})",
    )
    warm.add_argument(
        "--memory-size",
        type=_size,
        metavar="SIZE",
        help=f"memory tier capacity, e.g. 1GiB (default: {_default('memory-size')})",
    )
    warm.add_argument(
        "--storage-option",
        action="append",
        type=_storage_option,
        default=[],
        metavar="KEY=VALUE",
        help=(
            "fsspec/s3fs option for URL (repeatable), e.g. anon=true, "
            "endpoint_url=https://..., client_kwargs.region_name=eu-west-1"
        ),
    )
    warm.add_argument("--group", metavar="G", help="the Zarr group to open (default: the root)")
    warm.add_argument(
        "--threads",
        type=_threads,
        default=8,
        metavar="N",
        help="chunks read at once (default: 8; fewer if chunks are large)",
    )
    warm.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    warm.add_argument(
        "--json", action="store_true", help="print the summary as JSON (progress on stderr)"
    )
    warm.set_defaults(func=_cmd_warm)

    verify = sub.add_parser(
        "verify",
        help="check every payload file against its header, checksum and index row",
        description=(
            "Check a disk cache folder: every payload file against its header, checksum\n"
            "and index row, and every index row against its file. Prints the counts; the\n"
            "exit status is 1 if damage was found and not repaired."
        ),
        epilog=_VERIFY_EPILOG,
        formatter_class=_Formatter,
    )
    verify.add_argument("path", metavar="PATH", nargs="?", help=folder_help)
    verify.add_argument(
        "--repair", action="store_true", help="remove what is damaged, then check again"
    )
    verify.add_argument("--json", action="store_true", help=json_help)
    verify.set_defaults(func=_cmd_verify)
    return parser


def _default(key: str) -> str:
    """``"VALUE (zcache.KEY)"``: a configured default, for the help texts."""
    import dask.config

    value = dask.config.get(f"zcache.{key}", default=None)
    if key == "disk.path" and not value:
        value = "$XDG_CACHE_HOME/xarray-zcache or ~/.cache/xarray-zcache"
    if isinstance(value, int):
        value = format_bytes(value)
    return f"{value}, zcache.{key}"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("xarray-zcache")
    except Exception:
        from xarray_zcache import __version__

        return __version__


# -- cache folders ------------------------------------------------------------------------------


def _folder(raw: str) -> pathlib.Path:
    """The resolved cache folder ``raw``; raise `CliError` unless it is an existing folder."""
    path = pathlib.Path(raw).expanduser()
    try:
        path.stat()
    except FileNotFoundError:
        raise CliError(
            f"{raw}: no such folder; expected an xarray-zcache disk cache folder "
            "(see 'zcache stats --help')"
        ) from None
    except OSError as exc:
        raise CliError(f"{raw}: cannot access it: {exc.strerror}") from None
    if not path.is_dir():
        kind = "a regular file" if path.is_file() else "not a folder"
        raise CliError(
            f"{raw}: is {kind}; expected an xarray-zcache disk cache folder "
            f"(holding {_INDEX}, chunks/ and metadata/)"
        )
    return path.resolve()


def _path_arg(args: argparse.Namespace) -> str:
    """The PATH argument, or the configured disk cache folder when it is left out."""
    if args.path is not None:
        return str(args.path)
    import dask.config

    from xarray_zcache.config import default_disk_path

    if not dask.config.get("zcache.disk.enabled", default=True):
        raise CliError(
            "no PATH given and the configuration disables the disk tier "
            "(zcache.disk.enabled: false): pass the disk cache folder PATH"
        )
    configured = dask.config.get("zcache.disk.path", default=None)
    path = os.path.expanduser(str(configured)) if configured else default_disk_path()
    if not os.path.lexists(path):
        raise CliError(
            f"{path}: no such folder: the configured disk cache folder (zcache.disk.path) "
            "does not exist yet, nothing was cached there; pass PATH for another folder",
            EXIT_FAILURE,
        )
    return path


def _has_payload_dirs(folder: pathlib.Path) -> bool:
    """Whether ``folder`` has the payload layout of a disk cache (for a lost index).

    Both ``chunks/`` and ``metadata/`` (a DiskTier always creates both) holding nothing
    but two-hex-digit bucket folders: a folder that merely has a ``chunks`` subfolder is
    not taken for a cache.
    """
    for name in _PAYLOAD_DIRS:
        sub = folder / name
        if sub.is_symlink() or not sub.is_dir():
            return False
        try:
            children = list(sub.iterdir())
        except OSError:
            return False
        for child in children:
            if not (len(child.name) == 2 and _is_hex(child.name) and child.is_dir()):
                return False
    return True


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _index_problem(folder: pathlib.Path) -> tuple[str, str] | None:
    """Why ``folder/index.db`` cannot be opened as a zcache index, or None if it can.

    Returns ``(state, detail)`` with state ``"missing"``, ``"damaged"`` (not readable as
    SQLite), ``"inaccessible"`` (SQLite cannot open or read it: permissions, locks) or
    ``"foreign"`` (an SQLite database of something else).
    """
    index = folder / _INDEX
    if not index.exists():
        return "missing", f"no {_INDEX} in it"
    if not index.is_file():
        return "foreign", f"{_INDEX} is not a regular file"
    if index.stat().st_size == 0:
        # created by DiskTier an instant before its schema: ours only beside payload folders
        if _has_payload_dirs(folder):
            return None
        return "foreign", f"{_INDEX} is empty and there are no chunks/ or metadata/ folders"
    try:
        conn = sqlite3.connect(index.as_uri() + "?mode=ro", uri=True, timeout=30)
        try:
            tables = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:  # cannot open or read (permissions, locks...)
        return "inaccessible", f"cannot read {_INDEX}: {exc}"
    except sqlite3.DatabaseError as exc:  # not a database, malformed
        return "damaged", f"{_INDEX} is unreadable ({exc})"
    if not {"entries", "totals"} <= tables:
        return "foreign", f"{_INDEX} is an SQLite database without the tables of a zcache index"
    return None


def _cache_folder(raw: str) -> pathlib.Path:
    """Check that ``raw`` is an xarray-zcache disk cache folder with a readable index."""
    folder = _folder(raw)
    problem = _index_problem(folder)
    if problem is None:
        return folder
    state, detail = problem
    if state == "inaccessible":
        raise CliError(f"{raw}: {detail}", EXIT_FAILURE)
    if state == "damaged" and _has_payload_dirs(folder):
        raise CliError(
            f"{raw}: the disk cache index is damaged: {detail}; run "
            f"'zcache verify {raw} --repair' to rebuild it",
            EXIT_FAILURE,
        )
    raise CliError(
        f"{raw}: is not an xarray-zcache disk cache folder ({detail}); nothing was changed"
    )


@contextlib.contextmanager
def _open_tier(folder: pathlib.Path, *, recover: bool = False) -> Iterator[DiskTier]:
    """Open the disk tier of an existing cache folder (never evicts: unlimited capacity).

    With ``recover``, an index that cannot be opened is removed and created anew (the
    tier rebuilds it from the payload files' headers).
    """
    from xarray_zcache.cache.disk import DiskTier

    try:
        try:
            tier = DiskTier(folder, _NO_LIMIT)
        except sqlite3.DatabaseError:
            if not recover:
                raise
            _reset_index(folder)
            tier = DiskTier(folder, _NO_LIMIT)
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        raise CliError(f"{folder}: cannot open the disk cache: {exc}", EXIT_FAILURE) from exc
    try:
        yield tier
    finally:
        tier.close()


def _configured_capacity(folder: pathlib.Path) -> int | None:
    """``zcache.disk.size`` if ``folder`` is the configured default disk folder, else None."""
    from xarray_zcache.config import CacheConfig

    try:
        config = CacheConfig()
    except ValueError:
        return None
    if config.disk_path is None:
        return None
    try:
        same = pathlib.Path(config.disk_path).resolve() == folder
    except OSError:
        return None
    return config.disk_size if same else None


# -- formatting helpers -------------------------------------------------------------------------


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _show_key(key: str) -> str:
    """A cache key for people: the byte range of a ranged entry spelled out."""
    base, sep, rng = key.partition("\x00")
    shown = _printable(base)
    if not sep:
        return shown
    if rng.startswith("r") and "-" in rng:
        start, _, end = rng[1:].partition("-")
        return f"{shown} [bytes {start}-{end}]"
    if rng.startswith("o"):
        return f"{shown} [bytes {rng[1:]}-]"
    if rng.startswith("s"):
        return f"{shown} [last {rng[1:]} bytes]"
    return f"{shown} [{_printable(rng)}]"


def _when(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    age = now - t
    if age < 0:
        return f"{stamp} (in {format_time(-age)})"
    return f"{stamp} ({format_time(age)} ago)"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {plural or word + 's'}"


def _emit(text: str = "") -> None:
    print(text, flush=True)


def _note(args: argparse.Namespace, text: str) -> None:
    """A progress line: on stdout, or on stderr when stdout carries ``--json`` output."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


# -- stats --------------------------------------------------------------------------------------


def _group(rows: Sequence[Mapping[str, Any]], now: float) -> dict[str, Any]:
    """Totals of a group of index rows."""
    kinds = {k: {"entries": 0, "bytes": 0} for k in ("chunk", "metadata")}
    expired = {"entries": 0, "bytes": 0}
    hits = 0
    for row in rows:
        bucket = kinds.setdefault(str(row["kind"]), {"entries": 0, "bytes": 0})
        bucket["entries"] += 1
        bucket["bytes"] += int(row["size"])
        hits += int(row["hits"])
        if row["expires"] is not None and row["expires"] < now:
            expired["entries"] += 1
            expired["bytes"] += int(row["size"])
    created = [float(row["created"]) for row in rows]
    accessed = [float(row["last_access"]) for row in rows]
    return {
        "entries": len(rows),
        "bytes": sum(int(row["size"]) for row in rows),
        "kinds": kinds,
        "hits": hits,
        "expired": expired,
        "oldest_created": min(created, default=None),
        "newest_created": max(created, default=None),
        "last_access": max(accessed, default=None),
    }


def cache_summary(
    folder: pathlib.Path, rows: Sequence[Mapping[str, Any]], *, top: int = 10, now: float
) -> dict[str, Any]:
    """Summarize the index rows of a disk cache (what ``zcache stats --json`` prints).

    Parameters
    ----------
    folder : pathlib.Path
        The cache folder.
    rows : sequence of mapping
        Rows from `DiskTier.entries`.
    top : int
        Number of most hit entries to list.
    now : float
        Current time (seconds since the epoch), for the expired counts.

    Returns
    -------
    dict
        JSON-friendly summary; sizes in bytes, times in seconds since the epoch.
    """
    summary: dict[str, Any] = {"path": str(folder), **_group(rows, now)}
    from xarray_zcache.cache.disk.folder import recorded_disk_size  # the folder's own record

    capacity, source = recorded_disk_size(folder), "recorded in the folder"
    if capacity is None:
        capacity, source = _configured_capacity(folder), "zcache.disk.size"
    if capacity is not None:
        summary["capacity"], summary["capacity_source"] = capacity, source
    if rows:
        oldest = min(rows, key=lambda r: float(r["created"]))
        newest = max(rows, key=lambda r: float(r["created"]))
        summary["oldest_key"] = oldest["key"]
        summary["newest_key"] = newest["key"]
    by_ns: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_ns.setdefault(str(row["namespace"]), []).append(row)
    namespaces = [{"namespace": ns, **_group(group, now)} for ns, group in by_ns.items()]
    namespaces.sort(key=lambda d: (-d["bytes"], d["namespace"]))
    summary["namespaces"] = namespaces
    hot = sorted(
        (r for r in rows if int(r["hits"]) > 0),
        key=lambda r: (-int(r["hits"]), -float(r["last_access"]), str(r["key"])),
    )[:top]
    summary["top_hits"] = [
        {
            "key": r["key"],
            "namespace": r["namespace"],
            "kind": r["kind"],
            "size": int(r["size"]),
            "hits": int(r["hits"]),
            "last_access": float(r["last_access"]),
        }
        for r in hot
    ]
    summary["generated"] = now
    return summary


def _split(group: Mapping[str, Any]) -> str:
    chunk, meta = group["kinds"]["chunk"], group["kinds"]["metadata"]
    return (
        f"{_plural(chunk['entries'], 'chunk')} ({format_bytes(chunk['bytes'])}), "
        f"{meta['entries']} metadata ({format_bytes(meta['bytes'])})"
    )


def _format_stats(s: Mapping[str, Any]) -> str:
    now = float(s["generated"])
    lines = [f"Disk cache {s['path']}"]
    rows: list[tuple[str, str]] = [
        ("entries", f"{s['entries']}: {_split(s)}"),
        ("size", format_bytes(s["bytes"])),
    ]
    if "capacity" in s:
        cap = int(s["capacity"])
        used = f"{100 * s['bytes'] / cap:.1f}% used" if cap else "disk tier disabled"
        source = s.get("capacity_source", "zcache.disk.size")
        rows.append(("capacity", f"{format_bytes(cap)} ({source}; {used})"))
    rows.append(("hits", str(s["hits"])))
    expired = s["expired"]
    text = f"{expired['entries']} entries, {format_bytes(expired['bytes'])}"
    if expired["entries"]:
        text += f" ('zcache clear {s['path']} --expired' removes them)"
    rows.append(("expired", text))
    rows.append(("oldest", _when(s["oldest_created"], now)))
    rows.append(("newest", _when(s["newest_created"], now)))
    rows.append(("last access", _when(s["last_access"], now)))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]

    namespaces = s["namespaces"]
    lines.append("")
    lines.append(f"Namespaces ({len(namespaces)})" if namespaces else "Namespaces: none")
    for ns in namespaces:
        lines.append(f"  {_printable(ns['namespace']) or '(none)'}")
        lines.append(
            f"      {_plural(ns['entries'], 'entry', 'entries')}, "
            f"{format_bytes(ns['bytes'])}: {_split(ns)}"
        )
        lines.append(
            f"      {_plural(ns['hits'], 'hit')}, {ns['expired']['entries']} expired; "
            f"created {_when(ns['oldest_created'], now)} .. {_when(ns['newest_created'], now)}"
        )
    hot = s["top_hits"]
    if hot:
        lines.append("")
        lines.append(f"Most hit entries (top {len(hot)})")
        sizes = [format_bytes(h["size"]) for h in hot]
        hw = max(4, *(len(str(h["hits"])) for h in hot))
        sw = max(4, *(len(x) for x in sizes))
        lines.append(f"  {'HITS':>{hw}}  {'SIZE':>{sw}}  {'KIND':<8}  KEY")
        for h, size in zip(hot, sizes, strict=True):
            lines.append(
                f"  {h['hits']:>{hw}}  {size:>{sw}}  {h['kind']:<8}  {_show_key(h['key'])}"
            )
    return "\n".join(lines)


def _cmd_stats(args: argparse.Namespace) -> int:
    folder = _cache_folder(_path_arg(args))
    with _open_tier(folder) as tier:
        rows = tier.entries()
    summary = cache_summary(folder, rows, top=args.top, now=time.time())
    _emit(json.dumps(summary, indent=2) if args.json else _format_stats(summary))
    return 0


# -- clear --------------------------------------------------------------------------------------


def _by_namespace(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Entries and bytes per namespace, largest first."""
    by_ns: dict[str, list[int]] = {}
    for row in rows:
        counts = by_ns.setdefault(str(row["namespace"]), [0, 0])
        counts[0] += 1
        counts[1] += int(row["size"])
    order = sorted(by_ns.items(), key=lambda item: (-item[1][1], item[0]))
    return [{"namespace": ns, "entries": n, "bytes": b} for ns, (n, b) in order]


def _removed_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [
        f"  {_printable(g['namespace']) or '(none)'}: "
        f"{_plural(g['entries'], 'entry', 'entries')}, {format_bytes(g['bytes'])}"
        for g in _by_namespace(rows)
    ]


def _cmd_clear(args: argparse.Namespace) -> int:
    folder = _cache_folder(_path_arg(args))
    dry = bool(args.dry_run)
    strays = 0
    with _open_tier(folder) as tier:
        rows = tier.entries()
        if args.expired:
            now = time.time()
            gone = [r for r in rows if r["expires"] is not None and r["expires"] < now]
            removed = len(gone) if dry else tier.drop_expired(now)
            what = "expired {entries}"
            scope = "expired"
        elif args.namespace is not None:
            ns = args.namespace.rstrip("/") or args.namespace
            gone = [r for r in rows if r["namespace"] == ns]
            if not gone:
                known = sorted({str(r["namespace"]) for r in rows})
                listing = "; ".join(map(_printable, known)) if known else "the cache is empty"
                raise CliError(
                    f"no entries of namespace {ns!r} in {folder}; namespaces present: {listing}",
                    EXIT_FAILURE,
                )
            prefix = ns + "/"
            shared = any(r["namespace"] != ns and str(r["key"]).startswith(prefix) for r in rows)
            if dry:
                removed = len(gone)
            elif shared:
                # another namespace's keys start with this prefix (a dataset nested under
                # this path): delete this namespace's keys one by one, not by prefix
                for row in gone:
                    tier.delete(str(row["key"]))
                removed = len(gone)
            else:
                removed = tier.delete_prefix(prefix)
            what = "{entries} of namespace " + _printable(ns)
            scope = "namespace"
        else:
            gone = rows
            removed = len(rows) if dry else tier.delete_prefix("")
            what = "{entries}"
            scope = "all"
            # payload files without an index row (a crash, tampering) and stale temp files
            leftovers = tier.verify(repair=not dry)
            strays = leftovers["orphan_files"] + leftovers["corrupt"]
    total = sum(int(r["size"]) for r in gone)
    if args.json:
        report = {
            "path": str(folder),
            "dry_run": dry,
            "scope": scope,
            "namespace": args.namespace.rstrip("/") or args.namespace
            if scope == "namespace"
            else None,
            "entries": removed,
            "bytes": total,
            "stray_files": strays,
            "namespaces": _by_namespace(gone),
        }
        _emit(json.dumps(report, indent=2))
        return 0
    what = what.replace("{entries}", "entry" if removed == 1 else "entries")
    extra = f" and {_plural(strays, 'stray payload file')}" if strays else ""
    verb = "Would remove" if dry else "Removed"
    _emit(f"{verb} {removed} {what} ({format_bytes(total)}){extra} from {folder}")
    for line in _removed_lines(gone):
        _emit(line)
    if dry:
        _emit("Dry run: nothing was removed.")
    return 0


# -- verify -------------------------------------------------------------------------------------


def _damage(counts: Mapping[str, int]) -> int:
    return sum(counts.get(k, 0) for k in _DAMAGE)


def _format_counts(counts: Mapping[str, int]) -> list[str]:
    keys = [k for k in _VERIFY_LABELS if k in counts]
    keys += [k for k in counts if k not in _VERIFY_LABELS]
    width = max(len(k) for k in keys)
    nw = max(len(str(counts[k])) for k in keys)
    return [f"  {k:<{width}}  {counts[k]:>{nw}}  {_VERIFY_LABELS.get(k, '')}" for k in keys]


def _reset_index(folder: pathlib.Path) -> None:
    """Remove a damaged index (and its WAL files) so that a new one is created."""
    for name in _INDEX_FILES:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()


def _rebuilt_text(rebuilt: Mapping[str, int]) -> str:
    if not rebuilt:
        return "a new, empty index was created"
    extra = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in rebuilt.items() if k != "indexed")
    text = f"rebuilt from the payload files' headers: {rebuilt.get('indexed', 0)} entries"
    return f"{text} ({extra})" if extra else text


def _cmd_verify(args: argparse.Namespace) -> int:
    args.path = _path_arg(args)
    folder = _folder(args.path)
    problem = _index_problem(folder)
    index_state = "ok"
    if problem is not None:
        state, detail = problem
        if state == "inaccessible":
            raise CliError(f"{args.path}: {detail}", EXIT_FAILURE)
        recoverable = state in ("missing", "damaged") and _has_payload_dirs(folder)
        if not recoverable:
            raise CliError(
                f"{args.path}: is not an xarray-zcache disk cache folder ({detail}); "
                "nothing was changed"
            )
        if not args.repair:  # opening the tier would rebuild the index: report only
            if args.json:
                report = {"path": str(folder), "index": f"{state}: {detail}", "damage": 1}
                report |= {"repaired": False, "consistent": False}
                _emit(json.dumps(report, indent=2))
            else:
                _emit(f"Disk cache {folder}: the index is {state}: {detail}")
                _emit(f"Damage found. Run 'zcache verify {args.path} --repair' to rebuild it.")
            return EXIT_FAILURE
        index_state = f"{state}: {detail}"
    rebuilt: dict[str, int] = {}
    with _open_tier(folder, recover=problem is not None) as tier:
        if problem is not None:
            rebuilt = dict(getattr(tier, "last_rebuild", None) or {})
        found = tier.verify(repair=args.repair)
        after = tier.verify(repair=False) if args.repair else None
    damage = _damage(found) + (0 if problem is None else 1)
    consistent = _damage(after if after is not None else found) == 0
    if args.json:
        report = {
            "path": str(folder),
            "index": index_state,
            "rebuilt": rebuilt if problem is not None else None,
            "found": found,
            "damage": damage,
            "repaired": bool(args.repair),
            "after": after,
            "consistent": consistent,
        }
        _emit(json.dumps(report, indent=2))
    else:
        files = sum(v for k, v in found.items() if k not in ("missing_files", "index_damaged"))
        _emit(f"Disk cache {folder}: checked {_plural(files, 'file')}")
        if problem is not None:
            _emit(f"  index.db was {index_state}; {_rebuilt_text(rebuilt)}")
        for line in _format_counts(found):
            _emit(line)
        if not damage:
            _emit("Consistent: no damage found.")
        elif args.repair and after is not None:
            if consistent:
                _emit(
                    f"Repaired {_plural(damage, 'problem')}; now consistent "
                    f"({after.get('ok', 0)} entries ok)."
                )
            else:
                _emit(f"Repair incomplete: {_plural(_damage(after), 'problem')} remain:")
                for line in _format_counts(after):
                    _emit(line)
        else:
            _emit(
                f"Damage found: {_plural(damage, 'problem')}. "
                f"Run 'zcache verify {args.path} --repair' to fix it."
            )
    return 0 if consistent else EXIT_FAILURE


# -- warm ---------------------------------------------------------------------------------------


def _plan(queue: int, max_block: int, threads: int) -> tuple[int, int]:
    """Reader threads and flush budget of ``warm`` that keep pending disk writes in the queue.

    At a flush, the pending writes are at most the budget plus one block per reader
    thread; a stored chunk may be a little larger than its decoded block (incompressible
    data), hence the slack. Returns ``(threads, budget)``.
    """
    slack = max(1, max_block + max_block // 4 + 4096)
    n = max(1, min(threads, (queue // 2) // slack))
    return n, max(1, (queue - n * slack) // 2)


class _Throttle:
    """Back-pressure for ``warm``: wait for the background disk writes every ``budget`` bytes.

    `HybridCache` drops a disk write (keeping the value in memory only) when its queue
    of pending writes (``zcache.write-queue-size``) is full, and reading a dataset flat
    out from a fast store fills it. Every block read adds its size here; past the budget,
    the reading thread waits for the queue to drain (the other readers wait on the lock
    meanwhile). See `_plan`.
    """

    def __init__(self, cache: HybridCache, budget: int) -> None:
        self._cache = cache
        self._budget = max(1, budget)
        self._since = 0
        self._lock = threading.Lock()

    def block(self, block: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The map_blocks function: account the block, return its size as a 1-element block."""
        import numpy as np

        nbytes = int(block.nbytes)
        with self._lock:
            self._since += nbytes
            if self._since >= self._budget:
                self._cache.flush()
                self._since = 0
        return np.full((1,) * block.ndim, nbytes, dtype=np.int64)


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


def _warm_folder(raw: str) -> pathlib.Path:
    """Check the ``--cache`` folder of ``warm``: a cache, an empty folder, or nothing yet."""
    path = pathlib.Path(raw).expanduser()
    if not path.exists():
        if path.is_symlink():
            raise CliError(f"--cache {raw}: is a dangling symbolic link")
        return path.absolute()
    if not path.is_dir():
        raise CliError(
            f"--cache {raw}: is {'a regular file' if path.is_file() else 'not a folder'}; "
            "expected a disk cache folder (created if missing)"
        )
    folder = path.resolve()
    if not any(folder.iterdir()):
        return folder
    problem = _index_problem(folder)
    if problem is None:
        return folder
    state, detail = problem
    if state == "inaccessible":
        raise CliError(f"--cache {raw}: {detail}", EXIT_FAILURE)
    if state == "damaged" and _has_payload_dirs(folder):
        raise CliError(
            f"--cache {raw}: the disk cache index is damaged: {detail}; run "
            f"'zcache verify {raw} --repair' first",
            EXIT_FAILURE,
        )
    raise CliError(
        f"--cache {raw}: is a non-empty folder that is not an xarray-zcache disk cache "
        f"({detail}); refusing to use it: choose a new or empty folder"
    )


def _base_config() -> CacheConfig:
    from xarray_zcache.config import CacheConfig

    try:
        return CacheConfig()
    except ValueError as exc:
        raise CliError(
            f"invalid xarray-zcache configuration (dask config zcache.*): {exc}"
        ) from None


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


def _cmd_warm(args: argparse.Namespace) -> int:
    url = str(args.url)
    names = None
    if args.variables is not None:
        names = [v.strip() for v in args.variables.split(",") if v.strip()]
        if not names:
            raise CliError(f"--variables: no variable names in {args.variables!r}")
    storage_options = _nested(args.storage_option)
    base = _base_config()
    raw_path = args.cache if args.cache is not None else base.disk_path
    if raw_path is None:
        raise CliError(
            "no disk cache folder: the configuration disables the disk tier "
            "(zcache.disk.enabled: false); pass --cache PATH"
        )
    try:
        # no read-ahead: it would fetch past the disk write back-pressure of _Throttle;
        # the reader threads give the concurrency instead
        from xarray_zcache.cache.disk.folder import recorded_disk_size  # the folder's own record

        size = args.cache_size
        if size is None:  # the size the folder was last opened with, else zcache.disk.size
            size = recorded_disk_size(os.path.expanduser(raw_path))
        config = base.with_disk_cache(raw_path, size).with_prefetch(0)
        if args.memory_size is not None:
            config = config.with_memory_size(args.memory_size)
    except ValueError as exc:
        message = str(exc)
        if args.cache is not None and message.startswith("disk_path: "):
            message = f"--cache {args.cache}: {message.removeprefix('disk_path: ')}"
        raise CliError(message) from None
    if config.disk_size <= 0:
        raise CliError("the disk tier size is 0 (zcache.disk.size); pass --cache-size SIZE")
    _check_source(url)
    folder = _warm_folder(str(raw_path))

    from xarray_zcache._quiet import silence_unclosed_sessions
    from xarray_zcache.backend import open_store

    silence_unclosed_sessions()
    try:
        store = open_store(url, storage_options=storage_options or None, cache_config=config)
    except (ValueError, TypeError) as exc:
        raise CliError(f"URL {url!r}: {exc}") from None
    return _warm(args, url, store, config, folder, names)


def _warm(
    args: argparse.Namespace,
    url: str,
    store: Any,
    config: CacheConfig,
    folder: pathlib.Path,
    names: Sequence[str] | None,
) -> int:
    import dask.array as da
    import numpy as np
    import xarray as xr
    from dask.base import compute, tokenize
    from dask.diagnostics.progress import ProgressBar

    from xarray_zcache.registry import get_cache, registered_caches

    created_folder = not folder.exists()
    preexisting = any(
        c.settings.name == config.name and c.settings.disk_path == config.disk_path
        for c in registered_caches()
    )
    try:
        cache = get_cache(config)
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        raise CliError(f"--cache {folder}: cannot open the disk cache: {exc}") from None
    if created_folder:
        _note(args, f"Created disk cache folder {folder}")
    try:
        before = cache.stats()
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # zarr: "consolidated metadata is not part of the Zarr format 3 spec"
                warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
                ds = xr.open_dataset(
                    store,
                    engine="zcache",
                    chunks={},
                    group=args.group,
                    mask_and_scale=False,
                    decode_times=False,
                    decode_timedelta=False,
                    concat_characters=False,
                )
        except Exception as exc:
            raise CliError(
                f"cannot open {url}: {type(exc).__name__}: {exc}", EXIT_FAILURE
            ) from None
        with ds:
            selected = _select(ds, names, url)
            arrays = [
                (str(name), var.data)
                for name, var in selected.variables.items()
                if isinstance(var.data, da.Array)
            ]
            data_vars = [str(n) for n in selected.data_vars]
            coords = [str(n) for n in selected.coords]
            max_block = max(
                (
                    int(np.prod([max(c, default=0) for c in a.chunks])) * a.dtype.itemsize
                    for _n, a in arrays
                ),
                default=0,
            )
            queue = config.write_queue_size
            threads, budget = _plan(queue, max_block, args.threads)
            if max_block > queue:
                _warn(
                    f"chunks of up to {format_bytes(max_block)} are larger than "
                    f"zcache.write-queue-size ({format_bytes(queue)}): such chunks cannot be "
                    "written to the disk tier; raise it, e.g. DASK_ZCACHE__WRITE_QUEUE_SIZE="
                    f"{format_bytes(4 * max_block).replace(' ', '')}"
                )
            throttle = _Throttle(cache, budget)
            parts: list[Any] = []
            arr: Any
            for i, (_name, arr) in enumerate(arrays):
                if arr.ndim == 0:
                    arr = arr.reshape((1,))
                sizes = arr.map_blocks(
                    throttle.block,
                    dtype=np.int64,
                    chunks=tuple((1,) * len(c) for c in arr.chunks),
                    name=f"zcache-warm-{i}-{tokenize(arr)}",
                    meta=np.empty((0,) * arr.ndim, dtype=np.int64),
                )
                parts.append(sizes.sum())
            n_blocks = sum(int(np.prod(a.numblocks)) for _n, a in arrays)
            _note(
                args,
                f"Warming {url}: {_plural(len(data_vars), 'variable')}"
                f"{' (' + ', '.join(data_vars) + ')' if data_vars else ''}, "
                f"{_plural(len(coords), 'coordinate')}, {_plural(n_blocks, 'chunk')} to read "
                f"({_plural(threads, 'thread')})",
            )
            bar: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if not args.quiet:
                bar = ProgressBar(out=sys.stderr)  # type: ignore[no-untyped-call]
            try:
                with bar:
                    decoded = compute(  # type: ignore[no-untyped-call]
                        *parts, scheduler="threads", num_workers=threads
                    )
            except Exception as exc:
                raise CliError(
                    f"reading {url} failed: {type(exc).__name__}: {exc}", EXIT_FAILURE
                ) from None
        cache.flush()
        elapsed = time.perf_counter() - t0
        after = cache.stats()
    finally:
        if not preexisting:
            cache.close()
    delta = after - before
    return _warm_summary(
        url, store, folder, delta, after, elapsed, int(sum(decoded)), as_json=args.json
    )


def _warm_summary(
    url: str,
    store: Any,
    folder: pathlib.Path,
    delta: Any,
    after: Any,
    elapsed: float,
    decoded: int,
    *,
    as_json: bool = False,
) -> int:
    queue = int(store.config.write_queue_size)
    chunk_hits = delta.total_hits("chunk")
    chunk_misses = delta.total_misses("chunk")
    reads = chunk_hits + chunk_misses
    fetched = delta.miss_bytes["chunk"] + delta.miss_bytes["metadata"]
    served = sum(delta.hit_bytes[t][k] for t in delta.hit_bytes for k in delta.hit_bytes[t])
    meta = delta.total_hits("metadata") + delta.total_misses("metadata") + delta.negative_hits
    rate = f"{100 * delta.hit_rate('chunk'):.1f}%" if reads else "-"
    speed = f", {format_bytes(int(fetched / elapsed))}/s" if elapsed > 0 and fetched else ""
    rows = [
        ("namespace", _printable(str(store.namespace))),
        ("disk cache", str(folder)),
        (
            "chunk reads",
            f"{reads}: {chunk_misses} sent to the source, {chunk_hits} served by the cache "
            f"(hit rate {rate})",
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
    if as_json:
        report = {
            "url": url,
            "namespace": str(store.namespace),
            "path": str(folder),
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
        _emit(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k, _ in rows)
        _emit("Done:")
        for key, value in rows:
            _emit(f"  {key:<{width}}  {value}")
    if delta.evictions["disk"]:
        _warn(
            f"{delta.evictions['disk']} entries were evicted from the disk tier to make room: "
            "the data read is larger than --cache-size, so part of it is not cached"
        )
    if delta.not_admitted:
        _warn(
            f"{_plural(delta.not_admitted, 'object')} larger than zcache.max-object-size "
            "were not cached"
        )
    if delta.corruptions:
        _warn(f"{delta.corruptions} damaged payload files were found, removed and re-fetched")
    if delta.disk_write_failures:
        _error(
            f"{delta.disk_write_failures} entries could not be written to the disk tier: an "
            "object larger than zcache.write-queue-size (the background write queue, "
            f"{format_bytes(queue)}) or a full disk (see the warnings above, if any); "
            "run the command again, with a larger DASK_ZCACHE__WRITE_QUEUE_SIZE"
        )
        return EXIT_FAILURE
    return 0


# -- main ---------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _library_warnings() -> Iterator[None]:
    """Show the library's warnings (damaged files, disk full...) on stderr while running."""
    lib = logging.getLogger("xarray_zcache")
    if lib.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    lib.addHandler(handler)
    try:
        yield
    finally:
        lib.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``zcache`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 on success (also when the reader of the output closed
        the pipe early), 1 on a failure, 2 on bad usage, 130 if interrupted.

    Examples
    --------
    >>> main(["stats", "/no/such/folder"])  # doctest: +SKIP
    zcache: error: /no/such/folder: no such folder; ...
    2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    try:
        with _library_warnings():
            status: int = args.func(args)
            return status
    except CliError as exc:
        _error(str(exc))
        return exc.status
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `zcache stats --json | head -3`: the reader has what it wanted, which is no
        # failure (status 0, also under `set -o pipefail`); stop quietly
        with contextlib.suppress(OSError, ValueError):
            # the interpreter flushes stdout at exit: point it at /dev/null first
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover - python -m xarray_zcache.cli
    sys.exit(main())
