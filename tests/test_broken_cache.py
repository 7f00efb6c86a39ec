"""One broken cache breaks nothing: a cache folder removed or made unusable under a running
process costs the disk tier of that cache, never a write, never a stale read.

Real parts only: the local moto S3 server, s3fs, zarr, real folders removed with
``shutil.rmtree`` (tests run as root, so an unusable folder is made by replacing
``index.db`` with a directory rather than by ``chmod``).
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import stat
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.storage import FsspecStore, LocalStore

from xarray_zcache import CacheConfig, CachedStore, get_cache
from xarray_zcache.cache.disk.schema import INDEX_NAME, INDEX_SIDE_FILES
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import s3fs_store


def _config(folder: pathlib.Path, name: str) -> CacheConfig:
    return CacheConfig(name=name).with_memory_size("16MB").with_disk_cache(folder, "64MB")


def _s3_store(url: str, opts: dict[str, Any], config: CacheConfig) -> CachedStore:
    inner = FsspecStore.from_url(url, storage_options=opts, read_only=False)
    return CachedStore(inner, config)


def _source(url: str, opts: dict[str, Any]) -> np.ndarray:
    """The array as S3 holds it, read with s3fs directly (no cache; the session closed)."""
    with s3fs_store(url, opts, read_only=True) as store:
        return np.asarray(zarr.open_array(store)[:])


@pytest.fixture
def warnings_(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.WARNING, logger="xarray_zcache"):
        yield caplog


def _zcache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("xarray_zcache") and r.levelno >= logging.WARNING
    ]


def _filled(url: str, opts: dict[str, Any], config: CacheConfig, value: int) -> zarr.Array:
    """A 4x4 array of ``value`` in 2x2 chunks written through a cached store, read once."""
    arr = zarr.create_array(
        _s3_store(url, opts, config),
        shape=(4, 4),
        chunks=(2, 2),
        dtype="int32",
        compressors=None,
        zarr_format=3,
    )
    arr[:] = value
    assert (arr[:] == value).all()
    get_cache(config).flush()  # the entries are on disk
    return arr


def test_folder_removed_under_a_running_process(
    tmp_path: pathlib.Path,
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    warnings_: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "cache"
    config = _config(folder, "rmrf")
    url = f"s3://{s3_bucket}/a.zarr"
    arr = _filled(url, s3_options, config, 1)
    cache = get_cache(config)
    assert cache.disk_tier is not None and len(cache.disk_tier) > 0

    shutil.rmtree(folder)
    arr[:] = 2  # no error: the write reaches S3

    assert (_source(url, s3_options)[:] == 2).all()
    with s3_server.closing_filesystem() as fs:
        raw = fs.cat(f"{s3_bucket}/a.zarr/c/0/0")
    assert np.frombuffer(raw, dtype="<i4").tolist() == [2, 2, 2, 2]
    assert (arr[:] == 2).all()
    arr[1:3, 1:3] = 3
    assert arr[:].tolist() == _source(url, s3_options)[:].tolist()

    messages = _zcache_warnings(warnings_)
    assert len(messages) == 1, messages
    assert str(folder) in messages[0] and "disk_path" in messages[0]
    assert cache.disk_lost and cache.disk_tier is None
    assert cache.stats().disk_capacity == 0
    # re-created, private and empty, for the next process
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert list(folder.iterdir()) == []


def test_a_vanished_folder_of_another_cache_does_not_break_a_write(
    tmp_path: pathlib.Path,
    s3_bucket: str,
    s3_options: dict[str, Any],
    warnings_: pytest.LogCaptureFixture,
) -> None:
    url = f"s3://{s3_bucket}/b.zarr"
    first = _config(tmp_path / "first", "first")
    second = _config(tmp_path / "second", "second")
    arr = _filled(url, s3_options, first, 1)
    other = zarr.open_array(_s3_store(url, s3_options, second))
    assert (other[:] == 1).all()
    get_cache(second).flush()

    shutil.rmtree(tmp_path / "second")
    arr[:] = 5  # invalidates both caches of the process: the second one fails quietly

    assert (_source(url, s3_options)[:] == 5).all()
    assert (arr[:] == 5).all()
    assert (other[:] == 5).all()  # the second cache never serves the old bytes
    assert get_cache(first).disk_tier is not None and not get_cache(first).disk_lost
    assert get_cache(second).disk_lost
    messages = _zcache_warnings(warnings_)
    assert len(messages) == 1, messages
    assert str(tmp_path / "second") in messages[0] and "'second'" in messages[0]


def _break_index(folder: pathlib.Path) -> None:
    """Make the index unusable: ``index.db`` becomes a directory (root ignores modes)."""
    for suffix in ("", *INDEX_SIDE_FILES):
        (folder / (INDEX_NAME + suffix)).unlink(missing_ok=True)
    (folder / INDEX_NAME).mkdir()


def test_an_unusable_folder_goes_memory_only(
    tmp_path: pathlib.Path,
    s3_bucket: str,
    s3_options: dict[str, Any],
    warnings_: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "cache"
    config = _config(folder, "unusable")
    url = f"s3://{s3_bucket}/c.zarr"
    arr = _filled(url, s3_options, config, 1)

    _break_index(folder)
    arr[:] = 7

    assert (_source(url, s3_options)[:] == 7).all()
    assert (arr[:] == 7).all()
    cache = get_cache(config)
    assert cache.disk_lost
    messages = [m for m in _zcache_warnings(warnings_) if "disk_path" in m]
    assert len(messages) == 1, _zcache_warnings(warnings_)
    assert str(folder) in messages[0] and "cannot be used" in messages[0]
    assert (folder / INDEX_NAME).is_dir()  # the cache does not delete what it did not make


def test_a_fill_after_the_folder_vanished(
    tmp_path: pathlib.Path,
    s3_bucket: str,
    s3_options: dict[str, Any],
    warnings_: pytest.LogCaptureFixture,
) -> None:
    """Found by the background disk writer (no write through the cache at all)."""
    folder = tmp_path / "cache"
    config = _config(folder, "fill")
    url = f"s3://{s3_bucket}/d.zarr"
    with s3fs_store(url, s3_options) as store:
        source = zarr.create_array(store, shape=(4,), chunks=(2,), dtype="int32", zarr_format=3)
        source[:] = [1, 2, 3, 4]
    cache = get_cache(config)
    shutil.rmtree(folder)

    arr = zarr.open_array(_s3_store(url, s3_options, config))
    assert arr[:].tolist() == [1, 2, 3, 4]
    cache.flush()
    assert cache.disk_lost
    assert arr[:].tolist() == [1, 2, 3, 4]
    # (the flag is set first; the writer's thread then lets go of the folder and warns)
    deadline = time.monotonic() + 20
    while not _zcache_warnings(warnings_) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_zcache_warnings(warnings_)) == 1, _zcache_warnings(warnings_)


@pytest.mark.parametrize("source", ["s3", "local"])
def test_reads_after_the_folder_vanished_never_serve_older_bytes(
    source: str,
    tmp_path: pathlib.Path,
    s3_bucket: str,
    s3_options: dict[str, Any],
) -> None:
    """Writes and reads through two caches over one dataset while their folders are
    removed, again and again (also while fills are queued for the disk)."""
    configs = [_config(tmp_path / f"cache{i}", f"{source}{i}") for i in range(2)]
    if source == "s3":
        url = f"s3://{s3_bucket}/e.zarr"
        stores = [_s3_store(url, s3_options, c) for c in configs]
    else:
        data = tmp_path / "data"
        stores = [CachedStore(LocalStore(data), c) for c in configs]
    writer = zarr.create_array(stores[0], shape=(6,), chunks=(2,), dtype="int32", zarr_format=3)
    readers = [writer, zarr.open_array(stores[1])]
    for step in range(12):
        writer[:] = step
        if step % 3 == 0:
            for c in configs:
                shutil.rmtree(c.disk_path, ignore_errors=True)  # type: ignore[arg-type]
        for reader in readers:
            assert reader[:].tolist() == [step] * 6, (step, reader.store)
        if step % 2:
            writer[step % 6] = 100 + step
            for reader in readers:
                assert reader[step % 6] == 100 + step
    assert all(get_cache(c).disk_lost for c in configs)
