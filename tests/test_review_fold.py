"""Review of the background fold of the location map (``keydir.py``, ``keydir_build.py``):
attacks on the fold's install racing newer changes, ``learn``, ``forget``, drops, rebuilds,
``save`` and ``close``; folds that fail; segment names; hints written while changes arrive;
fork(); and many folds in a row beside a writer in another process.

The guarantee under attack: a read through the map never returns bytes other than the
latest committed value of the key (a miss or an index look-up is acceptable), and readers
never wait for a fold. Races are driven by gates in ``keydir_build.fold`` (real files, real
SQLite, real processes; nothing of the storage is mocked).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest
from keydir_helpers import KEYS, filled, forked, in_another_process, tier, value

from xarray_zcache.cache.disk import DiskTier, hint, keydir, keydir_build
from xarray_zcache.cache.disk.format import KINDS
from xarray_zcache.cache.disk.locations import ABSENT, ASK, Location, hash_of
from xarray_zcache.cache.disk.segments import SEGMENT_THRESHOLD, segment_path

FOLD_THREAD = "zcache-location-map-fold"
BUILD_THREAD = "zcache-location-map"
#: the name of the threads a test runs ``save`` in (their fold is gated separately)
SAVER = "review-saver"
REAL_FOLD = keydir_build.fold
REAL_SCAN = keydir_build.scan


class Hooks:
    """Every fold goes through :meth:`fold`: a fold thread waits for :attr:`fold_open`
    (then sleeps :attr:`delay` and raises :attr:`fail` if set); a fold in a :data:`SAVER`
    thread (a hint being written) waits for :attr:`save_open`; a fold in any other thread
    than a fold thread (a hint written by ``save`` or ``close``) raises :attr:`fail_hints`
    if set."""

    def __init__(self) -> None:
        self.fold_open = threading.Event()
        self.fold_waiting = threading.Event()
        self.save_open = threading.Event()
        self.save_open.set()
        self.save_waiting = threading.Event()
        self.fail: type[Exception] | None = None
        self.fail_once = True
        self.fail_hints: type[Exception] | None = None
        self.delay = 0.0
        self.fold_calls = 0

    def fold(
        self, arrays: hint.Arrays, changes: Mapping[int, Location | str], segments: Sequence[str]
    ) -> tuple[hint.Arrays, list[str]]:
        name = threading.current_thread().name
        if name != FOLD_THREAD and self.fail_hints is not None:
            raise self.fail_hints("a hint's fold failing (injected)")
        if name == FOLD_THREAD:
            self.fold_calls += 1
            self.fold_waiting.set()
            if not self.fold_open.wait(30):
                raise TimeoutError("the fold gate was never opened")
            if self.delay:
                time.sleep(self.delay)
            fail = self.fail
            if fail is not None:
                if self.fail_once:
                    self.fail = None
                raise fail("a fold failing (injected)")
        elif name.startswith(SAVER):
            self.save_waiting.set()
            if not self.save_open.wait(30):
                raise TimeoutError("the save gate was never opened")
        return REAL_FOLD(arrays, changes, segments)

    def open_all(self) -> None:
        self.fold_open.set()
        self.save_open.set()


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hooks]:
    """Folds through :class:`Hooks` (gates closed); more than max(4, entries / 8) changes
    start a fold (25 for the 200 KEYS)."""
    h = Hooks()
    monkeypatch.setattr(keydir, "_MERGE_AT", 4)
    monkeypatch.setattr(keydir_build, "fold", h.fold)
    yield h
    h.open_all()


def _wait_for(check: Callable[[], object], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _kd(t: DiskTier) -> keydir.KeyDir:
    kd = t._keydir
    assert kd is not None and kd.ready
    return kd


def _row(conn: sqlite3.Connection, key: str) -> Location | str:
    """Where the index says ``key`` is (as the map would hold it), or ABSENT."""
    row = conn.execute(keydir_build._SCAN + " WHERE key = ?", (key,)).fetchone()
    if row is None:
        return ABSENT
    _key, kind, segment, offset, length = row
    held = keydir._location(kind, segment, offset, length)
    return held if isinstance(held, str) else Location(*held)


def _rows(path: pathlib.Path, keys: Sequence[str]) -> dict[str, Location | str]:
    with contextlib.closing(sqlite3.connect(path / "index.db")) as conn:
        return {k: _row(conn, k) for k in keys}


def _assert_map_exact(kd: keydir.KeyDir, path: pathlib.Path, keys: Sequence[str]) -> None:
    """Every answer of the map for ``keys`` is the index's (segment names included), or ask."""
    for k, want in _rows(path, keys).items():
        got = kd.find(hash_of(k))
        assert got is ASK or got == want, (k, got, want)


