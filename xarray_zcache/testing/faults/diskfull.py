"""A full disk: the disk tier's filesystem fills up while a cached store reads and writes."""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import time

from xarray_zcache.cache.disk.index import REOPEN_INTERVAL_S
from xarray_zcache.store import SyncCachedStore
from xarray_zcache.testing.faults.damage import temp_files
from xarray_zcache.testing.faults.report import ScenarioResult, WarningCapture, timed
from xarray_zcache.testing.faults.stores import (
    cached,
    compare_all,
    dataset_keys,
    forget_caches,
    local_store,
    unique,
)
from xarray_zcache.testing.faults.tmpfs import enospc_injected, fill_disk, small_tmpfs
from xarray_zcache.testing.faults.values import buf, make_value

__all__ = ["run_disk_full_rounds"]


def run_disk_full_rounds(
    workdir: str | os.PathLike[str], rounds: int, seed: int = 0, *, force_injection: bool = False
) -> ScenarioResult:
    """The disk tier's filesystem fills up (a 1 MiB tmpfs; injected ENOSPC if none can be
    mounted) while a store reads and writes through it, and a new cache opens on it.

    Every read must return the right bytes and no call may raise; a warning is logged; no
    temp file is left behind; reads are served from memory; once space is freed the disk
    tier stores entries again.
    """
    result = ScenarioResult(
        "disk tier's filesystem full"
        + (" (ENOSPC injected at every write)" if force_injection else " (1 MiB tmpfs)")
    )
    rng = random.Random(seed)
    keys = dataset_keys(40)
    with timed(result):
        for r in range(rounds):
            work = pathlib.Path(workdir) / f"full{r}"
            data, mnt = work / "data", work / "mnt"
            reference = local_store(data)
            for key in keys:  # ~2 MiB in all: twice the filesystem
                reference.set_sync(key, buf(make_value(key, rng.randrange(1 << 30), 3000)))
            with contextlib.ExitStack() as stack:
                mounted = False if force_injection else stack.enter_context(small_tmpfs(mnt))
                cache_dir = mnt / "cache"
                capture = stack.enter_context(WarningCapture())
                store = cached(data, cache_dir, unique("full"), memory="16MB", disk="64MB")
                order = keys[:]
                rng.shuffle(order)
                split = rng.randrange(5, len(order) - 5)
                try:
                    compare_all(store, reference, order[:split], result, "before full")
                    store.cache.flush()
                    with contextlib.ExitStack() as full:  # on leaving: space again
                        if mounted:
                            full.callback(fill_disk(mnt).unlink)
                        else:
                            full.enter_context(enospc_injected(cache_dir))
                        result.faults += 1
                        result.runs += 1
                        compare_all(store, reference, order, result, "disk full")
                        for key in rng.sample(keys, 6):
                            value = make_value(key, rng.randrange(1 << 30), 3000)
                            store.set_sync(key, buf(value))
                            stored = reference.get_sync(key)
                            if stored is None or stored.to_bytes() != value:
                                result.lost += 1
                                result.note(f"round {r}: acknowledged write not in the store")
                        store.delete_sync(order[0])
                        compare_all(store, reference, keys, result, "disk full, after writes")
                        store.cache.flush()
                        other = cached(data, cache_dir, unique("newcomer"), memory="16MB")
                        compare_all(other, reference, keys, result, "new cache on a full disk")
                        other.cache.close()
                        result.faults += store.stats().disk_write_failures
                    if not any(rec.name.startswith("xarray_zcache") for rec in capture.records):
                        result.violations += 1
                        result.note(f"round {r}: no warning logged")
                    left = temp_files(cache_dir)
                    if left:
                        result.violations += 1
                        result.note(f"round {r}: temp files left: {len(left)}")
                    # the disk tier stores again (an index that went offline while the
                    # disk was full is opened again at most REOPEN_INTERVAL_S later)
                    if not _stores_again(store, order[-1]):
                        result.violations += 1
                        result.note(f"round {r}: the disk tier did not recover")
                except Exception as exc:
                    result.errors_to_user += 1
                    result.note(f"round {r}: raised {type(exc).__name__}: {exc}")
                finally:
                    store.cache.close()
                    forget_caches()
    return result


def _stores_again(store: SyncCachedStore, key: str) -> bool:
    """Whether ``key``, read again through ``store``, is stored on its disk tier, within
    the time an offline index takes to be opened again (a lost disk tier never is)."""
    probe = f"{store.namespace}/{key}"
    deadline = time.monotonic() + REOPEN_INTERVAL_S + 10
    while True:
        store.cache.memory_tier.clear()
        store.cache.invalidate(probe)
        store.get_sync(key)
        store.cache.flush()
        disk = store.cache.disk_tier
        if disk is not None and probe in disk:
            return True
        if disk is None or time.monotonic() > deadline:
            return False
        time.sleep(0.25)
