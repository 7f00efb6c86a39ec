"""Warnings of one disk tier: each kind of problem is logged once at warning level."""

from __future__ import annotations

import logging
import sqlite3

logger = logging.getLogger("xarray_zcache.disk")


class Warner:
    """Logs a warning the first time a kind of problem (``tag``) occurs, then at debug level."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._warned: set[object] = set()

    def once(self, tag: object, message: str, *args: object) -> None:
        if tag in self._warned:
            logger.debug(message, *args)
            return
        self._warned.add(tag)
        logger.warning(message, *args)

    def error(self, exc: BaseException, action: str) -> None:
        """An operation failed with ``exc``; one warning per errno / SQLite code."""
        if isinstance(exc, OSError):
            tag: object = ("oserror", exc.errno)
        elif isinstance(exc, sqlite3.Error):
            tag = ("sqlite", getattr(exc, "sqlite_errorcode", None))
        else:
            tag = ("other", type(exc).__name__)
        self.once(
            tag,
            "disk cache %s: %s failed: %s (further such errors logged at debug level)",
            self.root,
            action,
            exc,
        )
