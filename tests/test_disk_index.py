"""The disk tier's index at scale: schema 4 (``entries`` ``WITHOUT ROWID``), its in-place
migration from schemas 3 and 2, and exact eviction counts."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest
from entry_location import locate
from old_index import become_newer, create_schema_3, remove_index, write_schema_2

from xarray_zcache.cache.disk import DiskTier, reads, rows, schema

THRESHOLD = 65536


def _tier(path: pathlib.Path, capacity: int = 1 << 30, *, location_map: bool = True) -> DiskTier:
    return DiskTier(path, capacity, segment_threshold=THRESHOLD, location_map=location_map)


def _dump(path: pathlib.Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table that holds state (``entries`` in key order)."""
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        return {
            "entries": conn.execute(
                "SELECT key, namespace, kind, size, created, last_access, hits, expires, "
                "checksum, token, segment, offset FROM entries ORDER BY key"
            ).fetchall(),
            "tombstones": conn.execute("SELECT * FROM tombstones ORDER BY key").fetchall(),
            "prefix_tombstones": conn.execute("SELECT * FROM prefix_tombstones").fetchall(),
            "totals": conn.execute("SELECT * FROM totals").fetchall(),
            "segments": conn.execute("SELECT * FROM segments ORDER BY name").fetchall(),
        }


def _entries_sql(path: pathlib.Path) -> str:
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        return str(
            conn.execute("SELECT sql FROM sqlite_master WHERE name = 'entries'").fetchone()[0]
        )


def _user_version(path: pathlib.Path) -> int:
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _as_schema_3(path: pathlib.Path, state: dict[str, list[tuple[object, ...]]]) -> None:
    """Replace the index of the (closed) folder by a schema-3 one holding ``state``, as
    version 3 of the package wrote it (a rowid ``entries`` table, columns added by ALTER)."""
    remove_index(path)
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        create_schema_3(conn)
        # the triggers would count the rows twice: totals and live bytes are copied as they were
        conn.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", state["entries"])
        conn.executemany("INSERT INTO tombstones VALUES (?,?)", state["tombstones"])
        conn.executemany("INSERT INTO prefix_tombstones VALUES (?,?)", state["prefix_tombstones"])
        conn.execute("DELETE FROM totals")
        conn.executemany("INSERT INTO totals VALUES (?,?,?,?)", state["totals"])
        conn.execute("DELETE FROM segments")
        conn.executemany("INSERT INTO segments VALUES (?,?)", state["segments"])
        conn.execute("PRAGMA user_version=3")
        conn.commit()
    assert "WITHOUT ROWID" not in _entries_sql(path)


@pytest.fixture
def filled(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, dict[str, bytes]]]:
    """A closed folder with records, payload files, tombstones and a prefix tombstone."""
    path = tmp_path / "c"
    values = {f"rec/{i}": os.urandom(100 + i) for i in range(40)}
    values.update({f"big/{i}": os.urandom(THRESHOLD + 1 + i) for i in range(3)})
    with _tier(path) as t:
        for k, v in values.items():
            assert t.put(k, v, namespace="ns")
        t.delete("rec/0")
        assert t.delete_prefix("rec/3") == 11  # rec/3, rec/30 .. rec/39
        assert t.get("rec/1") == values["rec/1"]  # a hit: last_access and hits move
    for k in ["rec/0", "rec/3", *(f"rec/3{i}" for i in range(10))]:
        values.pop(k)
    yield path, values


def test_a_new_index_is_schema_5_without_rowid(tmp_path: pathlib.Path) -> None:
    with _tier(tmp_path / "c") as t:
        assert t.put("k", b"v")
    assert _user_version(tmp_path / "c") == schema.SCHEMA_VERSION == 5
    assert "WITHOUT ROWID" in _entries_sql(tmp_path / "c")
    with contextlib.closing(sqlite3.connect(tmp_path / "c" / "index.db")) as conn:
        columns = conn.execute("PRAGMA table_info(entries)").fetchall()
        assert schema.schema_of(conn) == schema.expected_schema()
        with pytest.raises(sqlite3.OperationalError, match="no such column: rowid"):
            conn.execute("SELECT rowid FROM entries")  # a WITHOUT ROWID table has none
    # (cid, name, type, notnull, default, pk): the schema-4/5 columns, keyed by the key alone
    assert [c[1] for c in columns] == [c.strip() for c in schema._ALL_COLUMNS.split(",")]
    assert [c[1] for c in columns if c[5]] == ["key"]


