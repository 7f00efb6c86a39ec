"""CacheConfig: defaults from dask config, builders, and clear errors for bad input."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from typing import Any

import dask.config
import pytest
import xarray as xr
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from xarray_zcache import CacheConfig, CachedStore
from xarray_zcache.backend import open_store


def test_defaults_come_from_shipped_yaml() -> None:
    cfg = CacheConfig()
    assert cfg.name == "default"
    assert cfg.memory_size == 512 * 2**20
    assert cfg.disk_size == 10 * 2**30
    assert cfg.chunk_ttl is None
    assert cfg.metadata_ttl == 300
    assert cfg.eviction_policy == "lru"
    assert cfg.disk_path is not None and cfg.disk_path.endswith("xarray-zcache")


def test_dask_config_overrides() -> None:
    with dask.config.set({"zcache.memory-size": "2GB", "zcache.ttl.chunks": "1 hour"}):
        cfg = CacheConfig()
    assert cfg.memory_size == 2_000_000_000
    assert cfg.chunk_ttl == 3600


def test_environment_variable_reaches_config() -> None:
    code = "from xarray_zcache import CacheConfig; print(CacheConfig().memory_size)"
    env = {**os.environ, "DASK_ZCACHE__MEMORY_SIZE": "3MiB"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(3 * 2**20), out.stderr


def test_named_cache(tmp_path: Any) -> None:
    caches = {"era5": {"memory-size": "1GB", "disk": {"path": str(tmp_path), "size": "5GB"}}}
    with dask.config.set({"zcache.caches": caches}):
        cfg = CacheConfig.from_dask_config("era5")
        assert cfg.name == "era5"
        assert cfg.memory_size == 10**9
        assert cfg.disk_path == str(tmp_path)
        with pytest.raises(ValueError, match=r"cache_config: unknown cache name 'nope'.*'era5'"):
            CacheConfig.from_dask_config("nope")


def test_builders_return_new_objects(tmp_path: Any) -> None:
    base = CacheConfig()
    cfg = base.with_memory_size("100MB").with_disk_cache(tmp_path, "1GB").with_ttl(chunks="10s")
    assert (cfg.memory_size, cfg.disk_size, cfg.chunk_ttl) == (10**8, 10**9, 10)
    assert base.memory_size == 512 * 2**20
    assert cfg.without_disk_cache().disk_path is None
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert CacheConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(CacheConfig.from_dict(cfg.to_dict()))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: c.with_memory_size("lots"), r"memory_size: invalid size 'lots'.*'512MiB'"),
        (lambda c: c.with_memory_size(-1), r"memory_size: invalid size -1"),
        (lambda c: c.with_disk_cache("/tmp/x", "2XB"), r"disk_size: invalid size '2XB'"),
        (lambda c: c.with_max_object_size(None), r"max_object_size: invalid size None"),
        (lambda c: c.with_ttl(chunks=-5), r"chunk_ttl: invalid duration -5"),
        (lambda c: c.with_ttl(metadata="soon"), r"metadata_ttl: invalid duration 'soon'"),
        (lambda c: c.with_ttl(listing=None), r"listing_ttl: a duration is required"),
        (lambda c: c.with_eviction_policy("fifo"), r"eviction_policy: .*'lru', 'slru'"),
        (lambda c: c.with_promotion_threshold(-1), r"promotion_threshold: invalid value -1"),
        (lambda c: c.with_name(""), r"name: invalid cache name"),
    ],
)
def test_bad_values_name_the_field(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(CacheConfig())


def test_bad_dask_config_key_is_named() -> None:
    with (
        dask.config.set({"zcache.memroy-size": "1GB"}),
        pytest.raises(ValueError, match=r"zcache.memroy-size: unknown setting"),
    ):
        CacheConfig.from_dask_config()


def test_unknown_url_scheme() -> None:
    with pytest.raises(ValueError, match=r"filename_or_obj: unknown or unavailable URL scheme"):
        open_store("nosuchproto://bucket/x.zarr")
    with pytest.raises(ValueError, match=r"unknown or unavailable URL scheme 'nosuchproto'"):
        xr.open_dataset("nosuchproto://bucket/x.zarr", engine="zcache")


def test_storage_options_with_store_object(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"storage_options: not allowed with a Store object"):
        open_store(LocalStore(tmp_path), storage_options={"anon": True})


def test_bad_cache_config_type() -> None:
    with pytest.raises(TypeError, match=r"cache_config: expected a CacheConfig"):
        open_store("/tmp/x.zarr", cache_config=42)  # type: ignore[arg-type]


def test_unwritable_cache_folder_is_refused(tmp_path: Any) -> None:
    if os.geteuid() == 0:
        # root writes anywhere: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        path = blocker / "cache"
        reason = "Not a directory"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        path = ro / "cache"
        reason = "Permission denied"
    with pytest.raises(ValueError, match=r"disk_path: cannot create the folder") as info:
        CacheConfig().with_disk_cache(path, "1MB")
    assert str(path) in str(info.value) and reason in str(info.value)
    assert not path.exists()


def test_disk_path_that_is_a_file_or_cannot_be_created(tmp_path: Any) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(
        ValueError, match=r"disk_path: .*it is an existing regular file.*File exists"
    ):
        CacheConfig().with_disk_cache(a_file)
    with pytest.raises(
        ValueError, match=r"disk_path: cannot create the folder '/proc/zc'.*'/proc'"
    ):
        CacheConfig().with_disk_cache("/proc/zc")
    with (
        dask.config.set({"zcache.disk.path": str(a_file)}),
        pytest.raises(ValueError, match=r"dask config key 'zcache.disk.path': disk_path: "),
    ):
        CacheConfig.from_dask_config()
    # nothing was created; a missing folder under a writable parent is fine (created later)
    assert a_file.read_text() == "x" and not os.path.exists("/proc/zc")
    later = tmp_path / "new" / "deeper"
    assert CacheConfig().with_disk_cache(later).disk_path == str(later)
    assert not later.parent.exists()


def test_an_existing_folder_is_accepted_even_if_not_writable(tmp_path: Any) -> None:
    # not writable: the cache falls back to memory when it binds (a read-only mount),
    # which is no error at config time; /proc/sys (mode 0555) stands in for such a folder
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert CacheConfig().with_disk_cache(locked).disk_path == str(locked)
    if os.path.isdir("/proc/sys"):
        assert CacheConfig().with_disk_cache("/proc/sys").disk_path == "/proc/sys"


def test_errors_name_the_dask_key_and_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {**os.environ, "DASK_ZCACHE__MEMORY_SIZE": "lots"}
    code = "from xarray_zcache import CacheConfig; CacheConfig()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert (
        "ValueError: DASK_ZCACHE__MEMORY_SIZE (environment variable, dask config key "
        "'zcache.memory-size'): memory_size: invalid size 'lots'"
    ) in out.stderr
    with (
        dask.config.set({"zcache.ttl.metadata": "soon"}),
        pytest.raises(ValueError, match=r"^dask config key 'zcache.ttl.metadata': metadata_ttl: "),
    ):
        CacheConfig()
    caches = {"era5": {"memory-size": "huge"}}
    with (
        dask.config.set({"zcache.caches": caches}),
        pytest.raises(ValueError, match=r"^dask config key 'zcache.caches.era5.memory-size': "),
    ):
        CacheConfig.from_dask_config("era5")
    # the env var that set an unknown key is named too (dask reads it at import: set both)
    monkeypatch.setenv("DASK_ZCACHE__MEMROY_SIZE", "1GB")
    with (
        dask.config.set({"zcache.memroy_size": "1GB"}),
        pytest.raises(ValueError, match=r"^DASK_ZCACHE__MEMROY_SIZE \(environment variable\)"),
    ):
        CacheConfig.from_dask_config()
    # a value passed directly is not blamed on the configuration
    with pytest.raises(ValueError, match=r"^memory_size: invalid size 'lots'"):
        CacheConfig().with_memory_size("lots")


def test_bad_input_loses_nothing_cached(tmp_path: Any) -> None:
    cfg = CacheConfig().with_memory_size("1MB").with_disk_cache(tmp_path / "cache", "1MB")
    store = CachedStore(LocalStore(tmp_path / "data"), cfg)
    sync(store.set("c/0", cpu.Buffer.from_bytes(b"kept")))
    with pytest.raises(ValueError):
        cfg.with_memory_size("huge")
    with pytest.raises(TypeError, match="Unexpected byte_range"):
        sync(store.get("c/0", default_buffer_prototype(), (0, 1)))  # type: ignore[arg-type]
    assert store.namespace + "/c/0" in store.cache.memory_tier
    buf = sync(store.get("c/0", default_buffer_prototype()))
    assert buf is not None and buf.to_bytes() == b"kept"


def test_disk_index_cache_from_dask_config_to_the_disk_tier(tmp_path: Any) -> None:
    """``zcache.disk.index-cache`` (`disk_index_cache`): parsed as a size, checked, and the
    bound of the SQLite page cache of the disk tier's index connections."""
    from xarray_zcache.cache import HybridCache
    from xarray_zcache.cache.disk import schema
    from xarray_zcache.cache.settings import CacheSettings

    assert CacheConfig().disk_index_cache == schema.INDEX_CACHE_BYTES == 16 * 2**20
    assert CacheSettings().disk_index_cache == schema.INDEX_CACHE_BYTES
    with dask.config.set({"zcache.disk.index-cache": "64MB"}):
        assert CacheConfig().disk_index_cache == 64_000_000
    with dask.config.set({"zcache.disk.index-cache": 4 << 20}):
        cfg = CacheConfig().with_disk_cache(tmp_path / "cache", "1MB")
    assert cfg.disk_index_cache == 4 << 20
    assert CacheConfig.from_dict(cfg.to_dict()) == cfg
    caches = {"big": {"disk": {"index-cache": "1GiB"}}}
    with dask.config.set({"zcache.caches": caches}):
        assert CacheConfig.from_dask_config("big").disk_index_cache == 2**30
    cache = HybridCache(cfg)
    try:
        disk = cache.disk_tier
        assert disk is not None and disk.index_cache_bytes == 4 << 20
        pages = disk._index.run("size", lambda c: c.execute("PRAGMA cache_size").fetchone()[0])
        assert pages == -(4 << 10)  # KiB
    finally:
        cache.close()
    for bad in ("lots", -1, 512, True, None):
        with (
            dask.config.set({"zcache.disk.index-cache": bad}),
            pytest.raises(
                ValueError,
                match=r"^dask config key 'zcache.disk.index-cache': disk_index_cache: invalid size",
            ),
        ):
            CacheConfig()
    with pytest.raises(ValueError, match=r"^disk_index_cache: .*at least 1024 bytes"):
        CacheConfig(disk_index_cache="1000B")


def test_disk_location_map_from_dask_config_to_the_disk_tier(tmp_path: Any) -> None:
    """``zcache.disk.location-map`` (`disk_location_map`): on by default, a bool, and whether
    the disk tier holds its location map."""
    from xarray_zcache.cache import HybridCache
    from xarray_zcache.cache.settings import CacheSettings

    assert CacheConfig().disk_location_map is True and CacheSettings().disk_location_map
    for value in (True, False):
        with dask.config.set({"zcache.disk.location-map": value}):
            cfg = CacheConfig().with_disk_cache(tmp_path / f"cache-{value}", "1MB")
        assert cfg.disk_location_map is value
        assert CacheConfig.from_dict(cfg.to_dict()) == cfg
        cache = HybridCache(cfg)
        try:
            disk = cache.disk_tier
            assert disk is not None and (disk._keydir is not None) is value
        finally:
            cache.close()
    for bad in ("yes", 1, None):
        with (
            dask.config.set({"zcache.disk.location-map": bad}),
            pytest.raises(ValueError, match=r"disk_location_map: invalid value .*expected a bool"),
        ):
            CacheConfig()
