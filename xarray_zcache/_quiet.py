"""Keep the command-line tools' output readable."""

from __future__ import annotations

import logging

__all__ = ["silence_unclosed_sessions"]


class _UnclosedSessionFilter(logging.Filter):
    """Drop aiohttp's "Unclosed client session/connector" reports.

    s3fs registers no finalizer for the asynchronous filesystems zarr's ``FsspecStore``
    builds, so their aiohttp sessions are reported as unclosed when collected, typically
    at interpreter exit: harmless, and noisy.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Unclosed client session", "Unclosed connector"))


def silence_unclosed_sessions() -> None:
    """Install the filter on the ``asyncio`` logger (idempotent)."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnclosedSessionFilter) for f in log.filters):
        log.addFilter(_UnclosedSessionFilter())
