"""The location map (issue 19, item 4: one device read per hit, also after a restart).

Each test tries to make the map serve bytes the index no longer promises: another process
or an older version changing rows (records left intact on disk), a hint file that is old,
damaged, forged or another index's, an index gone back in time or replaced, compaction
moving records, threads writing while others read.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from keydir_helpers import KEYS, extract_package, filled, in_another_process, tier, value

from xarray_zcache.cache.disk import DiskTier, Fill, hint, rows, schema
from xarray_zcache.cache.disk.locations import hash_of


def _sql(path: pathlib.Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Change the index as a writer that knows nothing of the change log would (an older
    version the schema admits): plain SQL, records left as they are on disk."""
    with contextlib.closing(sqlite3.connect(path / "index.db", isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        for sql, args in statements:
            conn.execute(sql, args)
        conn.execute("COMMIT")


def test_a_hit_after_a_restart_reads_no_index_page(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    filled(path)
    assert (path / hint.HINT_NAME).exists()
    with tier(path) as t:
        assert t._keydir is not None and t._keydir.ready  # from the hint, at open
        for k in KEYS:
            assert t.get(k) == value(k)
        assert t.get("ns/v/c/absent") is None and not t.might_contain("ns/v/c/absent")
        assert t.might_contain(KEYS[0])
        assert t.index_lookups == 0  # every answer from the map: no B-tree descent
        assert t._keydir.answered == len(KEYS) + 3


def test_the_hint_file_is_private_and_holds_no_pickle(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    filled(path)
    hint_file = path / hint.HINT_NAME
    assert stat.S_IMODE(hint_file.stat().st_mode) == 0o600
    data = hint_file.read_bytes()
    assert data.startswith(b"zcache-keydir") and b"\x80\x04\x95" not in data[:64]
    for k in KEYS:  # keys are hashed: none is in the file
        assert k.encode() not in data


def test_another_process_changing_entries_is_seen_at_once(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t:
        assert t.get(KEYS[0]) == value(KEYS[0])  # the map holds them all
        in_another_process(
            path,
            f"t.put({KEYS[0]!r}, b'v2 from the other process', namespace='ns')\n"
            f"t.delete({KEYS[1]!r})\n"
            f"t.delete_prefix('ns/v/c/19')\n"
            f"t.put('ns/v/c/new', b'new', namespace='ns')",
        )
        assert t.get(KEYS[0]) == b"v2 from the other process"
        assert t.get(KEYS[1]) is None
        assert all(t.get(f"ns/v/c/19{i}") is None for i in range(10))
        assert t.get("ns/v/c/19") is None
        assert t.get("ns/v/c/new") == b"new"
        assert t.get(KEYS[2]) == value(KEYS[2])


def test_an_older_writer_that_knows_nothing_of_the_log_is_followed(
    tmp_path: pathlib.Path,
) -> None:
    """Rows deleted or moved by plain SQL (records untouched on disk, still intact and still
    the key's): the triggers log them, and the map never serves those records again."""
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t:
        assert t.get(KEYS[3]) == value(KEYS[3]) and t.get(KEYS[4]) == value(KEYS[4])
        seg, off = t._conn.execute(  # type: ignore[union-attr]
            "SELECT segment, offset FROM entries WHERE key = ?", (KEYS[5],)
        ).fetchone()
        _sql(
            path,
            ("DELETE FROM entries WHERE key = ?", (KEYS[3],)),
            # KEYS[4] now "is" at KEYS[5]'s record: the read must find that out
            (
                "UPDATE entries SET segment = ?, offset = ?, token = token + 1 WHERE key = ?",
                (seg, off, KEYS[4]),
            ),
        )
        assert t.get(KEYS[3]) is None  # the record is still on disk, intact: not served
        assert t.get(KEYS[4]) is None  # the row points to another key's record: a miss
        assert t.get(KEYS[5]) == value(KEYS[5])
        assert t.corruptions == 0 or t.get(KEYS[4]) is None


def test_a_hint_left_behind_by_later_changes_is_brought_up_to_date(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "c"
    filled(path)  # the hint: as of the fill
    in_another_process(  # this process writes no hint of its own
        path,
        f"t.put({KEYS[0]!r}, b'changed', namespace='ns')\n"
        f"t.delete({KEYS[1]!r})\n"
        "t._keydir.close(save=False); t._keydir = None",
    )
    _sql(path, ("DELETE FROM entries WHERE key = ?", (KEYS[2],)))
    with tier(path) as t:
        assert t._keydir is not None and t._keydir.ready
        assert t.get(KEYS[0]) == b"changed"
        assert t.get(KEYS[1]) is None and t.get(KEYS[2]) is None
        assert all(t.get(k) == value(k) for k in KEYS[3:])
        assert t.index_lookups == 0


def test_a_hint_older_than_the_pruned_log_is_not_used(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    filled(path)
    old_hint = (path / hint.HINT_NAME).read_bytes()
    with tier(path) as t:
        assert t.put(KEYS[0], b"changed", namespace="ns")
        t.delete(KEYS[1])
        conn = t._conn
        assert conn is not None
        with schema.txn(conn):
            rows.prune_changes(conn, 0)  # the changes since the old hint are gone
    (path / hint.HINT_NAME).write_bytes(old_hint)
    with tier(path) as t:
        assert t.get(KEYS[0]) == b"changed" and t.get(KEYS[1]) is None
        assert all(t.get(k) == value(k) for k in KEYS[2:])
        assert t._keydir is not None and t._keydir.builds == 1  # from the rows, not the hint


@pytest.mark.parametrize(
    "damage", ["flip a byte", "truncate", "garbage", "empty", "another folder's"]
)
def test_a_damaged_or_foreign_hint_is_not_used(tmp_path: pathlib.Path, damage: str) -> None:
    path = tmp_path / "c"
    filled(path)
    hint_file = path / hint.HINT_NAME
    data = hint_file.read_bytes()
    if damage == "flip a byte":
        data = data[:-100] + bytes([data[-100] ^ 0x40]) + data[-99:]
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = os.urandom(len(data))
    elif damage == "empty":
        data = b""
    else:  # a hint from another cache folder of the same keys (another index, other places)
        other = tmp_path / "other"
        filled(other, list(reversed(KEYS)))
        data = (other / hint.HINT_NAME).read_bytes()
    hint_file.write_bytes(data)
    with tier(path) as t:
        assert all(t.get(k) == value(k) for k in KEYS)
        assert t.corruptions == 0 and t._keydir is not None and t._keydir.builds == 1


def test_a_forged_hint_pointing_elsewhere_never_serves_other_bytes(
    tmp_path: pathlib.Path,
) -> None:
    """A hint that checks out (CRC, order, epoch, last change) but whose locations are
    another key's: every read is checked against its key, falls back to the index, and
    nothing is dropped as damaged."""
    path = tmp_path / "c"
    filled(path)
    loaded = hint.read(str(path))
    assert loaded is not None
    a = loaded.arrays
    shifted = type(a)(a.hashes, a.kinds, a.segments, a.offsets[::-1].copy(), a.lengths)
    hint.write(
        str(path), hint.Hint(loaded.epoch, loaded.seq, loaded.last, loaded.segments, shifted)
    )
    with tier(path) as t:
        assert t._keydir is not None and t._keydir.ready
        assert all(t.get(k) == value(k) for k in KEYS)
        assert t.corruptions == 0 and len(t) == len(KEYS)
        assert t.index_lookups == len(KEYS)  # each misplaced: asked, not misread
        before = t.index_lookups
        assert all(t.get(k) == value(k) for k in KEYS)
        assert t.index_lookups == before  # learnt from the index's answers


def test_an_index_gone_back_in_time_refuses_the_newer_hint(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    old = tmp_path / "old.db"
    with tier(path) as t:
        assert all(t.put_many([Fill(k, value(k), namespace="ns") for k in KEYS[:50]]))
        with contextlib.closing(sqlite3.connect(old)) as dst:
            assert t._conn is not None
            t._conn.backup(dst)
        for k in KEYS[:10]:
            assert t.put(k, value(k, "v2"), namespace="ns")
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}/index.db{suffix}")
    os.replace(old, path / "index.db")
    # and the old state goes on, to as many changes as the hint had seen, differently
    with contextlib.closing(sqlite3.connect(path / "index.db", isolation_level=None)) as conn:
        for k in KEYS[10:20]:
            conn.execute("DELETE FROM entries WHERE key = ?", (k,))
    with tier(path) as t:
        for k in KEYS[:10]:
            assert t.get(k) is None  # the old rows' records were killed when replaced
        assert all(t.get(k) is None for k in KEYS[10:20])
        assert all(t.get(k) == value(k) for k in KEYS[20:50])
        assert t._keydir is not None and t._keydir.builds == 1


def test_an_index_replaced_under_a_running_map_is_followed(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t, tier(path) as other:
        assert t.get(KEYS[0]) == value(KEYS[0])
        other.rebuild_index()  # a new index file (a new epoch); records are misses then
        assert other.put(KEYS[0], b"after the rebuild", namespace="ns")
        assert t.get(KEYS[0]) == b"after the rebuild"
        assert t.get(KEYS[1]) in (None, value(KEYS[1]))


def test_compaction_moves_records_and_the_map_follows(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t:
        for k in KEYS[::2]:
            t.delete(k)
        t._segments.close()  # sealed: compaction may take it
        assert t.compact() > 0
        lookups = t.index_lookups
        assert all(t.get(k) is None for k in KEYS[::2])
        assert all(t.get(k) == value(k) for k in KEYS[1::2])
        assert t.index_lookups == lookups  # the moves came through the log


def test_readers_never_see_another_keys_bytes_or_go_back_in_time(
    tmp_path: pathlib.Path,
) -> None:
    """Writers overwrite and delete while readers read through the map: each read is the
    key's own value, and never older than one the same reader saw before."""
    path = tmp_path / "c"
    keys = KEYS[:20]
    filled(path, keys)
    stop = threading.Event()
    errors: list[str] = []
    with tier(path) as t, tier(path) as writer:

        def write() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                for k in keys:
                    if n % 7 == 0 and k.endswith("3"):
                        writer.delete(k)
                    else:
                        writer.put(k, f"<{k}|{n:08d}>".encode() * 10, namespace="ns")

        def read() -> None:
            seen: dict[str, int] = {}
            for _ in range(300):
                for k in keys:
                    got = t.get(k)
                    if got is None or got == value(k):
                        continue
                    head = got[: got.index(b">") + 1].decode()
                    key, n = head[1:-1].split("|")
                    if key != k or got != head.encode() * 10:
                        errors.append(f"{k}: {got[:40]!r}")
                    elif int(n) < seen.get(k, 0):
                        errors.append(f"{k}: {n} after {seen[k]}")
                    seen[k] = int(n)

        threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in "ab"]
        for th in threads:
            th.start()
        for th in threads[1:]:
            th.join()
        stop.set()
        threads[0].join()
    assert errors == []


def test_keys_with_nul_dots_and_surrogates(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    odd = ["a\x00b", "../../etc/passwd", "x/\udcff", "é/ü", ""]
    with tier(path) as t:
        for k in odd:
            t.put(k, k.encode("utf-8", "surrogatepass") + b"!", namespace="ns")
    with tier(path) as t:
        for k in odd:
            got = t.get(k)
            assert got is None if "\udcff" in k else got == k.encode() + b"!", k
        assert t.index_lookups <= 1  # (the surrogate key is refused before any lookup)


def test_the_map_costs_25_bytes_an_entry(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t:
        assert t._keydir is not None
        assert t._keydir.nbytes == hint.ENTRY_BYTES * len(KEYS) == 25 * len(KEYS)


def test_a_large_index_is_mapped_in_the_background_and_reads_ask_meanwhile(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xarray_zcache.cache.disk import keydir, keydir_build

    path = tmp_path / "c"
    filled(path)
    os.unlink(path / hint.HINT_NAME)
    monkeypatch.setattr(keydir, "_BUILD_AT_ONCE", 10)  # "large"
    gate = threading.Event()
    real_scan = keydir_build.scan

    def slow_scan(conn: sqlite3.Connection, stopped: Callable[[], bool]) -> object:
        gate.wait(30)
        return real_scan(conn, stopped)

    monkeypatch.setattr(keydir_build, "scan", slow_scan)
    with tier(path) as t:
        assert t._keydir is not None and not t._keydir.ready
        assert t.get(KEYS[0]) == value(KEYS[0]) and t.index_lookups == 1
        assert t.put(KEYS[1], b"written while building", namespace="ns")
        building = t._keydir._building  # (waiting at the gate)
        assert building is not None
        gate.set()
        building.join(30)
        assert t._keydir.ready
        assert t.get(KEYS[1]) == b"written while building"
        assert all(t.get(k) == value(k) for k in KEYS[2:])
        assert t.index_lookups == 1


def test_without_a_map_reads_go_through_the_index(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    filled(path)
    with DiskTier(path, 1 << 30, location_map=False) as t:
        assert t._keydir is None
        assert all(t.get(k) == value(k) for k in KEYS)
        assert t.index_lookups == len(KEYS)
    assert hash_of("k") == hash_of("k") != hash_of("k2")


#: The last commit of schema 4 (session 9): the version that may go on writing to a schema-5
#: index (``zcache_compat``), knowing nothing of its change log or of location maps.
_SCHEMA_4_COMMIT = "e9179a0"

_SCHEMA_4_PROCESS = r"""
import sys
from xarray_zcache.cache.disk import DiskTier, schema
assert schema.SCHEMA_VERSION == 4
t = DiskTier(sys.argv[1], 1 << 30)  # a schema-5 folder: used as it is
keys = sys.argv[2:]
assert t.get(keys[2]) is not None  # it reads what the newer version wrote
assert t.put(keys[0], b"v2 from schema 4", namespace="ns")
t.delete(keys[1])
assert t.put("ns/v/c/from-4", b"new from schema 4", namespace="ns")
t.close()
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def schema_4_code(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The package as of :data:`_SCHEMA_4_COMMIT`, extracted from git history."""
    old_code = tmp_path_factory.mktemp("schema4")
    if not extract_package(_SCHEMA_4_COMMIT, old_code):
        pytest.skip("the schema-4 code is not in this checkout's history")
    return old_code


def _run_old(old_code: pathlib.Path, script: str, *args: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(old_code)},
        cwd=old_code,  # (``-c`` puts the working directory first on sys.path)
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr


def test_a_schema_4_folder_is_migrated_in_place(
    tmp_path: pathlib.Path, schema_4_code: pathlib.Path
) -> None:
    path = tmp_path / "c"
    _run_old(
        schema_4_code,
        "import sys\n"
        "from xarray_zcache.cache.disk import DiskTier, Fill\n"
        "t = DiskTier(sys.argv[1], 1 << 30)\n"
        "assert all(t.put_many([Fill(k, f'<{k}|v1>'.encode() * 20, namespace='ns') "
        "for k in sys.argv[2:]]))\n"
        "t.close()\n"
        "print('done')\n",
        str(path),
        *KEYS,
    )
    with tier(path) as t:  # migrates 4 -> 5: the rows stay, the map is built from them
        assert t.index_rebuilds == 0 and t._keydir is not None and t._keydir.builds == 1
        assert all(t.get(k) == value(k) for k in KEYS)
        assert t.index_lookups == 0
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert schema.schema_of(conn) == schema.expected_schema()


def test_a_schema_4_process_writing_beside_a_running_map_is_followed(
    tmp_path: pathlib.Path, schema_4_code: pathlib.Path
) -> None:
    """The real schema-4 code (from git history), on a folder this version created: it
    admits itself (``zcache_compat``), writes and deletes without knowing of the change log,
    and this version's map, open meanwhile and after a restart, serves none of what it
    replaced or deleted."""
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t:
        assert t.get(KEYS[0]) == value(KEYS[0])  # the map holds them
        _run_old(schema_4_code, _SCHEMA_4_PROCESS, str(path), *KEYS[:3])
        assert t.get(KEYS[0]) == b"v2 from schema 4"
        assert t.get(KEYS[1]) is None
        assert t.get("ns/v/c/from-4") == b"new from schema 4"
        assert t.index_lookups == 0  # all of it through the map, from the log
    with tier(path) as t:  # after a restart: the hint, then the log
        assert t.get(KEYS[0]) == b"v2 from schema 4" and t.get(KEYS[1]) is None
        assert all(t.get(k) == value(k) for k in KEYS[2:])
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION


def test_changes_folded_into_the_arrays_answer_as_before(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folds (every 8 changes here, in the background) keep every answer: overwritten,
    deleted, new, moved to a file of its own."""
    from xarray_zcache.cache.disk import keydir

    monkeypatch.setattr(keydir, "_MERGE_AT", 8)
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t, tier(path) as writer:
        expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
        for round_ in range(5):
            for i, k in enumerate(KEYS):
                if (i + round_) % 5 == 0:
                    writer.delete(k)
                    expected[k] = None
                elif (i + round_) % 5 == 1:
                    big = round_ == 4 and i % 2 == 0  # a payload file of its own
                    fresh = (b"F" if big else b"r") * (70_000 if big else 100) + k.encode()
                    assert writer.put(k, fresh, namespace="ns")
                    expected[k] = fresh
            for k, v in expected.items():
                assert t.get(k) == v, (round_, k)
        kd = t._keydir
        assert t.index_lookups == 0 and kd is not None and kd.folds > 0
        deadline = time.monotonic() + 30
        while kd._folding is not None and time.monotonic() < deadline:  # (a fold in flight)
            time.sleep(0.01)
        assert len(kd._changes) < 8 or kd._folding is not None, len(kd._changes)
    with tier(path) as t:  # and from the hint written at close
        assert all(t.get(k) == v for k, v in expected.items())
        assert t.index_lookups == 0


def test_keys_whose_hashes_collide_are_read_through_the_index(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two keys on one 64-bit hash: the map cannot tell them apart, so every copy is "ask"
    (built from the rows), and a location learnt for one is found not to hold the other's
    record (checked against the key), never served as it. (A delete of one may make the
    other a miss until written again: a fetch, never other bytes.)"""
    import hashlib

    from xarray_zcache.cache.disk import keydir, keydir_build, locations

    collide = {hashlib.sha256(k.encode()).digest() for k in KEYS if k.startswith("ns/v/c/1")}
    real_hash = locations.key_hash

    def colliding(digest: bytes) -> int:
        return 7 if digest in collide else real_hash(digest)

    monkeypatch.setattr("xarray_zcache.cache.disk.reads.key_hash", colliding)
    for module in (keydir, keydir_build):  # the log's changes, the scan's rows
        monkeypatch.setattr(
            module, "hash_of", lambda key: colliding(hashlib.sha256(key.encode()).digest())
        )
    path = tmp_path / "c"
    filled(path)
    (path / hint.HINT_NAME).unlink()  # (its hashes are the real ones)
    with tier(path) as t:
        for _ in range(2):
            assert all(t.get(k) == value(k) for k in KEYS)
        assert t.corruptions == 0 and len(t) == len(KEYS)
        assert 0 < t.index_lookups <= 2 * len(collide)


def test_a_process_killed_before_closing_leaves_a_recent_hint(tmp_path: pathlib.Path) -> None:
    """Maintenance writes the hint when it is due; a worker killed (SIGKILL, no close) then
    leaves it, and the next process replays the changes after it instead of building the
    map from the rows."""
    path = tmp_path / "c"
    keys = ", ".join(repr(k) for k in KEYS)
    script = (
        "import os, signal, sys\n"
        "from xarray_zcache.cache.disk import DiskTier, Fill\n"
        f"t = DiskTier({str(path)!r}, 1 << 30)\n"
        f"keys = [{keys}]\n"
        "assert all(t.put_many([Fill(k, f'<{k}|v1>'.encode() * 20, namespace='ns') "
        "for k in keys]))\n"
        "assert not t.save_location_map()  # 200 changes: not due\n"
        "assert t.save_location_map(force=True)\n"
        "assert t.put(keys[0], b'after the hint', namespace='ns')\n"
        "t.delete(keys[1])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert done.returncode == -9
    with tier(path) as t:
        assert t._keydir is not None and t._keydir.ready and t._keydir.builds == 0
        assert t.get(KEYS[0]) == b"after the hint" and t.get(KEYS[1]) is None
        assert all(t.get(k) == value(k) for k in KEYS[2:])
        assert t.index_lookups == 0


def _rename_in_index(path: pathlib.Path, old: str, new: str) -> int:
    """Damage SQLite does not see: every stored copy of key ``old`` now reads ``new`` (same
    length), bytes changed in ``index.db`` itself (the folder closed: no WAL)."""
    assert len(old) == len(new) and not (path / "index.db-wal").exists()
    data = (path / "index.db").read_bytes()
    n = data.count(old.encode())
    (path / "index.db").write_bytes(data.replace(old.encode(), new.encode()))
    return n


def test_a_row_the_damaged_index_cannot_find_is_not_served_after_its_delete(
    tmp_path: pathlib.Path,
) -> None:
    """The map (from the hint) holds a key whose row a damaged index no longer finds by
    key (its stored key changed, in key order: nothing for SQLite to notice). Deleting it
    finds no row; the delete is logged all the same, and the old record is never served."""
    path = tmp_path / "c"
    filled(path)
    assert _rename_in_index(path, "ns/v/c/150", "ns/v/c/15/") > 0
    with tier(path) as t:
        assert t._keydir is not None and t._keydir.ready and t._keydir.builds == 0
        assert t.get("ns/v/c/150") == value("ns/v/c/150")  # (the record is intact)
        t.delete("ns/v/c/150")
        assert t.get("ns/v/c/150") is None
        assert t.put("ns/v/c/151", b"new", namespace="ns") and t.get("ns/v/c/151") == b"new"
    with tier(path) as t:
        assert t.get("ns/v/c/150") is None


def test_a_prefix_delete_drops_the_maps(tmp_path: pathlib.Path) -> None:
    """A damaged index's range scan may miss rows a map holds: a prefix delete makes every
    map build again from the rows (one by key ending in NUL, for parts, does not)."""
    path = tmp_path / "c"
    filled(path)
    assert _rename_in_index(path, "ns/v/c/150", "ns/v/c/15/") > 0
    with tier(path) as t, tier(path) as other:
        assert other.get("ns/v/c/150") == value("ns/v/c/150")
        builds = other._keydir.builds if other._keydir else -1
        assert t.delete_prefix("ns/v/c/15") >= 1
        assert other.get("ns/v/c/150") is None and t.get("ns/v/c/150") is None
        kd = other._keydir
        assert kd is not None
        # dropped, built again in the background (again if the damage made `t` replace
        # the index meanwhile: a build of the old file is not installed)
        deadline = time.monotonic() + 60
        while not (kd.ready and kd.builds > builds) and time.monotonic() < deadline:
            assert other.get("ns/v/c/150") is None
            time.sleep(0.02)
        assert kd.ready and kd.builds > builds and other.get("ns/v/c/150") is None
        assert other.get("ns/v/c/16") in (None, value("ns/v/c/16"))  # (None: replaced)
        builds = kd.builds
        t.delete_prefix("ns/v/c/16\x00")  # parts only: the maps stay
        assert other.get("ns/v/c/17") in (None, value("ns/v/c/17"))
        assert kd.builds == builds and kd.ready


def test_rows_out_of_key_order_are_damage_not_a_map(tmp_path: pathlib.Path) -> None:
    """A scan that finds rows out of key order (a lookup by key would miss some) builds no
    map: the index is replaced as damaged, and nothing stale is served after a write."""
    path = tmp_path / "c"
    filled(path)
    (path / hint.HINT_NAME).unlink()  # built from the rows
    assert _rename_in_index(path, "ns/v/c/150", "ns/v/c/000") > 0
    with tier(path) as t:
        assert t.corruptions == 1  # (replaced: records are not recovered from it)
        t.delete("ns/v/c/000")
        t.delete("ns/v/c/150")
        assert t.get("ns/v/c/150") is None and t.get("ns/v/c/000") is None
        assert t.put("ns/v/c/150", b"new", namespace="ns") and t.get("ns/v/c/150") == b"new"


def test_the_change_log_keeps_a_share_of_the_entries(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruning keeps at least a quarter of the entry count (here 200 entries: 50 changes,
    the fixed floor being 5): a map 40 changes behind takes them in after a prune, one 60
    behind is built again from the rows (a log bounded by a constant would let a large
    index's build, which takes time proportional to the entries, be pruned past forever)."""
    from xarray_zcache.cache.disk import rows

    monkeypatch.setattr(rows, "CHANGES_KEPT", 5)
    path = tmp_path / "c"
    filled(path)
    for behind, rebuilt in ((40, False), (60, True)):
        with tier(path) as t, tier(path) as writer:
            kd = t._keydir
            assert kd is not None and t.get(KEYS[-1]) == value(KEYS[-1])  # up to date
            builds = kd.builds
            for k in KEYS[:behind]:
                assert writer.put(k, value(k, f"behind {behind}"), namespace="ns")
            with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
                assert rows.changes_kept(conn) == 50
            writer.prune_tombstones(0)  # prunes the log too
            assert all(t.get(k) == value(k, f"behind {behind}") for k in KEYS[:behind])
            deadline = time.monotonic() + 30
            while not kd.ready and time.monotonic() < deadline:
                t.get(KEYS[-1])
                time.sleep(0.01)
            assert (kd.builds > builds) is rebuilt
