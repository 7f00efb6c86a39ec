"""The ``zcache`` command: look into, clear, fill and check a disk cache folder.

Subcommands (``zcache SUBCOMMAND --help`` for each), one module each, all over the library's
own API (`DiskTier` for a folder, `CachedStore`/`HybridCache` for ``warm``):

``zcache stats [PATH] [--json] [--top N]`` (:mod:`.stats`)
    What a disk cache folder holds: entries, bytes, per dataset namespace (with the
    chunk/metadata split and hit counts), oldest and newest entries, most hit entries,
    expired entries. Summed by SQL in the index, never loading every row.
``zcache clear [PATH] [--expired | --namespace NS] [--dry-run] [--json]`` (:mod:`.clear`)
    Remove every entry, only the expired ones, or only those of one namespace
    (``--dry-run``: only say what would be removed).
``zcache warm URL [--variables V1,V2] [--cache PATH] [--json] ...`` (:mod:`.warm`)
    Read a dataset through the cache so that every chunk of the selected variables ends
    up in the disk tier, waiting for the disk writes instead of letting any be dropped.
``zcache verify [PATH] [--repair] [--json]`` (:mod:`.verify`)
    Check every payload file against its header, checksum and index row.
``zcache validate URL [--cache PATH] [--json] ...`` (:mod:`.validate`)
    Check every cached entry of a dataset against the source's versions now (one listing
    per array), dropping what changed; with a progress bar.

PATH defaults to the configured disk cache folder (dask config ``zcache.disk.path``, by
default ``$XDG_CACHE_HOME/xarray-zcache``). Every subcommand prints JSON with ``--json``
(:mod:`.output`). A closed output pipe (``zcache stats --json | head``) ends the command
quietly with status 0.

Safety rules kept by every subcommand: a PATH that does not exist, is not a folder, or is a
folder without an xarray-zcache index (``index.db``) is refused with an error and nothing is
created or changed there (:meth:`DiskTier.probe`, :meth:`DiskTier.open_existing`); nothing
outside the cache folder is ever deleted, and inside it only cache files are. ``warm``
creates its cache folder only when it does not exist yet (or is empty).

Exit status: 0 on success, 1 when the work failed (``verify`` found damage it did not
repair, a read failed during ``warm``), 2 on bad usage (bad path, URL, size or option).
"""

from __future__ import annotations

from collections.abc import Sequence

from xarray_zcache.cli.errors import EXIT_INTERRUPTED, CliError
from xarray_zcache.cli.output import error, library_warnings, quiet_stdout
from xarray_zcache.cli.parser import build_parser

__all__ = ["CliError", "build_parser", "main"]


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
        with library_warnings():
            status: int = args.func(args)
            return status
    except CliError as exc:
        error(str(exc))
        return exc.status
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `zcache stats --json | head -3`: the reader has what it wanted, which is no
        # failure (status 0, also under `set -o pipefail`); stop quietly
        quiet_stdout()
        return 0
