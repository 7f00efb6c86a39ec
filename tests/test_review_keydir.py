"""Review of the location map (keydir): attacks that try to make the disk tier return bytes
that were deleted, overwritten or are another key's, or miss an entry it holds, through the
map; and races, forks, pruning, closing during a build.

Real files, real SQLite, real subprocesses where another process matters. Hash collisions are
forced by replacing the 8-byte key hash of a few chosen keys (the map's only shortcut).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from keydir_helpers import KEYS, filled, forked, in_another_process, tier, value

from xarray_zcache.cache.disk import (
    DiskTier,
    Fill,
    hint,
    keydir,
    keydir_build,
    locations,
    reads,
    rows,
)
from xarray_zcache.cache.disk.locations import ASK, Location, hash_of
from xarray_zcache.cache.disk.segments import SEGMENT_THRESHOLD


@contextlib.contextmanager
def _colliding(monkeypatch: pytest.MonkeyPatch, *keys: str) -> Iterator[int]:
    """Give ``keys`` one and the same map hash (a forced 64-bit collision)."""
    digests = {hashlib.sha256(k.encode()).digest() for k in keys}
    forced = locations.key_hash(hashlib.sha256(keys[0].encode()).digest())
    real = locations.key_hash

    def key_hash(digest: bytes) -> int:
        return forced if digest in digests else real(digest)

    monkeypatch.setattr(locations, "key_hash", key_hash)  # hash_of (keydir's scan, log)
    monkeypatch.setattr(reads, "key_hash", key_hash)  # get_entry
    assert all(hash_of(k) == forced for k in keys)
    yield forced


# ---------------------------------------------------------------------- hash collisions


def test_collision_a_miss_of_a_colliding_key_does_not_hide_a_held_one(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map gives the absent key B the location of A (same hash); the record there is
    A's, so B asks the index, which has no row: that answer must not make the map say
    "absent" for the hash, which is A's too."""
    with _colliding(monkeypatch, "col/A", "col/B"), tier(tmp_path / "c") as t:
        assert t.put("col/A", b"A" * 100)
        assert t._keydir is not None and t._keydir.ready
        assert t.get("col/B") is None
        assert t.get("col/A") == b"A" * 100
        assert t.might_contain("col/A")


