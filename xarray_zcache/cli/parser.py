"""The argument parser of the ``zcache`` command and its help texts (also shown in the docs)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import NoReturn

from dask.utils import format_bytes

from xarray_zcache.cli import options
from xarray_zcache.cli.clear import run as run_clear
from xarray_zcache.cli.errors import EXIT_USAGE, PROG
from xarray_zcache.cli.stats import run as run_stats
from xarray_zcache.cli.validate import run as run_validate
from xarray_zcache.cli.verify import run as run_verify
from xarray_zcache.cli.warm import run as run_warm

__all__ = ["build_parser"]


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
        type=options.count,
        default=10,
        metavar="N",
        help="how many of the most hit entries to list (default: 10)",
    )
    stats.set_defaults(func=run_stats)

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
    clear.set_defaults(func=run_clear)

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
        type=options.size,
        metavar="SIZE",
        help="disk tier capacity, e.g. 200GB (default: the size recorded in the folder, "
        f"else {_default('disk.size')})",
    )
    warm.add_argument(
        "--memory-size",
        type=options.size,
        metavar="SIZE",
        help=f"memory tier capacity, e.g. 1GiB (default: {_default('memory-size')})",
    )
    warm.add_argument(
        "--storage-option",
        action="append",
        type=options.storage_option,
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
        type=options.threads,
        default=8,
        metavar="N",
        help="chunks read at once (default: 8; fewer if chunks are large)",
    )
    warm.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    warm.add_argument(
        "--json", action="store_true", help="print the summary as JSON (progress on stderr)"
    )
    warm.set_defaults(func=run_warm)

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
    verify.set_defaults(func=run_verify)

    validate = sub.add_parser(
        "validate",
        help="check a dataset's cached entries against the source now (drop what changed)",
        description=(
            "Validate every cached entry of the dataset at URL against the source now: one\n"
            "listing per array (one request per 1,000 objects on S3). Objects changed, deleted\n"
            "or created at the source are dropped from the cache; the rest are marked\n"
            "validated for every process using the folder. Progress bar on stderr."
        ),
        formatter_class=_Formatter,
    )
    validate.add_argument("url", metavar="URL", help="the dataset: s3://bucket/path.zarr, ...")
    validate.add_argument(
        "--cache",
        metavar="PATH",
        help=f"the disk cache folder (default: {_default('disk.path')})",
    )
    validate.add_argument(
        "--storage-option",
        action="append",
        type=options.storage_option,
        default=[],
        metavar="KEY=VALUE",
        help="fsspec/s3fs option for URL (repeatable), e.g. anon=true",
    )
    validate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    validate.add_argument("--json", action="store_true", help=json_help)
    validate.set_defaults(func=run_validate)
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
