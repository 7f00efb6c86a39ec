"""Indexes as older versions of the package wrote them, for the migration tests.

The package itself no longer creates the rowid ``entries`` table of schemas 2 and 3: a new
index is schema 4 (``entries`` ``WITHOUT ROWID``) and a migration rebuilds the table. Its
definition as schema 2 wrote it is kept here, frozen.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence

from xarray_zcache.cache.disk import schema

#: ``entries`` as schema 2 created it (schema 3 added ``segment`` and ``offset`` by ``ALTER``)
ENTRIES_2 = """
CREATE TABLE entries(
    key TEXT PRIMARY KEY,
    namespace TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_access REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    expires REAL NULL,
    checksum INTEGER NOT NULL,
    token INTEGER NOT NULL DEFAULT 0
);
"""


def create_schema_2(conn: sqlite3.Connection) -> None:
    """Create the tables of a schema-2 index in ``conn`` (``user_version`` is the caller's)."""
    for statement in schema.split_sql(ENTRIES_2) + schema.split_sql(schema.SCHEMA):
        conn.execute(statement)


def create_schema_3(conn: sqlite3.Connection) -> None:
    """Create the tables of a schema-3 index in ``conn``, as schema 3 made them: schema 2,
    then :data:`~xarray_zcache.cache.disk.schema.MIGRATE_3`."""
    create_schema_2(conn)
    for statement in schema.split_sql(schema.MIGRATE_3):
        conn.execute(statement)


def remove_index(folder: str | os.PathLike[str]) -> None:
    """Remove the index of the (closed) cache folder, with SQLite's side files."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{os.fspath(folder)}/index.db{suffix}")


def write_schema_2(
    folder: str | os.PathLike[str],
    entries: Sequence[Sequence[object]],
    tombstones: Sequence[Sequence[object]],
) -> None:
    """Replace the index of the (closed) cache folder by a schema-2 one, as version 2 wrote
    it, holding ``entries`` (rows of its ten columns) and ``tombstones``."""
    remove_index(folder)
    with contextlib.closing(sqlite3.connect(f"{os.fspath(folder)}/index.db")) as conn:
        create_schema_2(conn)
        conn.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?)", entries)
        conn.executemany("INSERT INTO tombstones VALUES (?,?)", tombstones)
        conn.execute("PRAGMA user_version=2")
        conn.commit()


def become_newer(
    db_path: str | os.PathLike[str], oldest_writer: int | None = None, *extra: str
) -> None:
    """Make the index at ``db_path`` look like one a newer version migrated: ``user_version``
    one higher, ``extra`` statements run (its additions), and its word on which versions may
    go on writing to it (``schema.COMPAT_TABLE``): from ``oldest_writer`` on, or, with None,
    none but itself."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"DELETE FROM {schema.COMPAT_TABLE}")
        writer = schema.SCHEMA_VERSION + 1 if oldest_writer is None else oldest_writer
        conn.execute(f"INSERT INTO {schema.COMPAT_TABLE} VALUES ({writer})")
        for statement in extra:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION + 1}")
        conn.execute("COMMIT")


def become_ours_again(db_path: str | os.PathLike[str]) -> None:
    """Undo :func:`become_newer` (its ``extra`` aside)."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"UPDATE {schema.COMPAT_TABLE} SET oldest_writer = {schema.OLDEST_WRITER}")
        conn.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION}")
        conn.execute("COMMIT")
