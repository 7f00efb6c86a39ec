"""Exit statuses and the one error type of the ``zcache`` command."""

from __future__ import annotations

from typing import Final

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "PROG", "CliError"]

PROG: Final = "zcache"

#: Exit status of a failed operation (damage found, a read failed).
EXIT_FAILURE: Final = 1
#: Exit status of bad usage (bad path, URL, size or option), as argparse uses.
EXIT_USAGE: Final = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED: Final = 130


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