def _check_migrated(
    path: pathlib.Path, values: dict[str, bytes], before: dict[str, object]
) -> None:
    with _tier(path) as t:  # opening migrates
        assert t.index_rebuilds == 0
    assert _user_version(path) == schema.SCHEMA_VERSION
    assert "WITHOUT ROWID" in _entries_sql(path)
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        assert schema.schema_of(conn) == schema.expected_schema()
    assert _dump(path) == before  # every row, tombstone, total and live count kept
    with _tier(path) as t:
        assert t.index_rebuilds == 0 and t.corruptions == 0
        assert len(t) == len(values)
        for k, v in values.items():
            assert t.get(k) == v
        # the tombstones still judge fills: fetches that started before the deletes are refused
        old = time.time_ns() - 10**12
        assert not t.put("rec/0", b"stale", fetch_started_ns=old)
        assert not t.put("rec/35", b"stale", fetch_started_ns=old)
        # and the triggers work on the new table: totals and live bytes follow the writes
        used = t.used_bytes()
        assert t.put("rec/1", b"now a record") and t.get("rec/1") == b"now a record"
        assert t.used_bytes() == used - len(values["rec/1"]) + len(b"now a record")
        assert locate(t, "rec/1").in_segment
        t.delete("rec/2")
        counts = t.verify()
        assert counts["ok"] == len(values) - 1, counts
        assert counts["corrupt"] == counts["missing_files"] == counts["mismatched"] == 0
        live = t._index.run(
            "live", lambda c: c.execute("SELECT COALESCE(SUM(live), 0) FROM segments").fetchone()
        )[0]
        expected = t._index.run(
            "records",
            lambda c: c.execute(
                "SELECT COALESCE(SUM(72 + length(CAST(key AS BLOB)) + "
                "length(CAST(namespace AS BLOB)) + size), 0) FROM entries "
                "WHERE segment IS NOT NULL"
            ).fetchone(),
        )[0]
        assert live == expected


def test_a_schema_3_folder_is_migrated_in_place(
    filled: tuple[pathlib.Path, dict[str, bytes]],
) -> None:
    path, values = filled
    before = _dump(path)
    assert any(r[10] is not None for r in before["entries"])  # records
    assert any(r[10] is None for r in before["entries"])  # payload files
    _as_schema_3(path, before)
    _check_migrated(path, values, before)


def test_a_schema_2_folder_is_migrated_to_schema_4(tmp_path: pathlib.Path) -> None:
    """Schema 2 knew no records: a folder of payload files alone."""
    path = tmp_path / "c"
    values = {f"file/{i}": os.urandom(200 + i) for i in range(10)}
    with DiskTier(path, 1 << 30, segment_threshold=-1) as t:
        for k, v in values.items():
            assert t.put(k, v, namespace="ns")
        t.delete("file/0")
    values.pop("file/0")
    state = _dump(path)
    write_schema_2(path, [r[:10] for r in state["entries"]], state["tombstones"])
    with DiskTier(path, 1 << 30, segment_threshold=-1) as t:
        assert t.index_rebuilds == 0
        assert {k: t.get(k) for k in values} == values
        assert not t.put("file/0", b"stale", fetch_started_ns=time.time_ns() - 10**12)
    assert _user_version(path) == schema.SCHEMA_VERSION
    assert "WITHOUT ROWID" in _entries_sql(path)

    def fixed(r: tuple[object, ...]) -> tuple[object, ...]:
        return r[:5] + r[7:]  # the hits above moved last_access and hits

    assert [fixed(r) for r in _dump(path)["entries"]] == [fixed(r) for r in state["entries"]]


