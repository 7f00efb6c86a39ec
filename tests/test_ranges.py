"""Ranges of a changed object (issue 18 item 4): a shard rewritten between a reader's read
of its index and of an inner chunk, and a validation that drops the old parts meanwhile.

The reader's index is of the old version; nothing of it is cached any more after the
validation, and the inner chunk is read from the new version at the old index's offsets.
zarr's array API must raise `ObjectChanged` (never return another position's values);
xarray with ``engine="zcache"`` retries the read once (its `ZCacheArrayWrapper`) and
returns the new values, with or without dask.

The race is driven by a hook in the source read of the first inner chunk (after the
reader's index was read): it rewrites the shard at the source (plain zarr bytes, not
through zcache) and validates the cache, then lets the read go on.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from xarray_zcache import CacheConfig, CachedStore, open_store
from xarray_zcache.cache.freshness import ObjectChanged
from xarray_zcache.store_versions import Fetched
from xarray_zcache.testing.writers import s3fs_store

P = default_buffer_prototype()
N = 16
SHARD = "a/c/0"
OLD = np.arange(N, dtype="i4")
NEW = np.arange(N, dtype="i4") + 100
NEW[0:2] = 0  # the new shard's first inner chunk is empty: omitted, every offset moves


def _cfg(tmp_path: Path, name: str) -> CacheConfig:
    return (
        CacheConfig()
        .with_name(name)
        .with_memory_size("16MB")
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_prefetch(0)
        .with_validation("never")  # (only the hook validates)
    )


def _source(
    where: str, tmp_path: Path, bucket: str, opts: dict[str, Any]
) -> tuple[str, dict[str, Any] | None]:
    if where == "s3":
        return f"s3://{bucket}/sharded.zarr", opts
    return str(tmp_path / "sharded.zarr"), None


def _write(
    url: str, opts: dict[str, Any] | None, compressor: str | None, index_location: str = "end"
) -> bytes:
    """Array ``a`` (one shard of 8 inner chunks of 2, its index at ``index_location``)
    holding `OLD`; returns the bytes of the same shard holding `NEW` (written to array
    ``b`` of the same metadata)."""
    if opts is None:  # (a local folder: no session)
        return _write_to(url, compressor, index_location)
    with s3fs_store(url, opts) as store:
        return _write_to(store, compressor, index_location)


def _write_to(where: Any, compressor: str | None, index_location: str) -> bytes:
    root = zarr.open_group(where, mode="w", zarr_format=3)
    codecs: Any = "auto" if compressor else None
    shards: Any = {"shape": (N,), "index_location": index_location}
    for name, values in (("a", OLD), ("b", NEW)):
        arr = root.create_array(
            name,
            shape=(N,),
            chunks=(2,),
            shards=shards,
            dtype="i4",
            compressors=codecs,
            fill_value=0,
            dimension_names=["x"],
        )
        arr[:] = values
    zarr.consolidate_metadata(root.store)
    plain = root.store
    new = sync(plain.get("b/c/0", P))
    assert new is not None
    return new.to_bytes()


class _Race:
    """Once, when the first inner chunk of the shard is read from the source (its index
    was read already): rewrite the shard at the source with ``new`` and validate."""

    def __init__(self, store: CachedStore, new: bytes, local: Path | None) -> None:
        self.store = store
        self.new = new
        self.local = local
        self.fired = 0
        self.index_at_start = False
        source: Any = store._source
        self._get: Callable[[str, ByteRequest | None], Awaitable[Fetched]] = source.get
        self._get_sync: Callable[[str, ByteRequest | None], Fetched] = source.get_sync
        source.get = self.get
        source.get_sync = self.get_sync

    def _due(self, key: str, byte_range: ByteRequest | None) -> bool:
        if key != SHARD or not isinstance(byte_range, RangeByteRequest) or self.fired:
            return False
        if self.index_at_start and byte_range.start == 0:
            return False  # (the index, read before the inner chunks)
        self.fired += 1
        return True

    async def get(self, key: str, byte_range: ByteRequest | None) -> Fetched:
        if self._due(key, byte_range):
            if self.local is not None:
                (self.local / SHARD).write_bytes(self.new)
            else:
                # (the wrapped store, writable: never through the cache)
                plain = self.store.inner.with_read_only(False)
                await plain.set(SHARD, P.buffer.from_bytes(self.new))
            await self.store.revalidate()
        return await self._get(key, byte_range)

    def get_sync(self, key: str, byte_range: ByteRequest | None) -> Fetched:
        if self._due(key, byte_range):
            assert self.local is not None  # (only local files are read synchronously)
            (self.local / SHARD).write_bytes(self.new)
            unit, folder = self.store._unit_of(SHARD)
            freshness = self.store.cache.freshness
            freshness.validate_now_sync(unit, self.store._listing_sync(unit, folder))
        return self._get_sync(key, byte_range)


def _race(
    where: str,
    compressor: str | None,
    tmp_path: Path,
    bucket: str,
    opts: dict[str, Any],
    name: str,
    index_location: str = "end",
) -> tuple[CachedStore, _Race]:
    url, options = _source(where, tmp_path, bucket, opts)
    new = _write(url, options, compressor, index_location)
    store = open_store(url, storage_options=options, cache_config=_cfg(tmp_path, name))
    local = Path(url) if where == "local" else None
    race = _Race(store, new, local)
    race.index_at_start = index_location == "start"
    return store, race


WHERE = pytest.mark.parametrize("where", ["local", "s3"])
COMPRESSOR = pytest.mark.parametrize("compressor", [None, "zstd"])


@WHERE
@COMPRESSOR
def test_zarr_raises_object_changed_never_wrong_values(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, where: str, compressor: str | None
) -> None:
    store, race = _race(where, compressor, tmp_path, s3_bucket, s3_options, "zarr")
    arr = zarr.open_array(store, path="a", mode="r")
    got = None
    with pytest.raises(ExceptionGroup) as info:
        got = arr[2:4].tolist()  # index of the old shard, inner chunk 1 of the new one
    assert got is None
    assert info.group_contains(ObjectChanged)
    assert race.fired == 1
    stats = store.stats()
    assert stats.validation_changes == 1  # the shard (the hook's validation)
    # read again: the new data, whole and in parts
    assert arr[2:4].tolist() == NEW[2:4].tolist()
    assert arr[:].tolist() == NEW.tolist()
    assert arr[6:8].tolist() == NEW[6:8].tolist()


@WHERE
@COMPRESSOR
@pytest.mark.parametrize("chunks", [None, {}], ids=["numpy", "dask"])
def test_xarray_reads_the_new_values(
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    where: str,
    compressor: str | None,
    chunks: dict[str, int] | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, race = _race(where, compressor, tmp_path, s3_bucket, s3_options, "xr")
    with (
        caplog.at_level(logging.INFO, "xarray_zcache.backend"),
        xr.open_dataset(store, engine="zcache", chunks=chunks) as ds,
    ):
        assert race.fired == 0
        got = ds.a[2:4].values  # retried once after ObjectChanged: no ExceptionGroup
        assert race.fired == 1
        assert got.tolist() == NEW[2:4].tolist()
        assert ds.a.values.tolist() == NEW.tolist()
    again = [r for r in caplog.records if "during a read; read again" in r.getMessage()]
    assert len(again) == 1  # one read retried, once
    assert store.stats().validation_changes == 1


@WHERE
@COMPRESSOR
def test_an_index_at_the_start_of_the_shard_is_protected_too(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, where: str, compressor: str | None
) -> None:
    """``index_location="start"``: zarr reads the index as a range from offset 0, not as
    a suffix. That read begins the reader as a suffix does, so an inner chunk read at
    the old index's offsets after the shard was replaced raises `ObjectChanged`, and
    xarray reads the new values."""
    store, race = _race(where, compressor, tmp_path, s3_bucket, s3_options, "start", "start")
    arr = zarr.open_array(store, path="a", mode="r")
    with pytest.raises(ExceptionGroup) as info:
        arr[2:4].tolist()
    assert info.group_contains(ObjectChanged)
    assert race.fired == 1
    assert arr[2:4].tolist() == NEW[2:4].tolist()
    assert arr[:].tolist() == NEW.tolist()


@WHERE
def test_an_index_at_the_start_read_by_xarray_gives_the_new_values(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, where: str
) -> None:
    store, race = _race(where, "zstd", tmp_path, s3_bucket, s3_options, "xstart", "start")
    with xr.open_dataset(store, engine="zcache", chunks={}) as ds:
        assert ds.a[2:4].values.tolist() == NEW[2:4].tolist()
        assert race.fired == 1
        assert ds.a.values.tolist() == NEW.tolist()


def test_a_reader_that_began_after_the_change_is_not_told(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """The marker concerns only readers that began before the supersession: a read
    after the validation (its index of the new version) is served, no exception."""
    store, race = _race("s3", None, tmp_path, s3_bucket, s3_options, "after")
    race.fired = 1  # (no race: rewrite, then validate, then read)
    arr = zarr.open_array(store, path="a", mode="r")
    assert arr[2:4].tolist() == OLD[2:4].tolist()  # caches the old index, inner chunk 1
    sync(store.inner.with_read_only(False).set(SHARD, P.buffer.from_bytes(race.new)))
    report = sync(store.revalidate())
    assert report.changed == 1
    assert arr[4:6].tolist() == NEW[4:6].tolist()
    assert arr[2:4].tolist() == NEW[2:4].tolist()


@WHERE
def test_a_reader_is_told_when_the_change_came_wholly_between_its_reads(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, where: str
) -> None:
    """The validation ran after the reader's index read ended and before its inner-chunk
    read began (another thread's, say): the reader (this task) is still told; a new
    reader (another task) is not."""
    store, race = _race(where, None, tmp_path, s3_bucket, s3_options, "between")
    race.fired = 1  # (no hook: the steps run in order here)
    plain = store.inner.with_read_only(False)

    async def reader() -> list[int]:
        index = await store.get(SHARD, P, SuffixByteRequest(8 * 16 + 4))  # the old index
        assert index is not None
        await plain.set(SHARD, P.buffer.from_bytes(race.new))
        report = await store.revalidate()
        assert report.changed == 1
        chunk = await store.get(SHARD, P, RangeByteRequest(8, 16))  # old offsets
        assert chunk is not None
        return np.frombuffer(chunk.to_bytes(), dtype="i4").tolist()

    with pytest.raises(ObjectChanged):
        sync(reader())

    async def another() -> list[int]:  # (a task of its own: a reader of its own)
        chunk = await store.get(SHARD, P, RangeByteRequest(0, 8))
        assert chunk is not None
        return np.frombuffer(chunk.to_bytes(), dtype="i4").tolist()

    assert sync(another()) == NEW[2:4].tolist()  # the new shard's first stored chunk


@COMPRESSOR
def test_concurrent_reads_while_the_shard_is_replaced_never_mix_versions(
    tmp_path: Path, compressor: str | None
) -> None:
    """No hook: reader threads read 2-element slices while another thread replaces the
    shard file (atomically, as zarr does) with other versions and validates after each.
    Every read returns the values of one version at the right positions, or raises
    `ObjectChanged` (bare, or in zarr's group): never another position's values."""
    url = tmp_path / "sharded.zarr"
    root = zarr.open_group(str(url), mode="w", zarr_format=3)
    codecs: Any = "auto" if compressor else None
    shards: list[bytes] = []
    values: list[np.ndarray] = []
    for k in range(4):
        vals = np.arange(N, dtype="i4") + 1000 * k
        if k % 2:
            vals[0:2] = 0  # (omitted: the offsets of every other chunk move)
        for name in (f"v{k}",) + (("a",) if k == 0 else ()):
            arr = root.create_array(
                name, shape=(N,), chunks=(2,), shards=(N,), dtype="i4", compressors=codecs
            )
            arr[:] = vals
        shards.append((url / f"v{k}" / "c" / "0").read_bytes())
        values.append(vals)
    store = open_store(str(url), cache_config=_cfg(tmp_path, f"stress-{compressor}"))
    cached = zarr.open_array(store, path="a", mode="r")
    done = threading.Event()
    lock = threading.Lock()
    outcomes: Counter[str] = Counter()
    wrong: list[tuple[int, list[int]]] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not done.is_set():
            i = rng.randrange(N // 2) * 2
            try:
                got = cached[i : i + 2].tolist()
            except ObjectChanged:
                outcome = "changed"
            except ExceptionGroup as group:
                outcome = "changed" if group.split(ObjectChanged)[1] is None else repr(group)
            else:
                ok = any(got == v[i : i + 2].tolist() for v in values)
                outcome = "ok" if ok else "wrong"
                if not ok:
                    with lock:
                        wrong.append((i, got))
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for n in range(1, 25):
            (tmp_path / "next").write_bytes(shards[n % len(shards)])
            os.replace(tmp_path / "next", url / SHARD)
            sync(store.revalidate())
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not wrong
    assert set(outcomes) <= {"ok", "changed"}, outcomes
    assert outcomes["ok"] > 0
    assert cached[:].tolist() == values[24 % len(shards)].tolist()
