"""Indexes as older versions of the package wrote them, for the migration tests.

The package itself no longer creates the rowid ``entries`` table of schemas 2 and 3: a new
index is schema 4 (``entries`` ``WITHOUT ROWID``) and a migration rebuilds the table. Its
definition as schema 2 wrote it is kept here, frozen.
"""

from __future__ import annotations

import sqlite3

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