def test_a_migration_that_fails_midway_leaves_schema_3_intact(
    filled: tuple[pathlib.Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transaction: a crash (here an exception) after the rows were copied and the old
    table dropped rolls everything back; the next open migrates."""
    path, values = filled
    before = _dump(path)
    _as_schema_3(path, before)
    real = schema.migrate_statements

    class Crash(BaseException):
        pass

    def crashing(version: int) -> Iterator[str]:
        statements = real(version)
        drop = next(i for i, s in enumerate(statements) if s.startswith("DROP TABLE"))
        yield from statements[: drop + 1]
        raise Crash

    monkeypatch.setattr(schema, "migrate_statements", crashing)
    with pytest.raises(Crash):
        _tier(path)
    assert _user_version(path) == 3
    assert "WITHOUT ROWID" not in _entries_sql(path)
    assert _dump(path) == before
    monkeypatch.setattr(schema, "migrate_statements", real)
    _check_migrated(path, values, before)


def test_a_newer_schema_is_refused(tmp_path: pathlib.Path) -> None:
    with _tier(tmp_path / "c") as t:
        assert t.put("k", b"v")
    become_newer(tmp_path / "c" / "index.db")
    with pytest.raises(RuntimeError, match="newer"):
        _tier(tmp_path / "c")


def _become_newer(path: pathlib.Path, oldest_writer: int | None, *extra: str) -> None:
    become_newer(path / "index.db", oldest_writer, *extra)


#: What a newer version might add: a log of changed keys, kept by triggers (they fire for the
#: writes of this version too, which is what lets it admit this version).
_CHANGE_LOG = (
    "CREATE TABLE deletes_6(seq INTEGER PRIMARY KEY, key TEXT NOT NULL)",
    "CREATE TRIGGER log_deletes_6 AFTER DELETE ON entries "
    "BEGIN INSERT INTO deletes_6(key) VALUES (OLD.key); END",
)


def test_a_newer_schema_that_admits_this_version_is_used_as_it_is(
    tmp_path: pathlib.Path,
) -> None:
    """A newer version's additive schema that says this one may still write to it: entries
    are served, stored and deleted as usual, the newer version's triggers see our writes,
    and the index stays of the newer schema (never migrated back, never rebuilt)."""
    path = tmp_path / "c"
    with _tier(path) as t:
        assert t.put("k/held", b"held" * 100)
        assert t.put("k/gone", b"gone" * 100)
    _become_newer(path, schema.SCHEMA_VERSION, *_CHANGE_LOG)
    for _ in range(2):  # and again after a reopen
        with _tier(path) as t:
            assert t.get("k/held") == b"held" * 100
            assert t.put("k/new", b"new" * 100)
            assert t.get("k/new") == b"new" * 100
    with _tier(path) as t:
        t.delete("k/gone")
        assert t.get("k/gone") is None
    assert _user_version(path) == schema.SCHEMA_VERSION + 1
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        logged = [k for (k,) in conn.execute("SELECT key FROM deletes_6")]
    assert logged == ["k/gone"]


@pytest.mark.parametrize("promise", ["none", "only newer writers"])
def test_a_newer_schema_that_does_not_admit_this_version_is_left_alone(
    tmp_path: pathlib.Path, promise: str
) -> None:
    path = tmp_path / "c"
    with _tier(path) as t:
        assert t.put("k", b"v")
    oldest = None if promise == "none" else schema.SCHEMA_VERSION + 1
    _become_newer(path, oldest, *_CHANGE_LOG)
    before = _dump(path)
    with pytest.raises(schema.NewerIndex, match="newer"):
        _tier(path)
    assert _dump(path) == before
    assert _user_version(path) == schema.SCHEMA_VERSION + 1


def test_a_newer_schema_that_admits_this_version_but_lacks_its_objects_is_not_repaired(
    tmp_path: pathlib.Path,
) -> None:
    """Damage would be repaired by rebuilding the index; a newer version's index is not ours
    to rebuild, even when it breaks its promise."""
    path = tmp_path / "c"
    with _tier(path) as t:
        assert t.put("k", b"v")
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        index = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'entries' "
            "AND sql IS NOT NULL"
        ).fetchone()[0]
    _become_newer(path, schema.SCHEMA_VERSION, f"DROP INDEX {index}")
    before = _dump(path)
    with pytest.raises(schema.NewerIndex, match="lacks objects of ours"):
        _tier(path)
    assert _dump(path) == before


def test_a_newer_schema_is_refused_while_its_writer_holds_the_lock(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newer version writing (its write lock held) when this one opens the folder: still
    refused as newer (`open_disk`: memory only), not taken for a busy index and opened
    without it ("offline": then the folder is this version's to record settings in, to
    serve and unlink payload files of, until a later retry finds the schema)."""
    from xarray_zcache.cache.disk import NewerIndex
    from xarray_zcache.cache.settings import CacheSettings
    from xarray_zcache.cache.tiers import open_disk

    with _tier(tmp_path / "c") as t:
        assert t.put("k", b"v")
    db = tmp_path / "c" / "index.db"
    become_newer(db)
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_MS", 200)  # (the lock is not waited out)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as newer:
        newer.execute("BEGIN IMMEDIATE")  # the newer version, writing
        with pytest.raises(NewerIndex):
            _tier(tmp_path / "c")
        settings = CacheSettings(disk_path=str(tmp_path / "c"), disk_size=1 << 30)
        assert open_disk(settings) is None
        newer.execute("COMMIT")


# -- exact eviction counts --------------------------------------------------------------------


def test_eviction_counts_only_the_rows_it_removed(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A victim whose record cannot be marked dead keeps its row: it is neither counted in
    ``evictions`` nor in ``evicted_bytes``, and the freed bytes are those of the rows gone."""
    t = _tier(tmp_path / "c")
    try:
        for i in range(20):
            assert t.put(f"k/{i:02d}", bytes([i]) * 100)
        t.flush()
        stuck = locate(t, "k/00").path.name  # the segment of the oldest entries
        real = rows.kill_records

        def failing(root: str, locations: object) -> set[str]:
            failed = real(root, [loc for loc in locations if loc[0] != stuck])  # type: ignore[attr-defined]
            return failed | {stuck}

        monkeypatch.setattr(rows, "kill_records", failing)
        freed = t.evict(t.used_bytes() - 500)  # 5 victims, all in the stuck segment
        assert freed == 0
        assert t.evictions == 0 and t.evicted_bytes == 0
        assert len(t) == 20
        monkeypatch.setattr(rows, "kill_records", real)
        freed = t.evict(t.used_bytes() - 500)
        assert freed == 500 and t.evictions == 5 and t.evicted_bytes == 500
        assert len(t) == 15
        assert [t.get(f"k/{i:02d}") for i in range(5)] == [None] * 5
    finally:
        t.close()


def test_remove_rows_counts_a_row_changed_since_it_was_read_as_kept(tmp_path: pathlib.Path) -> None:
    """``remove_rows_counted`` given a row that no longer is as read deletes and counts
    nothing of the new row."""
    t = _tier(tmp_path / "c")
    try:
        assert t.put("a", b"old" * 10) and t.put("b", b"bb" * 10)

        def remove(conn: sqlite3.Connection) -> tuple[int, int]:
            with schema.txn(conn):
                stale = conn.execute(f"SELECT {rows.ROW} FROM entries WHERE key = 'a'").fetchone()
                live = conn.execute(f"SELECT {rows.ROW} FROM entries WHERE key = 'b'").fetchone()
                # the row of "a" changes (another writer): the stale copy must not count
                conn.execute("UPDATE entries SET offset = offset + 1 WHERE key = 'a'")
                return rows.remove_rows_counted(conn, t._root, [stale, live], t._warn.error)

        assert t._index.run("remove", remove) == (1, 20)
        assert t.get("b") is None
        assert len(t) == 1
    finally:
        t.close()


def test_put_into_a_full_tier_counts_exactly_what_it_evicted(tmp_path: pathlib.Path) -> None:
    t = _tier(tmp_path / "c", capacity=10_000)
    try:
        for i in range(100):
            assert t.put(f"k/{i:03d}", b"x" * 100)
        assert t.used_bytes() == 10_000 and t.evictions == 0
        assert t.put("new", b"y" * 100)
        gone = [k for k in (f"k/{i:03d}" for i in range(100)) if k not in t]
        assert t.evictions == len(gone) > 0
        assert t.evicted_bytes == 100 * len(gone)
        assert t.used_bytes() == 10_000 + 100 - 100 * len(gone)
    finally:
        t.close()


def test_the_index_page_cache_is_bounded_as_asked(tmp_path: pathlib.Path) -> None:
    with _tier(tmp_path / "a") as t:
        assert t.index_cache_bytes == schema.INDEX_CACHE_BYTES
        assert t._index.run("size", lambda c: c.execute("PRAGMA cache_size").fetchone()[0]) == -(
            schema.INDEX_CACHE_BYTES >> 10
        )
    with DiskTier(tmp_path / "b", 1 << 20, index_cache_bytes=64 << 20) as t:
        assert t.index_cache_bytes == 64 << 20
        t._index.replace()  # a reopened index keeps the bound
        assert t._index.run("size", lambda c: c.execute("PRAGMA cache_size").fetchone()[0]) == -(
            64 << 10
        )


# -- the read connection of hits -------------------------------------------------------------


def test_a_hit_does_not_wait_for_a_write_of_its_own_process(tmp_path: pathlib.Path) -> None:
    """A statistics flush, fill or eviction holds the index lock and a write transaction;
    a hit's lookup runs on the read connection meanwhile and sees the committed row."""
    t = _tier(tmp_path / "c")
    try:
        assert t.put("k", b"committed") and t.get("k") == b"committed"
        holding, release = threading.Event(), threading.Event()

        def writer() -> None:
            def hold(conn: sqlite3.Connection) -> None:
                with schema.txn(conn):
                    conn.execute("UPDATE entries SET hits = hits + 1 WHERE key = 'k'")
                    holding.set()
                    release.wait(10)

            t._index.run("holding", hold)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            assert holding.wait(10)
            t0 = time.monotonic()
            assert t.get("k") == b"committed"
            assert t.might_contain("k") and not t.might_contain("absent")
            assert time.monotonic() - t0 < 5  # did not wait for the 10 s transaction
        finally:
            release.set()
            thread.join()
    finally:
        t.close()


@contextlib.contextmanager
def busy(t: DiskTier, hold_s: float = 30.0) -> Iterator[None]:
    """Another thread holds the index lock (as a flush, fill or eviction does) for at most
    ``hold_s``: meanwhile lookups go to the read connection."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with t._index.lock:
            holding.set()
            release.wait(hold_s)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join()


def _reader_lookup(t: DiskTier, key: str) -> object:
    """The row of ``key`` as the read connection sees it (the index lock must be held)."""
    return t._index.query("test", lambda c: c.execute(reads._LOOKUP, (key,)).fetchone())


def test_lookups_use_the_writer_connection_when_it_is_free(tmp_path: pathlib.Path) -> None:
    """SQLite drops a connection's page cache when another commits: the read connection is
    for contention only, the writer's cache serves the rest."""
    with _tier(tmp_path / "c") as t:
        assert t.put("k", b"v")
        for _ in range(3):
            assert t.get("k") == b"v"
        assert t._index._reader is None
        with busy(t):
            assert _reader_lookup(t, "k") is not None
        assert t._index._reader is not None


def test_the_read_connection_follows_an_index_replaced_by_another_process(
    tmp_path: pathlib.Path,
) -> None:
    """Another process rebuilds the index (records are not recovered, so their rows go and
    nothing marks those records dead), then writes and deletes: the hits of this process
    never come from its read connection to the old index file."""
    a, b = _tier(tmp_path / "c"), _tier(tmp_path / "c")
    try:
        for k in ("k/1", "k/2"):
            assert a.put(k, b"old " + k.encode())
        with busy(a):
            assert _reader_lookup(a, "k/1") is not None and a._index._reader is not None
        b.rebuild_index()  # a new index.db: the records' rows are gone, the records live
        assert b.put("k/1", b"new") and b.get("k/1") == b"new"
        with busy(a), a._index.read_lock:
            assert a._index._reader_locked() is None  # not on the old index file
        assert a.get("k/1") == b"new"  # not the old record the old index points to
        assert a.get("k/2") is None  # lost with the old index, never served from it
        b.put("k/2", b"again")
        b.delete("k/2")
        assert a.get("k/2") is None
        with busy(a):
            assert _reader_lookup(a, "k/2") is None
            assert _reader_lookup(a, "k/1") is not None  # the reader is back, on the new file
            assert a.get("k/1") == b"new"
    finally:
        a.close()
        b.close()


def test_another_process_deleting_or_replacing_an_entry_wins_over_the_read_connection(
    tmp_path: pathlib.Path,
) -> None:
    a, b = _tier(tmp_path / "c", location_map=False), _tier(tmp_path / "c", location_map=False)
    try:
        assert a.put("k", b"v1")
        with busy(a):
            assert a.get("k") == b"v1"
            assert b.put("k", b"v2 longer") and a.get("k") == b"v2 longer"
            b.delete("k")
            assert a.get("k") is None and not a.might_contain("k")
            assert b.put("k", b"v3") and a.get("k") == b"v3"
            b.delete_prefix("")
            assert a.get("k") is None
            assert a._index._reader is not None
    finally:
        a.close()
        b.close()


def test_an_error_on_the_read_connection_goes_through_recovery(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error on the read connection sends the lookup through ``Index.run`` (recovery)."""
    t = _tier(tmp_path / "c", location_map=False)
    try:
        assert t.put("k", b"v")
        with busy(t):
            assert _reader_lookup(t, "k") is not None
        reader = t._index._reader
        assert reader is not None
        calls: list[str] = []
        real_run = t._index.run

        def run(action: str, op: object, **kw: bool) -> object:
            calls.append(action)
            return real_run(action, op, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(t._index, "run", run)
        reader.close()  # any error: ProgrammingError (a closed connection)
        with busy(t, hold_s=0.5):  # run() waits for the lock, then looks up
            assert t.get("k") == b"v"
        assert calls.count("looking up a key") == 1
        assert t._index._reader is None  # dropped; opened again when next needed
        with busy(t):
            assert _reader_lookup(t, "k") is not None
        assert t._index._reader not in (None, reader)
    finally:
        t.close()