def _round_at(path: pathlib.Path, key: str, at: Location) -> int | None:
    """The round tag of the record at ``at``, read raw (a replaced record still holds its
    old bytes, marked deleted: read through the tier it would be a miss, here it is the
    round of a stale answer); None if its segment is gone."""
    assert at.segment is not None
    try:
        with open(segment_path(str(path), at.segment), "rb") as f:
            raw = os.pread(f.fileno(), at.length, at.offset)
    except FileNotFoundError:
        return None
    start = raw.find(f"<{key}|".encode())
    assert start >= 0, (key, at, raw[:80])
    tag = raw[start:].split(b"|", 1)[1].split(b">", 1)[0]
    return -1 if tag == b"v1" else int(tag[1:])


def _assert_reads(t: DiskTier, expected: Mapping[str, bytes | None]) -> None:
    for k, v in expected.items():
        assert t.get(k) == v, k


def _writer(path: pathlib.Path) -> DiskTier:
    """Another tier on ``path`` without a map (its close writes no hint over ours)."""
    return DiskTier(path, 1 << 30, segment_threshold=SEGMENT_THRESHOLD, location_map=False)


def _put(writer: DiskTier, expected: dict[str, bytes | None], key: str, tag: str) -> None:
    """``writer`` overwrites ``key`` with its value of ``tag``, now ``expected``."""
    expected[key] = value(key, tag)
    assert writer.put(key, value(key, tag), namespace="ns")


def _start_fold(t: DiskTier, writer: DiskTier, hooks: Hooks, tag: str, n: int = 40) -> None:
    """``writer`` overwrites KEYS[:n] with ``tag``; ``t`` applies them: a fold starts and
    waits at the gate."""
    for k in KEYS[:n]:
        assert writer.put(k, value(k, tag), namespace="ns")
    assert t.get(KEYS[0]) == value(KEYS[0], tag)
    kd = _kd(t)
    _wait_for(lambda: hooks.fold_waiting.is_set() and kd._frozen, "a fold started")


# ---------------------------------------------------------------------- failing folds