def test_collision_a_file_location_of_another_key_is_not_a_miss(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A is a record, B (same hash) a payload file of its own: the map's "file" answer for
    A finds no file of A's; the index decides, not the map."""
    with _colliding(monkeypatch, "col/A", "col/B"), tier(tmp_path / "c") as t:
        assert t.put("col/A", b"A" * 100)
        assert t.put("col/B", b"B" * (SEGMENT_THRESHOLD + 10))  # a file of its own
        assert t._keydir is not None
        assert isinstance(t._keydir.find(hash_of("col/A")), Location)
        assert t.get("col/A") == b"A" * 100
        assert t.get("col/B") == b"B" * (SEGMENT_THRESHOLD + 10)
        assert t.get("col/A") == b"A" * 100


def test_collision_colliding_keys_never_get_each_others_bytes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c"
    with _colliding(monkeypatch, "col/A", "col/B"):
        with tier(path) as t:
            assert t.put("col/A", b"A" * 100) and t.put("col/B", b"B" * 100)
            for _ in range(3):
                assert t.get("col/A") == b"A" * 100
                assert t.get("col/B") == b"B" * 100
            assert t.might_contain("col/A") and t.might_contain("col/B")
        with tier(path) as t:  # from the hint (one location for the two keys' hash)
            assert t._keydir is not None and t._keydir.ready
            assert t.get("col/A") == b"A" * 100 and t.get("col/B") == b"B" * 100
            t.delete("col/B")
            assert t.get("col/B") is None
            # the logged delete of B says nothing of A: a false miss at worst (documented
            # limit of an 8-byte hash), healed by the next put; never B's bytes
            got = t.get("col/A")
            assert got in (None, b"A" * 100)
            if got is None:
                assert t.put("col/A", b"A" * 100)
            assert t.get("col/A") == b"A" * 100


# ---------------------------------------------------------------------- other processes


def test_another_process_evicting_verifying_compacting_and_clearing_is_followed(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t:
        assert all(t.get(k) == value(k) for k in KEYS)  # every answer from the map now
        in_another_process(
            path,
            "import os\n"
            f"t.put({KEYS[0]!r}, b'v2', namespace='ns')\n"
            # a row left without its file: verify(repair=True) deletes it
            f"t.put('big', b'x' * {SEGMENT_THRESHOLD + 1})\n"
            "import hashlib\n"
            "from xarray_zcache.cache.disk.format import payload_path\n"
            "h = hashlib.sha256(b'big').hexdigest()\n"
            "[os.unlink(payload_path(t._root, h, k)) for k in ('chunk',)]\n"
            "assert t.verify(repair=True)['missing_files'] == 1\n"
            f"[t.delete(k) for k in {KEYS[100:150]!r}]\n"
            "t.compact()\n"
            "t.evict(0)\n",  # every entry evicted
        )
        assert t.get("big") is None
        assert all(t.get(k) is None for k in KEYS)
        assert not any(t.might_contain(k) for k in KEYS)
        in_another_process(path, f"t.put({KEYS[1]!r}, b'back', namespace='ns')")
        assert t.get(KEYS[1]) == b"back"
        assert t.get(KEYS[0]) is None


def test_another_process_rebuilding_the_index_is_followed(tmp_path: pathlib.Path) -> None:
    """rebuild_index in another process replaces index.db: records are not recovered (they
    may be dead), so the map must not go on serving them."""
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t:
        assert t.get(KEYS[0]) == value(KEYS[0])
        in_another_process(path, "t.rebuild_index()")
        assert t.get(KEYS[0]) is None
        assert not t.might_contain(KEYS[0])
        assert t.put(KEYS[0], b"after", namespace="ns")
        assert t.get(KEYS[0]) == b"after"


def test_this_process_rebuilding_the_index_loses_no_later_write(tmp_path: pathlib.Path) -> None:
    """The map's connection is on the replaced index.db; closing it (when the map notices)
    must not take the new index's -wal/-shm with it (SQLite deletes those by name)."""
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t:
        assert t.get(KEYS[0]) == value(KEYS[0])
        t.rebuild_index()
        assert t.put("after/1", b"one")
        assert t.get(KEYS[0]) is None  # the map notices the new index, drops its connection
        assert t.put("after/2", b"two")
        assert t.get("after/1") == b"one"
        in_another_process(
            path, "assert t.get('after/1') == b'one'\nassert t.get('after/2') == b'two'"
        )
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with tier(path) as t:
        assert t.get("after/1") == b"one" and t.get("after/2") == b"two"
        assert t.get(KEYS[0]) is None


def test_a_map_behind_the_pruned_log_is_rebuilt_not_served(
    tmp_path: pathlib.Path,
) -> None:
    """Another process overwrites a key, then prunes the log past the change: the map
    cannot apply it, so it must be dropped and rebuilt (never answer from before)."""
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t:
        assert t.get(KEYS[0]) == value(KEYS[0])
        in_another_process(
            path,
            f"t.put({KEYS[0]!r}, b'v2', namespace='ns')\n"
            f"t.delete({KEYS[1]!r})\n"
            "[t.put(f'filler/{i}', b'f') for i in range(30)]\n"
            "rows.CHANGES_KEPT, rows.CHANGES_KEPT_PER_ENTRY = 5, 0\n"
            "t.prune_tombstones(0)\n",
        )
        with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
            assert conn.execute("SELECT pruned FROM changes_state").fetchone()[0] > 0
        assert t.get(KEYS[0]) == b"v2"
        assert t.get(KEYS[1]) is None
        deadline = time.monotonic() + 30
        while not t._keydir.ready and time.monotonic() < deadline:  # type: ignore[union-attr]
            t.get(KEYS[2])
            time.sleep(0.01)
        assert t._keydir is not None and t._keydir.ready
        assert t.get(KEYS[0]) == b"v2" and t.get(KEYS[1]) is None
        assert t.get(KEYS[2]) == value(KEYS[2])
    with tier(path) as t:  # the hint written at that close is of the pruned log
        assert t.get(KEYS[0]) == b"v2" and t.get(KEYS[1]) is None


def test_pruning_tombstones_here_does_not_drop_this_process_map(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prune_tombstones`` prunes the change log too: this process's own map, behind by
    its own writes (no read since), must take them in first, as the automatic pruning of
    fills does, rather than be dropped and rebuilt from every row."""
    path = tmp_path / "c"
    filled(path)
    monkeypatch.setattr(rows, "CHANGES_KEPT", 5)
    monkeypatch.setattr(rows, "CHANGES_KEPT_PER_ENTRY", 0)
    with tier(path) as t:
        assert t._keydir is not None and t._keydir.ready
        assert t.get(KEYS[0]) == value(KEYS[0])
        builds = t._keydir.builds
        for i in range(30):
            assert t.put(f"filler/{i}", b"f")
        t.prune_tombstones(0)
        assert t.get("filler/0") == b"f" and t.get(KEYS[0]) == value(KEYS[0])
        assert t._keydir.ready and t._keydir.builds == builds


def test_expired_entries_are_not_served_from_the_map(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c"
    with tier(path) as t:
        now = time.time()
        assert t.put("ttl", b"short", expires=now + 10)
        assert t.get("ttl", now=now) == b"short"
        assert t.get("ttl", now=now + 20) is None  # expired: dropped
        assert t.get("ttl", now=now) is None  # the row is gone
        assert not t.might_contain("ttl")
    with tier(path) as t:
        assert t.get("ttl", now=now) is None


# ---------------------------------------------------------------------- fork, close, threads


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.filterwarnings("ignore:This process.*multi-threaded")
def test_a_forked_child_changing_entries_is_followed_by_the_parent_map(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "c"
    filled(path)
    t = tier(path)
    try:
        assert t._keydir is not None and t._keydir.ready
        assert t.get(KEYS[0]) == value(KEYS[0])

        def child() -> None:
            assert t._keydir is not None
            assert t._keydir.find(hash_of(KEYS[0])) is ASK  # never the parent's connection
            assert t.get(KEYS[0]) == value(KEYS[0])  # through the index
            assert t.put(KEYS[0], b"from the child", namespace="ns")
            assert t.get(KEYS[0]) == b"from the child"
            t.delete(KEYS[1])
            assert t.get(KEYS[1]) is None
            t._keydir.close()  # the child lets go of its copy of the map (no hint, no close)

        hint_before = (path / hint.HINT_NAME).read_bytes()
        assert forked(child) == 0
        assert (path / hint.HINT_NAME).read_bytes() == hint_before  # the child wrote none
        assert t._keydir.ready
        assert t.get(KEYS[0]) == b"from the child"
        assert t.get(KEYS[1]) is None and not t.might_contain(KEYS[1])
        assert t.put("parent/after", b"p")
        in_another_process(
            path,
            f"assert t.get('parent/after') == b'p'\nassert t.get({KEYS[0]!r}) == b'from the child'",
        )
        assert t.get(KEYS[2]) == value(KEYS[2])
    finally:
        t.close()
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with tier(path) as t2:
        assert t2.get(KEYS[0]) == b"from the child" and t2.get("parent/after") == b"p"


def test_closing_while_the_map_is_built_in_the_background(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c"
    filled(path)
    (path / hint.HINT_NAME).unlink()
    monkeypatch.setattr(keydir, "_BUILD_AT_ONCE", 10)  # KEYS: built in the background
    monkeypatch.setattr(keydir_build, "SCAN_BATCH", 10)
    started = threading.Event()
    real = keydir_build.hash_of

    def slow_hash(key: str) -> int:
        started.set()
        time.sleep(0.01)
        return real(key)

    monkeypatch.setattr(keydir_build, "hash_of", slow_hash)  # (the scan's)
    t = tier(path)
    assert t._keydir is not None and not t._keydir.ready
    assert started.wait(10)
    assert t.get(KEYS[0]) == value(KEYS[0])  # asks the index meanwhile
    t0 = time.monotonic()
    t.close()
    assert time.monotonic() - t0 < 5  # the build stops at the next batch
    assert not (path / hint.HINT_NAME).exists()  # no hint of a map never built
    assert t.get(KEYS[0]) is None  # closed
    monkeypatch.setattr(keydir_build, "hash_of", real)
    with tier(path) as t:
        deadline = time.monotonic() + 30
        while not t._keydir.ready and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.01)
        assert all(t.get(k) == value(k) for k in KEYS)


def test_readers_during_a_background_build_and_frequent_merges_stay_exact(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers overwrite and delete while the map is built in the background and merges its
    changes into the arrays every few changes; readers check every answer."""
    path = tmp_path / "c"
    filled(path)
    (path / hint.HINT_NAME).unlink()
    monkeypatch.setattr(keydir, "_BUILD_AT_ONCE", 10)
    monkeypatch.setattr(keydir, "_MERGE_AT", 4)
    monkeypatch.setattr(keydir_build, "SCAN_BATCH", 7)
    errors: list[str] = []
    #: the last value committed per key (None: deleted), and a lock around (write, record)
    latest: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    guards = {k: threading.Lock() for k in KEYS}
    stop = threading.Event()
    with tier(path) as t:

        def writer(seed: int) -> None:
            n = 0
            while not stop.is_set():
                k = KEYS[(seed * 7 + n * 13) % len(KEYS)]
                with guards[k]:
                    if n % 5 == 0:
                        t.delete(k)
                        latest[k] = None
                    else:
                        v = value(k, f"w{seed}-{n}")
                        assert t.put(k, v, namespace="ns")
                        latest[k] = v
                n += 1

        def reader(seed: int) -> None:
            n = 0
            while not stop.is_set():
                k = KEYS[(seed * 11 + n * 3) % len(KEYS)]
                with guards[k]:  # no write of k meanwhile: the answer must be the latest
                    want = latest[k]
                    got = t.get(k)
                if got != want:
                    errors.append(f"{k}: got {got[:20] if got else got!r}, want {want!r:.40}")
                n += 1

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        threads += [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        time.sleep(3)
        stop.set()
        for th in threads:
            th.join(30)
        assert not errors, errors[:5]
        assert t._keydir is not None and t._keydir.ready
        assert all(t.get(k) == latest[k] for k in KEYS)
    with tier(path) as t:  # the hint of the merged map
        assert all(t.get(k) == latest[k] for k in KEYS)


def test_learnt_answers_race_another_process_overwriting(tmp_path: pathlib.Path) -> None:
    """Readers make the map ask the index (``forget``) and learn its answers, while another
    process overwrites and deletes the same keys: no read goes back in time, none returns
    another key's bytes, and once the writer is done every key reads its last value (a
    learnt answer older than a change it missed would stay forever)."""
    path = tmp_path / "c"
    keys = KEYS[:20]
    filled(path, keys)
    rounds = 60
    errors: list[str] = []
    stop = threading.Event()
    with tier(path) as t:
        assert t._keydir is not None and t._keydir.ready
        kd = t._keydir

        def reader(seed: int) -> None:
            seen = dict.fromkeys(keys, -1)
            n = 0
            while not stop.is_set():
                k = keys[(seed + n * 7) % len(keys)]
                if n % 2 == 0:
                    kd.forget(hash_of(k))
                got = t.get(k)
                n += 1
                if got is None:
                    continue
                if not got.startswith(f"<{k}|".encode()):
                    errors.append(f"{k}: another key's bytes {got[:30]!r}")
                    continue
                tag = got.split(b"|", 1)[1].split(b">", 1)[0]
                r = -1 if tag == b"v1" else int(tag[1:])
                if r < seen[k]:
                    errors.append(f"{k}: went back from round {seen[k]} to {r}")
                seen[k] = max(seen[k], r)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        try:
            in_another_process(
                path,
                f"keys = {keys!r}\n"
                f"for r in range({rounds}):\n"
                "    for i, k in enumerate(keys):\n"
                "        if (r + i) % 9 == 0:\n"
                "            t.delete(k)\n"
                "        else:\n"
                "            assert t.put(k, (f'<{k}|r{r}>'.encode()) * 20, namespace='ns')\n",
            )
        finally:
            stop.set()
            for th in threads:
                th.join(30)
        assert not errors, errors[:5]
        last = rounds - 1
        for i, k in enumerate(keys):
            want = None if (last + i) % 9 == 0 else f"<{k}|r{last}>".encode() * 20
            assert t.get(k) == want, k
            assert t.might_contain(k) == (want is not None)


def test_the_change_log_stays_bounded_with_short_lived_processes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each tier prunes the log every AUTO_PRUNE_EVERY (4,096) stores of its own: processes
    that each store fewer (workers, scripts) or only delete, evict or compact would let it
    grow without bound (a row per change). Closing prunes it too."""
    path = tmp_path / "c"
    monkeypatch.setattr(rows, "CHANGES_KEPT", 20)
    monkeypatch.setattr(rows, "CHANGES_KEPT_PER_ENTRY", 0)
    for i in range(30):
        with tier(path) as t:
            assert all(t.put_many([Fill(f"w{i}/{j}", b"x" * 10) for j in range(10)]))
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        logged = conn.execute("SELECT count(*) FROM changes").fetchone()[0]
    assert logged <= 20 + 10
    with tier(path) as t:  # and the hint of the last close still serves
        assert t._keydir is not None and t._keydir.ready
        assert t.get("w29/9") == b"x" * 10 and t.get("w0/0") == b"x" * 10
        assert t.index_lookups == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_fork_while_another_thread_asks_the_map_does_not_hang_the_child(
    tmp_path: pathlib.Path,
) -> None:
    """Every read takes the map's lock: a fork() while another thread holds it (a read in
    progress, a merge, a hint being written at close) copies it held. The child never uses
    the map (its connection is the parent's): it must not wait for that lock either."""
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t:
        assert t._keydir is not None and t._keydir.ready
        held, release = threading.Event(), threading.Event()

        def hold() -> None:  # a reader in the middle of find(), as the fork happens
            with t._keydir._lock:  # type: ignore[union-attr]
                held.set()
                release.wait(30)

        th = threading.Thread(target=hold)
        th.start()
        assert held.wait(10)
        try:

            def child() -> None:
                import faulthandler

                faulthandler.dump_traceback_later(10, exit=True)  # a hang: exit 1
                assert t.get(KEYS[0]) == value(KEYS[0])
                assert t.might_contain(KEYS[0])
                assert t.get("ns/v/c/absent") is None

            with pytest.warns(DeprecationWarning, match="multi-threaded"):
                status = forked(child)
        finally:
            release.set()
            th.join(10)
        assert status == 0
        assert t.get(KEYS[0]) == value(KEYS[0])


def test_building_the_map_from_the_rows_holds_no_python_int_per_field(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map takes 25 bytes an entry; its build from the rows held five lists of Python
    ints (~200 bytes an entry at the peak: 2 GB for ten million entries)."""
    import tracemalloc

    path = tmp_path / "c"
    with tier(path) as t:
        assert t.put("x", b"y")
    n = 50_000
    with contextlib.closing(sqlite3.connect(path / "index.db", isolation_level=None)) as conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO entries(key, namespace, kind, size, created, last_access, checksum, "
            "token, segment, offset) VALUES (?, 'ns', 'chunk', 1000, 0, 0, 0, 0, "
            "'1-0123456789abcdef.seg', ?)",
            ((f"ns/var/c/{i}.0.0", i * 1100) for i in range(n)),
        )
        conn.execute("COMMIT")
    monkeypatch.setattr(keydir_build, "SCAN_BATCH", 1000)  # (the rows of a batch: apart)
    conn, _ = keydir_build.connect(str(path / "index.db"))
    try:
        tracemalloc.start()
        try:
            built = keydir_build.scan(conn, lambda: False)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        conn.close()
    assert built is not None and len(built.arrays.hashes) == n + 1
    assert peak / n < 120, peak / n


def test_processes_writing_deleting_compacting_and_evicting_leave_the_map_exact(
    tmp_path: pathlib.Path,
) -> None:
    """Two other processes put, overwrite, delete, delete by prefix, compact and evict the
    same keys while this one reads through its map; then every answer of the map (and of a
    map loaded from the hint) is the index's, as a tier without a map reads it."""
    path = tmp_path / "c"
    keys = [f"s/{i % 7}/{i}" for i in range(120)]
    filled(path, keys)
    errors: list[str] = []
    stop = threading.Event()
    writer = (
        "import random, time\n"
        f"keys = {keys!r}\n"
        "rnd = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 0)\n"
        "end = time.monotonic() + 4\n"
        "n = 0\n"
        "while time.monotonic() < end:\n"
        "    k = rnd.choice(keys)\n"
        "    op = rnd.random()\n"
        "    if op < 0.6:\n"
        "        t.put(k, (f'<{k}|p{n}>'.encode()) * rnd.randint(1, 40), namespace='ns')\n"
        "    elif op < 0.8:\n"
        "        t.delete(k)\n"
        "    elif op < 0.85:\n"
        "        t.delete_prefix(f's/{rnd.randint(0, 6)}/')\n"
        "    elif op < 0.9:\n"
        "        t.compact()\n"
        "    elif op < 0.95:\n"
        "        t.evict(t.used_bytes() // 2)\n"
        "    else:\n"
        "        t.put(k, b'F' * 70000 + k.encode(), namespace='ns')\n"  # a file of its own
        "    n += 1\n"
    )
    with tier(path) as t:

        def reader(seed: int) -> None:
            n = 0
            while not stop.is_set():
                k = keys[(seed * 31 + n * 17) % len(keys)]
                got = t.get(k)
                n += 1
                if got is not None and not (
                    got.startswith(f"<{k}|".encode()) or got.endswith(k.encode())
                ):
                    errors.append(f"{k}: another key's bytes {got[:30]!r}")

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        script = (
            "import sys\nfrom xarray_zcache.cache.disk import DiskTier\n"
            f"t = DiskTier({str(path)!r}, 1 << 30)\n{writer}t.close()\n"
        )
        procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env) for i in (1, 2)]
        try:
            assert all(p.wait(120) == 0 for p in procs)
        finally:
            stop.set()
            for th in threads:
                th.join(30)
        assert not errors, errors[:5]
        ref = DiskTier(path, 1 << 30, location_map=False)
        try:
            for k in keys:
                assert t.get(k) == ref.get(k), k
                assert t.might_contain(k) == ref.might_contain(k), k
        finally:
            ref.close()
    with tier(path) as t, contextlib.closing(DiskTier(path, 1 << 30, location_map=False)) as ref:
        assert t._keydir is not None and t._keydir.ready
        for k in keys:
            assert t.get(k) == ref.get(k), k


def test_zcache_clear_and_namespace_and_expiry_drops_in_another_process(
    tmp_path: pathlib.Path,
) -> None:
    """``zcache clear`` (the CLI, in its own process), ``delete_namespace`` and
    ``drop_expired`` elsewhere: the records stay intact in their segments (and open in this
    process's descriptor cache); the map must never serve them again."""
    path = tmp_path / "c"
    now = time.time()
    with tier(path) as t:
        assert all(t.put_many([Fill(k, value(k), namespace="ns") for k in KEYS[:50]]))
        assert all(t.put_many([Fill(k, value(k), namespace="other") for k in KEYS[50:100]]))
        assert t.put("ttl", b"soon", expires=now + 1)
    with tier(path) as t:
        assert all(t.get(k) == value(k) for k in KEYS[:100])
        assert t.get("ttl", now=now) == b"soon"
        in_another_process(
            path, "t.delete_namespace('other')\nimport time\nt.drop_expired(time.time() + 5)"
        )
        assert all(t.get(k) is None for k in KEYS[50:100])
        assert t.get("ttl", now=now) is None  # (the header has not expired at ``now``)
        assert all(t.get(k) == value(k) for k in KEYS[:50])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        subprocess.run(
            [sys.executable, "-m", "xarray_zcache.cli", "clear", str(path)],
            check=True,
            env=env,
            timeout=120,
            capture_output=True,
        )
        assert all(t.get(k) is None for k in KEYS[:100])
        assert not any(t.might_contain(k) for k in KEYS[:100])
    with tier(path) as t:
        assert all(t.get(k) is None for k in KEYS[:100])


def test_an_index_restored_from_a_copy_under_a_running_map_is_followed(
    tmp_path: pathlib.Path,
) -> None:
    """index.db renamed over by an older copy of itself (same epoch, an earlier change):
    the running map follows the file it now finds, as the index does, and the hint it
    leaves (of the copy's history) is used again only while it is that history."""
    path = tmp_path / "c"
    filled(path)
    backup = tmp_path / "index.copy"
    with (
        contextlib.closing(sqlite3.connect(path / "index.db")) as src,
        contextlib.closing(sqlite3.connect(backup)) as dst,
    ):
        src.backup(dst)
    with tier(path) as t:
        assert t.put(KEYS[0], b"after the copy", namespace="ns")
        t.delete(KEYS[1])
        assert t.put("new", b"new")
        assert t.get(KEYS[0]) == b"after the copy"
        with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
            # no frame of the running index's WAL is left to be read over the copy
            assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        os.replace(backup, path / "index.db")
        with contextlib.closing(DiskTier(path, 1 << 30, location_map=False)) as ref:
            for k in [*KEYS[:5], "new"]:
                assert t.get(k) == ref.get(k), k
            # the copy's row of KEYS[1] is back, but its record says "deleted": dropped
            assert t.get(KEYS[1]) is None and t.get(KEYS[2]) == value(KEYS[2])
            assert t.get("new") is None
    with tier(path) as t, contextlib.closing(DiskTier(path, 1 << 30, location_map=False)) as ref:
        for k in [*KEYS[:5], "new"]:
            assert t.get(k) == ref.get(k), k


def test_an_old_writer_overwriting_a_record_with_a_file_is_logged_as_the_file(
    tmp_path: pathlib.Path,
) -> None:
    """A writer of schema 2 (it knows no records) overwrites a row with a new token and a
    payload file of its own, leaving ``segment``/``offset`` as they were; a trigger then
    points the row at the file. Two logged changes follow, the outer update's (still the
    record's location) and the nested one's (the file): the map must end on the file, never
    on the old record (intact, the key's, a value since replaced). That order is SQLite's
    order of firing triggers: this test guards it."""
    from xarray_zcache.cache.disk.format import payload_path

    path, other = tmp_path / "c", tmp_path / "files"
    key = "old/A"
    with DiskTier(other, 1 << 30, segment_threshold=-1) as files:  # files of their own
        assert files.put(key, b"v2 as a file", namespace="ns")
        row = files._conn.execute(  # type: ignore[union-attr]
            "SELECT kind, size, checksum FROM entries WHERE key = ?", (key,)
        ).fetchone()
    digest = hashlib.sha256(key.encode()).hexdigest()
    with tier(path) as t:
        assert t.put(key, b"v1 as a record", namespace="ns")
        assert t.get(key) == b"v1 as a record"
        src, dst = payload_path(str(other), digest, row[0]), payload_path(str(path), digest, row[0])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        with contextlib.closing(sqlite3.connect(path / "index.db", isolation_level=None)) as c:
            c.execute("BEGIN IMMEDIATE")
            c.execute(
                "UPDATE entries SET token = token + 1, kind = ?, size = ?, checksum = ? "
                "WHERE key = ?",
                (*row, key),
            )
            c.execute("COMMIT")
            assert c.execute("SELECT segment FROM entries WHERE key = ?", (key,)).fetchone() == (
                None,
            )
        loc = t._keydir.find(hash_of(key))  # type: ignore[union-attr]
        assert isinstance(loc, Location) and loc.segment is None
        assert t.get(key) == b"v2 as a file"
    with tier(path) as t:
        assert t.get(key) == b"v2 as a file"


def test_two_tiers_of_one_process_on_one_folder_follow_each_other(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "c"
    filled(path, KEYS[:20])
    with tier(path) as a, tier(path) as b:
        assert a.get(KEYS[0]) == b.get(KEYS[0]) == value(KEYS[0])
        for i in range(20):
            assert a.put(KEYS[i], value(KEYS[i], "a"), namespace="ns")
            assert b.get(KEYS[i]) == value(KEYS[i], "a")
            b.delete(KEYS[i])
            assert a.get(KEYS[i]) is None and not a.might_contain(KEYS[i])
        b.compact()
        assert b.put("b/only", b"b")
        assert a.get("b/only") == b"b"
