"""The location map folds its changes into the arrays without its lock (``keydir.py``):
answers go on, exact, while a fold runs; a fold of a map dropped meanwhile is not
installed; a hint written during a fold holds every change."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import pytest
from keydir_helpers import KEYS, filled, tier, value

from xarray_zcache.cache.disk import DiskTier, hint, keydir, keydir_build
from xarray_zcache.cache.disk.locations import Change, Location, hash_of
from xarray_zcache.cache.disk.segments import SEGMENT_THRESHOLD


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Folds wait for the gate (set at the end in any case); more than max(4, entries / 8)
    changes start one (25 for the 200 KEYS)."""
    opened = threading.Event()
    real = keydir_build.fold

    def gated(
        arrays: hint.Arrays, changes: Mapping[int, Change], segments: Sequence[str]
    ) -> tuple[hint.Arrays, list[str]]:
        if threading.current_thread().name == "zcache-location-map-fold":
            assert opened.wait(30)
        return real(arrays, changes, segments)

    monkeypatch.setattr(keydir, "_MERGE_AT", 4)
    monkeypatch.setattr(keydir_build, "fold", gated)
    yield opened
    opened.set()


def _wait_for(check: object, what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _fold_started(kd: keydir.KeyDir) -> bool:
    return kd._folding is not None and bool(kd._frozen)


def test_answers_go_on_exact_while_a_fold_runs(
    tmp_path: pathlib.Path, gate: threading.Event
) -> None:
    """While a fold waits (it holds the changes of 40 keys), another tier overwrites and
    deletes keys, some of them among the folded ones: every read is the latest value, from
    the map (no index look-up), and nothing waits for the fold."""
    path = tmp_path / "c"
    filled(path)
    expected: dict[str, bytes | None] = {k: value(k) for k in KEYS}
    with tier(path) as t, tier(path) as writer:
        kd = t._keydir
        assert kd is not None and kd.ready
        for k in KEYS[:40]:
            expected[k] = value(k, "folded")
            assert writer.put(k, expected[k], namespace="ns")
        assert t.get(KEYS[0]) == expected[KEYS[0]]  # applies the 40 changes: a fold starts
        _wait_for(lambda: _fold_started(kd), "a fold started")
        for i, k in enumerate(KEYS[30:50]):  # newer than the fold: half of them folded too
            if i % 3 == 0:
                writer.delete(k)
                expected[k] = None
            else:
                expected[k] = value(k, "after")
                assert writer.put(k, expected[k], namespace="ns")
        t0 = time.monotonic()
        assert all(t.get(k) == v for k, v in expected.items())
        assert time.monotonic() - t0 < 20  # (the gate waits 30 s)
        assert kd._folding is not None and kd.folds == 0  # still waiting
        assert t.index_lookups == 0
        gate.set()
        _wait_for(lambda: kd.folds >= 1 and kd._folding is None, "the fold installed")
        assert all(t.get(k) == v for k, v in expected.items())
        assert t.index_lookups == 0
        assert all(isinstance(kd.find(hash_of(k)), Location) for k, v in expected.items() if v)
    with tier(path) as t:  # the hint written at close
        assert all(t.get(k) == v for k, v in expected.items())
        assert t.index_lookups == 0


def test_a_fold_of_a_map_dropped_meanwhile_is_not_installed(
    tmp_path: pathlib.Path, gate: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefix delete drops the map (built again from the rows) while a fold of the old
    one waits: the fold's arrays, which still hold the deleted keys, are thrown away."""
    path = tmp_path / "c"
    filled(path)
    with tier(path) as t, tier(path) as writer:
        kd = t._keydir
        assert kd is not None
        for k in KEYS[:40]:
            assert writer.put(k, value(k, "v2"), namespace="ns")
        assert t.get(KEYS[0]) == value(KEYS[0], "v2")
        _wait_for(lambda: _fold_started(kd), "a fold started")
        builds = kd.builds
        writer.delete_prefix("ns/v/c/1")  # KEYS 1, 10-19, 100-199: the map is dropped
        assert t.get(KEYS[1]) is None
        _wait_for(lambda: kd.ready and kd.builds > builds, "the map built again")
        gate.set()
        _wait_for(lambda: kd._folding is None, "the fold ended")
        assert kd.folds == 0
        for i, k in enumerate(KEYS):
            assert t.get(k) == (
                None if k.startswith("ns/v/c/1") else value(k, "v2" if i < 40 else "v1")
            )


def test_a_hint_written_while_a_fold_waits_holds_every_change(
    tmp_path: pathlib.Path, gate: threading.Event
) -> None:
    """``save`` writes the arrays with both the changes being folded and the newer ones
    (without waiting for the fold); a new tier loads it and reads everything from it."""
    path = tmp_path / "c"
    filled(path)
    writer = DiskTier(path, 1 << 30, segment_threshold=SEGMENT_THRESHOLD, location_map=False)
    with tier(path) as t, writer:
        kd = t._keydir
        assert kd is not None
        for k in KEYS[:40]:
            assert writer.put(k, value(k, "v2"), namespace="ns")
        assert t.get(KEYS[0]) == value(KEYS[0], "v2")
        _wait_for(lambda: _fold_started(kd), "a fold started")
        writer.delete(KEYS[5])  # folded: v2; now deleted
        assert writer.put(KEYS[50], value(KEYS[50], "v3"), namespace="ns")
        assert t.save_location_map(force=True)
        assert kd.folds == 0
        saved = hint.read(str(path))
        assert saved is not None and len(saved.arrays.hashes) == len(KEYS) - 1
        h = saved.arrays.hashes
        assert not (h == hash_of(KEYS[5])).any() and (h == hash_of(KEYS[50])).any()
        gate.set()  # (close waits for the fold)
    with tier(path) as t:  # (the close above had nothing newer to write)
        assert t._keydir is not None and t._keydir.ready and t._keydir.builds == 0
        assert t.get(KEYS[5]) is None and t.get(KEYS[50]) == value(KEYS[50], "v3")
        assert all(t.get(k) == value(k, "v2") for k in KEYS[:40] if k != KEYS[5])
        assert all(t.get(k) == value(k) for k in KEYS[40:] if k != KEYS[50])
        assert t.index_lookups == 0