def test_a_failed_fold_gives_its_changes_back_under_the_newer_ones(
    tmp_path: pathlib.Path, hooks: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fold fails after newer changes of some of its keys arrived (overwrites, deletes, a
    forget): its changes go back, the newer ones winning; none is lost; the next changes
    fold everything."""
    monkeypatch.setattr(keydir, "_RETRY_S", 0.0)
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    with tier(path) as t, _writer(path) as writer:
        kd = _kd(t)
        _start_fold(t, writer, hooks, "v2")
        expected.update({k: value(k, "v2") for k in KEYS[:40]})
        frozen = set(kd._frozen)
        for i, k in enumerate(KEYS[30:50]):
            if i % 3 == 0:
                writer.delete(k)
                expected[k] = None
            else:
                _put(writer, expected, k, "v3")
        kd.forget(hash_of(KEYS[1]))
        kd.sync()
        hooks.fail = ValueError
        hooks.fold_open.set()
        _wait_for(lambda: kd._folding is None and not kd._frozen, "the failed fold ended")
        assert kd.folds == 0
        assert frozen <= set(kd._changes)  # given back
        assert kd.find(hash_of(KEYS[1])) is ASK  # the newer forget won
        assert kd.find(hash_of(KEYS[30])) is ABSENT  # the newer delete won
        _assert_reads(t, expected)
        assert t.index_lookups == 1  # KEYS[1], forgotten
        _assert_map_exact(kd, path, KEYS)
        for k in KEYS[100:130]:
            _put(writer, expected, k, "v4")
        _folded(kd, t, path, expected, 1, "the next fold installed")
    with tier(path) as t:
        _assert_reads(t, expected)


def test_a_fold_failing_with_an_unexpected_error_does_not_stop_folding(
    tmp_path: pathlib.Path, hooks: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fold raising something else than MemoryError, ValueError or TypeError (here a
    RuntimeError) must not leave the map with a dead fold thread registered and its changes
    frozen for good: no fold would ever start again, the dicts growing without bound."""
    monkeypatch.setattr(keydir, "_RETRY_S", 0.0)
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    with tier(path) as t, _writer(path) as writer:
        kd = _kd(t)
        _start_fold(t, writer, hooks, "v2")
        expected.update({k: value(k, "v2") for k in KEYS[:40]})
        hooks.fail = RuntimeError
        hooks.fold_open.set()
        _wait_for(lambda: kd._folding is None, "the failed fold let go", timeout=3)
        assert not kd._frozen and len(kd._changes) >= 40
        _assert_reads(t, expected)
        for k in KEYS[100:130]:
            _put(writer, expected, k, "v3")
        kd.sync()
        _wait_for(lambda: kd.folds >= 1 and kd._folding is None, "a fold installed", timeout=3)
        _assert_reads(t, expected)
        _assert_map_exact(kd, path, KEYS)


def test_a_fold_that_keeps_failing_is_not_retried_in_a_loop(
    tmp_path: pathlib.Path, hooks: Hooks
) -> None:
    """A fold that fails every time (memory short) must not be started again at once by
    the failed one, over and over (a busy loop of threads copying the dict), while answers
    stay exact from the dict."""
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t, _writer(path) as writer:
        kd = _kd(t)
        _start_fold(t, writer, hooks, "v2")
        hooks.fail, hooks.fail_once = MemoryError, False
        hooks.fold_open.set()
        time.sleep(0.5)
        assert hooks.fold_calls <= 2, f"{hooks.fold_calls} folds started in 0.5 s"
        assert kd._folding is None and not kd._frozen and len(kd._changes) >= 40
        _assert_reads(t, {k: value(k, "v2") for k in KEYS[:40]})
        _assert_reads(t, {k: value(k) for k in KEYS[40:]})
        assert t.index_lookups == 0
        hooks.fail = None  # (close waits for a fold in flight)


def test_a_hint_whose_fold_fails_is_not_written_and_close_still_closes(
    tmp_path: pathlib.Path, hooks: Hooks
) -> None:
    """The fold of a hint being written (``save``, ``close``) runs out of memory: ``save``
    says it wrote nothing (no exception into the maintenance that called it), and the
    tier's ``close`` still closes the index and lets go of the map; the next tier maps the
    index again (an older hint and the log, or the rows) and reads every latest value."""
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    hint_before = (path / hint.HINT_NAME).read_bytes()
    t = tier(path)
    with _writer(path) as writer:
        kd = _kd(t)
        _start_fold(t, writer, hooks, "v2")
        expected.update({k: value(k, "v2") for k in KEYS[:40]})
        writer.delete(KEYS[5])
        expected[KEYS[5]] = None
        hooks.fail_hints = MemoryError
        assert t.save_location_map(force=True) is False
        _assert_reads(t, expected)
        hooks.fold_open.set()
        _wait_for(lambda: kd.folds >= 1 and kd._folding is None, "the fold installed")
        t.close()
        assert t._index.closed and not kd.ready and kd._conn is None
        assert (path / hint.HINT_NAME).read_bytes() == hint_before
    hooks.fail_hints = None
    with tier(path) as t:
        _wait_for(lambda: t._keydir is not None and t._keydir.ready, "mapped again")
        _assert_reads(t, expected)


def _folded(
    kd: keydir.KeyDir,
    t: DiskTier,
    path: pathlib.Path,
    expected: dict[str, bytes | None],
    folds: int,
    what: str,
) -> None:
    """Apply what was logged, wait until ``folds`` folds have been installed, and check
    every read and every answer of the map. (At least: any commit, the access statistics'
    included, makes the next answer apply the log, which starts a fold whenever the
    changes are many, as after a failed fold gives its changes back.)"""
    kd.sync()
    _wait_for(lambda: kd.folds >= folds and kd._folding is None, what)
    _assert_reads(t, expected)
    _assert_map_exact(kd, path, KEYS)


def _refuse_threads(monkeypatch: pytest.MonkeyPatch, name: str) -> list[bool]:
    """Threads named ``name`` cannot be started (``can't start new thread``: too many
    threads, memory short) while the returned flag's item is true."""
    real_start = threading.Thread.start
    refuse = [True]

    def start(self: threading.Thread) -> None:
        if self.name == name and refuse[0]:
            raise RuntimeError("can't start new thread (injected)")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    return refuse


def test_no_thread_for_a_fold_fails_no_read_and_loses_no_change(
    tmp_path: pathlib.Path, hooks: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fold's thread cannot be started (``can't start new thread``: too many threads,
    memory short) when the changes applied by a read pass the threshold: that read must
    not raise, the changes stay in the map, folding resumes once threads can be had, and
    ``close`` (which joins the fold) still closes."""
    monkeypatch.setattr(keydir, "_RETRY_S", 0.0)
    hooks.fold_open.set()
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    with tier(path) as t, _writer(path) as writer:
        kd = _kd(t)
        refuse = _refuse_threads(monkeypatch, FOLD_THREAD)
        for k in KEYS[:40]:
            _put(writer, expected, k, "v2")
        _assert_reads(t, expected)
        assert kd.folds == 0 and len(kd._changes) + len(kd._frozen) >= 40
        assert t.index_lookups == 0
        refuse[0] = False
        for k in KEYS[100:110]:
            _put(writer, expected, k, "v3")
        _folded(kd, t, path, expected, 1, "a fold installed")
    with tier(path) as t:
        _assert_reads(t, expected)


def test_no_thread_for_a_build_fails_no_read(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefix delete drops the map while no thread can be started for the build: the
    read that finds the drop must not raise (it asks the index), and the map is built
    again once threads can be had."""
    monkeypatch.setattr(keydir, "_RETRY_S", 0.0)
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    with tier(path) as t, _writer(path) as writer:
        kd = _kd(t)
        refuse = _refuse_threads(monkeypatch, BUILD_THREAD)
        assert writer.delete_prefix("ns/v/c/19") == 11
        expected.update({k: None for k in KEYS if k.startswith("ns/v/c/19")})
        _assert_reads(t, expected)
        assert not kd.ready and kd._building is None
        refuse[0] = False
        assert t.get(KEYS[0]) == expected[KEYS[0]]
        _wait_for(lambda: kd.ready, "built again")
        _assert_reads(t, expected)
        _assert_map_exact(kd, path, KEYS)


# ---------------------------------------------------------------------- install races


def test_forget_and_learn_during_a_fold_win_over_its_install(
    tmp_path: pathlib.Path, hooks: Hooks
) -> None:
    """While a fold waits: a folded key is forgotten (ask), another forgotten then learnt
    from the index, a stale learn (its mark older than an applied change) is offered. After
    the install the forget and the learn still stand, the stale learn never did, and every
    answer is the index's."""
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    with tier(path) as t, _writer(path) as writer:
        kd = _kd(t)
        _start_fold(t, writer, hooks, "v2")
        expected.update({k: value(k, "v2") for k in KEYS[:40]})
        h1, h2, h3 = (hash_of(k) for k in KEYS[1:4])
        assert h1 in kd._frozen and h2 in kd._frozen and h3 in kd._frozen
        kd.forget(h1)
        kd.forget(h2)
        assert t.get(KEYS[2]) == expected[KEYS[2]]  # asks the index, learns its answer
        learnt = kd._changes[h2]
        assert isinstance(learnt, tuple)  # (a location, as the map holds it)
        old = kd.find(h3)
        assert isinstance(old, Location)
        mark = kd.mark()
        _put(writer, expected, KEYS[3], "v3")
        kd.sync()
        kd.learn(h3, mark, old)  # the index's answer from before the overwrite: refused
        assert kd.find(h3) != old
        hooks.fold_open.set()
        _wait_for(lambda: kd.folds >= 1 and kd._folding is None, "the fold installed")
        assert kd.find(h1) is ASK
        assert kd.find(h2) == Location(*learnt) == _rows(path, [KEYS[2]])[KEYS[2]]
        assert kd.find(h3) != old
        _assert_map_exact(kd, path, KEYS)
        _assert_reads(t, expected)  # (KEYS[1] asks the index: learnt again)
        _assert_map_exact(kd, path, KEYS)
    with tier(path) as t:  # the hint
        _assert_reads(t, expected)
        _assert_map_exact(_kd(t), path, KEYS)


def test_a_fold_of_a_map_rebuilt_meanwhile_never_mixes_segment_names(
    tmp_path: pathlib.Path, hooks: Hooks
) -> None:
    """The waiting fold holds changes into the writer's new segment (a name the fold
    appends); meanwhile the map is dropped (prefix delete), built again from the rows
    (other segment codes), and more changes arrive, some wanting a fold of their own. The
    old fold ends void; the next one installs; every location's segment name is the row's."""
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    with tier(path) as t, _writer(path) as writer:
        kd = _kd(t)
        names = list(kd._segments)
        _start_fold(t, writer, hooks, "v2")
        expected.update({k: value(k, "v2") for k in KEYS[:40]})
        new_names = {c[1] for c in kd._frozen.values() if isinstance(c, tuple)} - set(names)
        assert new_names, "the writer's segment is new to the map"
        incarnation, builds = kd._incarnation, kd.builds
        assert writer.delete_prefix("ns/v/c/19") == 11
        expected.update({k: None for k in KEYS if k.startswith("ns/v/c/19")})
        assert t.get(KEYS[19]) is None
        _wait_for(lambda: kd.ready and kd.builds > builds, "the map built again")
        assert kd._incarnation >= incarnation + 2
        for k in KEYS[40:120]:
            if not k.startswith("ns/v/c/19"):
                _put(writer, expected, k, "v3")
        kd.sync()
        assert kd._folding is not None and not kd._frozen  # the old fold holds the slot
        _assert_reads(t, expected)
        hooks.fold_open.set()
        _wait_for(lambda: kd._folding is None, "the old fold ended")
        assert kd.folds == 0
        _assert_map_exact(kd, path, KEYS)
        for k in KEYS[120:190]:
            _put(writer, expected, k, "v4")
        kd.sync()
        _wait_for(lambda: kd.folds >= 1 and kd._folding is None, "a fold installed")
        _assert_map_exact(kd, path, KEYS)
        _assert_reads(t, expected)
        assert writer.compact() >= 0
        _assert_map_exact(kd, path, KEYS)
        _assert_reads(t, expected)


# ---------------------------------------------------------------------- hints


def test_a_hint_written_while_changes_arrive_is_the_state_as_of_its_seq(
    tmp_path: pathlib.Path, hooks: Hooks
) -> None:
    """``save`` takes its snapshot, then waits (its fold gated) while another tier
    overwrites, deletes, adds and compacts, and the map folds meanwhile. The hint holds
    exactly the rows as of its seq (a forgotten key as ask, a learnt one where the index
    said), nothing newer; a new tier loading that very hint replays from seq + 1 and reads
    every latest value."""
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    extra = [f"ns/v/new/{i}" for i in range(20)]
    expected.update(dict.fromkeys(extra))
    with tier(path) as t, _writer(path) as writer:
        kd = _kd(t)
        for k in KEYS[:20]:
            _put(writer, expected, k, "v2")
        writer.delete(KEYS[20])
        expected[KEYS[20]] = None
        kd.sync()  # (a change applied after a forget overrides it)
        kd.forget(hash_of(KEYS[3]))  # ask, in the hint
        kd.forget(hash_of(KEYS[4]))
        assert t.get(KEYS[4]) == expected[KEYS[4]]  # learnt from the index, in the hint
        assert isinstance(kd._changes[hash_of(KEYS[4])], tuple)  # (a location)
        hooks.fold_open.set()
        hooks.save_open.clear()
        result: list[bool] = []
        saver = threading.Thread(
            target=lambda: result.append(t.save_location_map(force=True)), name=SAVER
        )
        saver.start()
        assert hooks.save_waiting.wait(10)  # the snapshot is taken
        seq = kd._seq
        at_seq = _rows(path, KEYS + extra)
        # newer than the snapshot: overwrites, deletes, new keys, a compaction, folds
        for i, k in enumerate(KEYS[:80]):
            if i % 4 == 0:
                writer.delete(k)
                expected[k] = None
            else:
                _put(writer, expected, k, "v3")
        for k in extra:
            _put(writer, expected, k, "new")
        writer.compact()
        kd.sync()
        _wait_for(lambda: kd.folds >= 1 and kd._folding is None, "a fold installed meanwhile")
        _assert_reads(t, expected)
        hooks.save_open.set()
        saver.join(10)
        assert result == [True]
        saved = hint.read(str(path))
        assert saved is not None and saved.seq == seq
        a = saved.arrays
        held = {
            int(a.hashes[i]): (
                ASK
                if int(a.kinds[i]) == keydir_build.ASK_CODE
                else (
                    int(a.kinds[i]),
                    None if int(a.segments[i]) == -1 else saved.segments[int(a.segments[i])],
                    int(a.offsets[i]),
                    int(a.lengths[i]),
                )
            )
            for i in range(len(a.hashes))
        }
        for k, want in at_seq.items():
            h = hash_of(k)
            if want is ABSENT:
                assert h not in held, k
            elif k == KEYS[3]:
                assert held[h] is ASK
            else:
                assert isinstance(want, Location)
                code = KINDS.index(want.kind)
                assert held[h] == (code, want.segment, want.offset, want.length), k
        assert len(held) == sum(want is not ABSENT for want in at_seq.values())
        kept = tmp_path / "hint-at-seq"
        shutil.copy(path / hint.HINT_NAME, kept)
    shutil.copy(kept, path / hint.HINT_NAME)  # (the close wrote a newer one)
    with tier(path) as t:
        kd = _kd(t)
        assert kd.builds == 0 and kd._saved == (saved.epoch, seq)
        _assert_reads(t, expected)
        _assert_map_exact(kd, path, KEYS + extra)


def test_a_save_in_flight_across_a_drop_and_an_older_hint_over_a_newer_one(
    tmp_path: pathlib.Path, hooks: Hooks
) -> None:
    """A ``save`` takes its snapshot and waits; meanwhile a prefix delete drops this map
    (built again from the rows) and a second tier of this process writes a newer hint.
    The first save then writes its older hint over the newer one: a new tier loading it
    replays the log from its seq, meets the prefix delete, maps the rows again, and reads
    every latest value; this tier's close still writes its newer state."""
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    hooks.fold_open.set()
    with tier(path) as t, tier(path) as t2, _writer(path) as writer:
        kd, kd2 = _kd(t), _kd(t2)
        for k in KEYS[:10]:
            _put(writer, expected, k, "v2")
        kd.sync()
        hooks.save_open.clear()
        result: list[bool] = []
        saver = threading.Thread(
            target=lambda: result.append(t.save_location_map(force=True)), name=SAVER
        )
        saver.start()
        assert hooks.save_waiting.wait(10)
        seq, builds = kd._seq, kd.builds
        assert writer.delete_prefix("ns/v/c/19") == 11
        expected.update({k: None for k in KEYS if k.startswith("ns/v/c/19")})
        for k in KEYS[20:30]:
            _put(writer, expected, k, "v3")
        assert t.get(KEYS[19]) is None
        _wait_for(lambda: kd.ready and kd.builds > builds, "the map built again")
        builds2 = kd2.builds
        assert t2.get(KEYS[19]) is None
        _wait_for(lambda: kd2.ready and kd2.builds > builds2, "the second map built again")
        try:
            assert t2.save_location_map(force=True)
            newer = hint.read(str(path))
        finally:
            hooks.save_open.set()
        assert newer is not None and newer.seq > seq
        saver.join(10)
        assert result == [True]
        older = hint.read(str(path))
        assert older is not None and older.seq == seq  # the older one, over the newer
        assert kd2.ready
        with tier(path) as t3:
            kd3 = t3._keydir
            assert kd3 is not None
            _assert_reads(t3, expected)
            _wait_for(lambda: kd3.ready, "mapped again")
            _assert_reads(t3, expected)
            _assert_map_exact(kd3, path, KEYS)
        _assert_reads(t, expected)
        _assert_map_exact(kd, path, KEYS)
    with tier(path) as t:
        assert _kd(t).builds == 0
        _assert_reads(t, expected)


def test_close_timing_out_on_a_fold_writes_every_change_and_voids_the_fold(
    tmp_path: pathlib.Path, hooks: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close`` gives up waiting for a fold that does not end: the hint it writes holds
    the changes being folded and the newer ones; the fold, ending after the close, installs
    nothing into the closed map."""
    monkeypatch.setattr(keydir, "_JOIN_S", 0.2)
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    t = tier(path)
    with _writer(path) as writer:
        kd = _kd(t)
        _start_fold(t, writer, hooks, "v2")
        expected.update({k: value(k, "v2") for k in KEYS[:40]})
        writer.delete(KEYS[5])
        expected[KEYS[5]] = None
        t0 = time.monotonic()
        t.close()
        assert time.monotonic() - t0 < 5
        fold = kd._folding
        assert fold is not None and fold.is_alive()
        hooks.fold_open.set()
        fold.join(10)
        assert not fold.is_alive()
        assert kd.folds == 0 and not kd.ready and len(kd._arrays.hashes) == 0
        assert kd._conn is None and kd._folding is None
    with tier(path) as t:
        assert _kd(t).builds == 0
        _assert_reads(t, expected)
        assert t.index_lookups == 0


# ---------------------------------------------------------------------- builds and close


def test_close_timing_out_on_a_build_installs_nothing_after_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background build that has scanned the rows waits past ``close``'s join: it must
    not install the map into the closed one (nor leave its connection open)."""
    path = tmp_path / "c"
    filled(path)
    (path / hint.HINT_NAME).unlink()
    monkeypatch.setattr(keydir, "_BUILD_AT_ONCE", 10)
    monkeypatch.setattr(keydir, "_JOIN_S", 0.2)
    scanned, go = threading.Event(), threading.Event()
    conns: list[sqlite3.Connection] = []

    def scan(conn: sqlite3.Connection, stopped: Callable[[], bool]) -> hint.Hint | None:
        built = REAL_SCAN(conn, stopped)
        conns.append(conn)
        scanned.set()
        assert go.wait(30)
        return built

    monkeypatch.setattr(keydir_build, "scan", scan)
    t = tier(path)
    kd = t._keydir
    assert kd is not None and not kd.ready
    assert scanned.wait(10)
    building = kd._building
    assert building is not None
    t0 = time.monotonic()
    t.close()
    assert time.monotonic() - t0 < 5
    go.set()
    building.join(10)
    assert not building.is_alive()
    assert not kd.ready and kd._conn is None and kd.builds == 0
    with pytest.raises(sqlite3.ProgrammingError):
        conns[0].execute("SELECT 1")  # closed
    assert not (path / hint.HINT_NAME).exists()


def test_close_does_not_wait_for_a_build_reporting_damage(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background build finds the index damaged as the tier closes: it reports it to the
    tier, which needs the index's lock; ``close`` holds that lock while it joins the build.
    The build is done with the map (it installs nothing): close must not wait out its whole
    join timeout (30 s) for it."""
    path = tmp_path / "c"
    filled(path)
    (path / hint.HINT_NAME).unlink()
    monkeypatch.setattr(keydir, "_BUILD_AT_ONCE", 10)
    monkeypatch.setattr(keydir, "_JOIN_S", 5.0)
    waiting, go = threading.Event(), threading.Event()

    def scan(conn: sqlite3.Connection, stopped: Callable[[], bool]) -> hint.Hint | None:
        if threading.current_thread().name == BUILD_THREAD:
            waiting.set()
            assert go.wait(30)
            raise keydir_build.Damaged("rows out of key order (injected)")
        return REAL_SCAN(conn, stopped)

    monkeypatch.setattr(keydir_build, "scan", scan)
    t = tier(path)
    kd = t._keydir
    assert kd is not None and waiting.wait(10)
    building = kd._building
    assert building is not None

    def release_when_closing() -> None:
        _wait_for(lambda: kd._closed, "close began")
        time.sleep(0.05)  # (close is joining, the index's lock held)
        go.set()

    releaser = threading.Thread(target=release_when_closing)
    releaser.start()
    t0 = time.monotonic()
    t.close()
    took = time.monotonic() - t0
    releaser.join(10)
    building.join(10)
    assert took < 2.5, f"close waited {took:.1f} s for a build that was done"
    assert not kd.ready and kd.builds == 0
    monkeypatch.setattr(keydir_build, "scan", REAL_SCAN)
    with tier(path) as t:
        _wait_for(lambda: t._keydir is not None and t._keydir.ready, "mapped again")
        _assert_reads(t, {k: value(k) for k in KEYS})


# ---------------------------------------------------------------------- fork


def test_a_fork_during_a_fold_and_a_save_leaves_the_child_clear_of_both(
    tmp_path: pathlib.Path, hooks: Hooks
) -> None:
    """fork() while a fold waits, a hint is being written (its lock held) and another thread
    holds the map's lock: the child asks the index for everything, writes no hint, folds
    nothing and closes at once; the parent's fold and hint go on unharmed."""
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    with tier(path) as t, _writer(path) as writer:
        kd = _kd(t)
        _start_fold(t, writer, hooks, "v2")
        expected.update({k: value(k, "v2") for k in KEYS[:40]})
        hooks.save_open.clear()
        saver = threading.Thread(target=lambda: t.save_location_map(force=True), name=SAVER)
        saver.start()
        assert hooks.save_waiting.wait(10)
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with kd._lock:
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(10)
        hint_before = (path / hint.HINT_NAME).read_bytes()
        try:

            def child() -> None:
                import faulthandler

                faulthandler.dump_traceback_later(10, exit=True)  # a hang: exit 1
                h = hash_of(KEYS[0])
                assert kd.find(h) is ASK
                assert kd.save(force=True) is False
                kd.forget(h)
                kd.learn(h, kd.mark(), Location("chunk", None, 0, 1))
                kd.sync()
                assert t.get(KEYS[0]) == value(KEYS[0], "v2")  # through the index
                assert t.get(KEYS[199]) == value(KEYS[199])
                assert t.save_location_map(force=True) is False
                t0 = time.monotonic()
                t.close()
                assert time.monotonic() - t0 < 5

            with pytest.warns(DeprecationWarning, match="multi-threaded"):
                status = forked(child)
        finally:
            release.set()
            holder.join(10)
        assert status == 0
        assert (path / hint.HINT_NAME).read_bytes() == hint_before  # the child wrote none
        hooks.open_all()
        saver.join(10)
        _wait_for(lambda: kd.folds >= 1 and kd._folding is None, "the fold installed")
        _assert_reads(t, expected)
        _assert_map_exact(kd, path, KEYS)
    with tier(path) as t:
        _assert_reads(t, expected)


# ---------------------------------------------------------------------- no pause


def test_readers_do_not_wait_for_a_slow_fold(tmp_path: pathlib.Path, hooks: Hooks) -> None:
    """A fold that takes 1.5 s (a large map) runs while a reader reads every key and
    another tier keeps writing: no read waits anywhere near the fold's time, every read
    is the latest value."""
    hooks.delay = 1.5
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    with tier(path) as t, _writer(path) as writer:
        kd = _kd(t)
        _start_fold(t, writer, hooks, "v2")
        expected.update({k: value(k, "v2") for k in KEYS[:40]})
        hooks.fold_open.set()
        slowest = 0.0
        i = 0
        while kd.folds == 0:
            assert i < 100_000, "the fold never installed"
            k = KEYS[i % len(KEYS)]
            if i % 50 == 0 and i < 1000:  # (fewer than a fold's worth: no second fold)
                _put(writer, expected, KEYS[(i // 50) % len(KEYS)], f"w{i}")
            t0 = time.monotonic()
            got = t.get(k)
            slowest = max(slowest, time.monotonic() - t0)
            assert got == expected[k], k
            i += 1
        assert slowest < 0.75, f"a read waited {slowest:.2f} s"
        assert kd.folds == 1
        _assert_reads(t, expected)


# ---------------------------------------------------------------------- long-running


def test_many_folds_beside_a_writer_process_every_read_is_at_least_the_last_round(
    tmp_path: pathlib.Path, hooks: Hooks
) -> None:
    """Another process writes rounds (40 keys overwritten, 20 overwritten or deleted, now
    and then a prefix delete that drops the map, or a compaction), each followed by a round
    marker; this process folds every 25 changes (each fold slowed),
    forgets keys, saves hints. Readers read the marker (round n), then keys: a key read must
    be of round n or later, and so must the record the map points to, read raw (a stale
    location would mostly cost a look-up: the old record is marked deleted). A miss is
    allowed (a record replaced between the index's answer and its read), but the map never
    says "absent" of the 40 keys always held. At the end every key reads its last value,
    here and in a new tier from the hint."""
    hooks.fold_open.set()
    hooks.delay = 0.002
    path = tmp_path / "c"
    always, sometimes = KEYS[:40], KEYS[40:60]
    filled(path, always + sometimes)
    rounds = 30
    errors: list[str] = []
    stop = threading.Event()
    reads = [0]

    def tag_round(k: str, got: bytes) -> int:
        if not got.startswith(f"<{k}|".encode()):
            errors.append(f"{k}: another key's bytes {got[:30]!r}")
            return 10**9
        tag = got.split(b"|", 1)[1].split(b">", 1)[0]
        return -1 if tag == b"v1" else int(tag[1:])

    with tier(path) as t:
        kd = _kd(t)
        real_find = kd.find
        always_hashes = {hash_of(k): k for k in always}

        def find(h: int) -> Location | str:
            found = real_find(h)
            if found is ABSENT and h in always_hashes:
                errors.append(f"{always_hashes[h]}: the map said absent")
            return found

        kd.find = find  # type: ignore[method-assign]

        def reader(seed: int) -> None:
            n = 0
            while not stop.is_set() and not errors:
                marker = t.get("ns/round")
                at = -1 if marker is None else int(marker)
                for j in range(10):
                    k = (always + sometimes)[(seed * 7 + n * 11 + j) % 60]
                    if (n + j) % 13 == 0:
                        kd.forget(hash_of(k))
                    at_map = real_find(hash_of(k))
                    if isinstance(at_map, Location) and at_map.segment is not None:
                        r = _round_at(path, k, at_map)
                        if r is not None and r < at:
                            errors.append(f"{k}: the map points to round {r} after {at}")
                    got = t.get(k)
                    reads[0] += 1
                    if got is None:
                        continue
                    r = tag_round(k, got)
                    if r < at:
                        errors.append(f"{k}: round {r} read after marker {at}")
                n += 1

        def saver() -> None:
            while not stop.is_set():
                t.save_location_map(force=True)
                time.sleep(0.05)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        threads.append(threading.Thread(target=saver, name=SAVER + "-loop"))
        for th in threads:
            th.start()
        try:
            in_another_process(
                path,
                f"always, sometimes = {always!r}, {sometimes!r}\n"
                f"for r in range({rounds}):\n"
                "    for k in always:\n"
                "        assert t.put(k, (f'<{k}|r{r}>'.encode()) * 20, namespace='ns')\n"
                "    for i, k in enumerate(sometimes):\n"
                "        if (r + i) % 3 == 0:\n"
                "            t.delete(k)\n"
                "        else:\n"
                "            assert t.put(k, (f'<{k}|r{r}>'.encode()) * 20, namespace='ns')\n"
                "    if r % 5 == 2:\n"
                "        t.delete_prefix(f'ns/gone{r}/')\n"  # drops the map: built again
                "    if r % 7 == 3:\n"
                "        t.compact()\n"
                "    assert t.put('ns/round', str(r).encode(), namespace='ns')\n",
            )
        finally:
            stop.set()
            for th in threads:
                th.join(30)
        assert not errors, errors[:5]
        assert reads[0] > 100
        assert kd.folds >= 10, kd.folds
        assert kd.builds >= 2, kd.builds
        last = rounds - 1
        expected: dict[str, bytes | None] = {
            k: f"<{k}|r{last}>".encode() * 20 for k in always + sometimes
        }
        for i, k in enumerate(sometimes):
            if (last + i) % 3 == 0:
                expected[k] = None
        _wait_for(lambda: kd._folding is None, "the last fold ended")
        _assert_reads(t, expected)
        _assert_map_exact(kd, path, always + sometimes)
    with tier(path) as t:
        assert _kd(t).builds == 0
        _assert_reads(t, expected)
