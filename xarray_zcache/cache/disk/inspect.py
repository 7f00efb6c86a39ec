"""What a disk tier holds: totals, keys, rows, and per-namespace figures (for tools)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from xarray_zcache.cache.disk import rows
from xarray_zcache.cache.disk.schema import ENTRY_COLUMNS

if TYPE_CHECKING:
    from xarray_zcache.cache.disk.index import Index

__all__ = ["TierInspection"]


class TierInspection:
    """Read-only questions to the index; `DiskTier` inherits them."""

    _index: Index

    def flush(self) -> None:
        raise NotImplementedError

    def used_bytes(self) -> int:
        """Total payload bytes in the index (all processes), i.e. ``SUM(size)``."""
        return self._index.read("reading the totals", rows.used, 0)

    def __len__(self) -> int:
        """Number of entries in the index (expired ones included until dropped)."""
        row = self._index.read(
            "reading the totals",
            lambda conn: conn.execute("SELECT count FROM totals WHERE id = 0").fetchone(),
            (0,),
        )
        return int(row[0])

    def keys(self) -> list[str]:
        """All keys in the index, sorted."""
        return self._index.read(
            "listing keys",
            lambda conn: [
                k for (k,) in conn.execute("SELECT key FROM entries ORDER BY key").fetchall()
            ],
            [],
        )

    def keys_under(self, prefix: str) -> list[str]:
        """Keys in the index that start with ``prefix``."""
        return self._index.read(
            "listing keys",
            lambda conn: [
                k
                for (k,) in conn.execute(
                    "SELECT key FROM entries WHERE key >= ? AND key < ?",
                    (prefix, prefix + "\U0010ffff"),
                ).fetchall()
            ],
            [],
        )

    def entries(self) -> list[dict[str, Any]]:
        """Index rows as dicts (pending access statistics are flushed first).

        Keys: ``key``, ``namespace``, ``kind``, ``size``, ``created``, ``last_access``,
        ``hits``, ``expires`` (None: never), ``checksum``.
        """
        self.flush()
        query = f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries ORDER BY key"
        return self._index.read(
            "listing entries",
            lambda conn: [
                dict(zip(ENTRY_COLUMNS, row, strict=True)) for row in conn.execute(query).fetchall()
            ],
            [],
        )

    def summary(self) -> list[dict[str, Any]]:
        """Entries and payload bytes per ``(namespace, kind)``, computed by one SQL
        ``GROUP BY``.

        Returns
        -------
        list of dict
            Keys ``namespace``, ``kind``, ``entries``, ``bytes``; sorted by namespace and kind.
            Empty while the index is unavailable.
        """
        return self._index.read("summarizing entries", rows.summary, [])

    def usage(self, now: float | None = None) -> list[dict[str, Any]]:
        """:meth:`summary` with hit counts, expired entries and times, by one SQL ``GROUP BY``.

        Pending access statistics are flushed first.

        Parameters
        ----------
        now : float, optional
            Entries whose ``expires`` is before ``now`` (default ``time.time()``) are expired.

        Returns
        -------
        list of dict
            Per ``(namespace, kind)``, sorted: ``namespace``, ``kind``, ``entries``, ``bytes``,
            ``hits``, ``expired``, ``expired_bytes``, ``oldest_created``, ``newest_created``,
            ``last_access``. Empty while the index is unavailable.
        """
        t = time.time() if now is None else now
        self.flush()
        late = "expires IS NOT NULL AND expires < :now"
        query = (
            "SELECT namespace, kind, COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(hits), 0), "
            f"COALESCE(SUM({late}), 0), COALESCE(SUM(CASE WHEN {late} THEN size END), 0), "
            "MIN(created), MAX(created), MAX(last_access) "
            "FROM entries GROUP BY namespace, kind ORDER BY namespace, kind"
        )
        names = ("namespace", "kind", "entries", "bytes", "hits", "expired", "expired_bytes")
        times = ("oldest_created", "newest_created", "last_access")
        return self._index.read(
            "summarizing entries",
            lambda conn: [
                dict(zip(names + times, row, strict=True))
                for row in conn.execute(query, {"now": t}).fetchall()
            ],
            [],
        )

    def top_entries(
        self, n: int, by: Literal["hits", "oldest", "newest"] = "hits"
    ) -> list[dict[str, Any]]:
        """The first ``n`` index rows (as in :meth:`entries`) in one order, by SQL.

        ``by="hits"``: entries hit at least once, most hit first (then most recently used);
        ``"oldest"``/``"newest"``: by creation time. Ties are broken by key.
        """
        orders = {
            "hits": "WHERE hits > 0 ORDER BY hits DESC, last_access DESC, key",
            "oldest": "ORDER BY created, key",
            "newest": "ORDER BY created DESC, key",
        }
        if by not in orders:
            raise ValueError(f"by must be one of {', '.join(map(repr, orders))}, got {by!r}")
        self.flush()
        query = f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries {orders[by]} LIMIT ?"
        return self._index.read(
            "listing entries",
            lambda conn: [
                dict(zip(ENTRY_COLUMNS, row, strict=True))
                for row in conn.execute(query, (max(0, int(n)),)).fetchall()
            ],
            [],
        )
