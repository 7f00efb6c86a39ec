"""Damaged folders: payload files, ``index.db`` or its WAL damaged, then read through a cache."""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import shutil
import sqlite3

from xarray_zcache.testing.faults.damage import DAMAGE_KINDS, damage
from xarray_zcache.testing.faults.report import ScenarioResult, WarningCapture, timed
from xarray_zcache.testing.faults.stores import (
    cached,
    compare_all,
    dataset_keys,
    forget_caches,
    local_store,
    unique,
    verify_folder,
)
from xarray_zcache.testing.faults.values import buf, make_value

__all__ = ["run_corruption_rounds"]


def _fill(data: pathlib.Path, keys: list[str], rng: random.Random) -> None:
    reference = local_store(data)
    for key in keys:
        reference.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))


def _snapshot_index(cache_dir: pathlib.Path, into: pathlib.Path) -> None:
    """Copy ``index.db`` and its WAL as they are now (with a connection open: a crash state)."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ("index.db", "index.db-wal"):
        src = cache_dir / name
        if src.exists():
            shutil.copyfile(src, into / name)


def run_corruption_rounds(
    workdir: str | os.PathLike[str], rounds: int, seed: int = 0, kinds: tuple[str, ...] = ()
) -> ScenarioResult:
    """Damage payload files, ``index.db`` or its WAL, then read everything through the cache.

    Each round fills a cache through a `CachedStore` (the "live" store), damages the folder
    in one way (``kinds``, cycled; default :data:`DAMAGE_KINDS`), and reads every key through
    the live store (its memory tier emptied, so reads reach the disk) and through a fresh
    store: the bytes must be right, nothing may raise, damaged payload files must be counted
    in ``stats().corruptions`` and logged once. Writes through the live store must still
    work; ``verify(repair=True)`` must leave the folder consistent. WAL damage is applied to
    a crash state (``index.db`` and ``index.db-wal`` copied while a connection was open,
    restored after it closed).
    """
    kinds = kinds or DAMAGE_KINDS
    result = ScenarioResult("damaged payload files, index.db, WAL")
    rng = random.Random(seed)
    keys = dataset_keys(30)
    capture = WarningCapture()
    with timed(result), capture:
        for r in range(rounds):
            kind = kinds[r % len(kinds)]
            work = pathlib.Path(workdir) / f"round{r}"
            data, cache_dir = work / "data", work / "cache"
            _fill(data, keys, rng)
            reference = local_store(data)
            live = cached(data, cache_dir, unique("live"))
            for key in keys:
                live.get_sync(key)
            live.cache.flush()
            restart = kind.startswith("wal") or (r // len(kinds)) % 2 == 0
            if kind.startswith("wal"):
                # a crash state with a WAL: copy the files while the connection is open
                for key in rng.sample(keys, 5):  # some fresh commits in the WAL
                    live.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))
                live.cache.flush()
                _snapshot_index(cache_dir, work / "snap")
                live.cache.close()
                for name in ("index.db", "index.db-wal"):
                    if (work / "snap" / name).exists():
                        shutil.copyfile(work / "snap" / name, cache_dir / name)
                (cache_dir / "index.db-shm").unlink(missing_ok=True)
            elif restart:
                live.cache.close()  # damage while no process runs (checkpoints the WAL)
            else:  # damage under a running store: move the pages from the WAL to index.db
                with contextlib.closing(sqlite3.connect(cache_dir / "index.db")) as side:
                    side.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            capture.records.clear()
            n, _hashes = damage(kind, cache_dir, rng)
            result.faults += n
            result.runs += 1
            if restart:
                live = cached(data, cache_dir, unique("live"))
            else:
                live.cache.memory_tier.clear()  # make the live store read its (damaged) disk tier
            fresh = cached(data, cache_dir, unique("fresh"))
            try:
                compare_all(live, reference, keys, result, f"{kind} (live)")
                compare_all(fresh, reference, keys, result, f"{kind} (fresh)")
                # writes still go through and are read back right
                for key in rng.sample(keys, 3):
                    value = make_value(key, rng.randrange(1 << 30))
                    try:
                        live.set_sync(key, buf(value))
                    except Exception as exc:
                        result.errors_to_user += 1
                        result.note(f"{kind}: set raised {type(exc).__name__}: {exc}")
                        continue
                    live.cache.memory_tier.clear()
                    got = live.get_sync(key)
                    if got is None or got.to_bytes() != value:
                        result.wrong += 1
                        result.note(f"{kind}: written value not read back")
                stats = fresh.stats() + live.stats()
                if kind.startswith("payload") and stats.corruptions < 1:
                    result.violations += 1
                    result.note(f"{kind}: damage not counted in stats ({stats.corruptions})")
                damaged_warnings = [rec for rec in capture.records if "damaged" in rec.getMessage()]
                if len(damaged_warnings) > 2:  # at most once per cache (live, fresh)
                    result.violations += 1
                    result.note(f"{kind}: {len(damaged_warnings)} warnings (expected once)")
            except Exception as exc:  # anything raised to the user
                result.errors_to_user += 1
                result.note(f"{kind}: raised {type(exc).__name__}: {exc}")
            finally:
                fresh.cache.close()
                live.cache.close()
            verify_folder(cache_dir, 64_000_000, result, crashed=True, damaged=True)
            forget_caches()
    return result
