"""Shared pieces of the scenarios: keys, cached stores over local data, checks of reads."""

from __future__ import annotations

import os
import time

from zarr.abc.store import RangeByteRequest, SupportsGetSync
from zarr.storage import LocalStore

from xarray_zcache import CacheConfig
from xarray_zcache.cache.disk import DiskTier
from xarray_zcache.registry import close_all
from xarray_zcache.store import SyncCachedStore
from xarray_zcache.testing.faults.damage import payload_files
from xarray_zcache.testing.faults.report import ScenarioResult

__all__ = [
    "cached",
    "compare_all",
    "config",
    "dataset_keys",
    "forget_caches",
    "local_store",
    "unique",
    "verify_folder",
]


def dataset_keys(n: int) -> list[str]:
    """``n`` zarr-like keys (three metadata documents, then chunks) for the scenarios."""
    keys = ["zarr.json", "v/zarr.json", "w/zarr.json"]
    keys += [f"v/c/{i}/0" for i in range(n // 2)]
    keys += [f"w/c/{i}" for i in range(n - len(keys))]
    return keys


def config(
    cache_dir: str | os.PathLike[str],
    name: str,
    *,
    memory: str = "8MB",
    disk: str | int = "64MB",
    pack_below: int | str | None = None,
) -> CacheConfig:
    """A `CacheConfig` with a disk tier in ``cache_dir`` (no read-ahead, quick maintenance).

    ``pack_below``: ``disk_pack_below`` (0: every entry a payload file); None: the default.
    """
    cfg = (
        CacheConfig()
        .with_name(name)
        .with_memory_size(memory)
        .with_disk_cache(os.fspath(cache_dir), disk)
        .with_prefetch(0)
    )
    return cfg if pack_below is None else cfg.with_disk_packing(pack_below)


def local_store(path: str | os.PathLike[str]) -> LocalStore:
    """A zarr `LocalStore` at ``path`` (the reference, or a cached store's inner store)."""
    return LocalStore(os.fspath(path))


def cached(
    data: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    name: str,
    *,
    memory: str = "8MB",
    disk: str | int = "64MB",
    pack_below: int | str | None = None,
) -> SyncCachedStore:
    """A `CachedStore` over a `LocalStore` at ``data`` with its disk tier in ``cache_dir``
    (``pack_below``: as for :func:`config`)."""
    cfg = config(cache_dir, name, memory=memory, disk=disk, pack_below=pack_below)
    return SyncCachedStore(local_store(data), cfg)


def unique(prefix: str) -> str:
    """A cache name no other cache of this run has."""
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"


def forget_caches() -> None:
    """Close and forget this process's caches (long runs open thousands)."""
    close_all()


def compare_all(
    store: SupportsGetSync,
    reference: SupportsGetSync,
    keys: list[str],
    result: ScenarioResult,
    what: str,
) -> None:
    """Read every key through ``store`` (whole and a range) and compare with ``reference``.

    Counts wrong bytes and lost data in ``result``; an exception counts as an error to the
    user (and as lost data: the key could not be read).
    """
    for key in keys:
        expected = reference.get_sync(key)
        expected_bytes = None if expected is None else expected.to_bytes()
        for byte_range in (None, RangeByteRequest(16, 48)):
            try:
                got = store.get_sync(key, byte_range=byte_range)
            except Exception as exc:
                result.errors_to_user += 1
                result.lost += 1
                result.note(f"{what}: {key} raised {type(exc).__name__}: {exc}")
                continue
            want = expected_bytes
            if want is not None and byte_range is not None:
                want = want[16:48]
            got_bytes = None if got is None else got.to_bytes()
            if got_bytes == want:
                continue
            if got_bytes is None:
                result.lost += 1
                result.note(f"{what}: {key} missing")
            else:
                result.wrong += 1
                result.note(f"{what}: {key} wrong bytes (range={byte_range})")


def verify_folder(
    cache_dir: str | os.PathLike[str],
    capacity: int,
    result: ScenarioResult,
    *,
    crashed: bool,
    damaged: bool = False,
) -> dict[str, int]:
    """``DiskTier.verify`` then ``verify(repair=True)``; inconsistencies are noted as violations.

    After a crash, rows without file and temp files are expected (``crashed=True``); damaged,
    orphan or mismatched files never are. After outside damage (``damaged=True``) anything
    may be found. After repair everything must be consistent.
    """
    tier = DiskTier(cache_dir, capacity)
    try:
        report = tier.verify()
        allowed = {"ok", "index_damaged"} | ({"missing_files", "temp_files"} if crashed else set())
        bad = {k: v for k, v in report.items() if v and k not in allowed}
        if bad and not damaged:
            result.note(f"verify: {bad}")
            result.violations += 1
        tier.verify(repair=True)
        again = tier.verify()
        bad = {k: v for k, v in again.items() if v and k != "ok"}
        if bad:
            result.note(f"verify after repair: {bad}")
            result.violations += 1
        if tier.used_bytes() > capacity:
            result.note(f"disk tier over capacity: {tier.used_bytes()} > {capacity}")
            result.violations += 1
        on_disk = sum(f.stat().st_size for f in payload_files(cache_dir))  # payloads + headers
        if on_disk > capacity * 1.25 + 4096:
            result.note(f"payload files over capacity: {on_disk} > {capacity}")
            result.violations += 1
        return report
    finally:
        tier.close()
