"""The decoded-chunk tier of the xarray backend (issue 19 item 1), against a real moto S3.

A second read is served from decoded arrays without zarr's decode (counted at the codec
pipeline), values are zarr's own, every change the byte tiers would serve (another
writer after the validation interval, writes and deletes through a `CachedStore`, a
MemoryStore without versions) is served too, what the tier cannot serve goes to zarr,
the tier is bounded, and Dask graphs are unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from decoded_helpers import (
    make_cfg,
    open_zcache,
    plain_dataset,
    random_data,
    same,
    write_at_source,
    write_var,
    zarr_values,
    zstd,
)
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from xarray_zcache import CacheConfig, CachedStore, get_cache, open_store
from xarray_zcache.cache.decoded import DecodedTier
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import write_zarr

P = default_buffer_prototype()


def _cfg(tmp_path: Path, name: str, **kw: Any) -> CacheConfig:
    return make_cfg(
        tmp_path, name, validation=kw.pop("validation", "never"), decoded=kw.pop("decoded", None)
    )


def _write(url: str, opts: dict[str, Any], data: np.ndarray, **enc: Any) -> None:
    write_var(url, opts, data, compressors=enc.pop("compressors", zstd()), **enc)


_open, _zarr_values, _same, _data = open_zcache, zarr_values, same, random_data


# -- hits: no decode, zarr's values ---------------------------------------------------------------


def test_second_values_read_is_decoded_hits_without_decoding(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    decodes: dict[str, int],
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data()
    _write(url, s3_options, data, chunks=(1, 8, 8))  # 32 chunks
    expected = _zarr_values(url, s3_options)
    cfg = _cfg(tmp_path, "hits")
    with _open(url, s3_options, cfg) as ds:
        _same(ds.t.values, expected)
        cache = get_cache(cfg)
        before = cache.stats()
        decodes["chunks"] = 0
        gets = s3_server.requests.chunk_gets(s3_bucket)
        _same(ds.t.values, expected)
        d = cache.stats() - before
    assert decodes["chunks"] == 0
    assert (d.decoded_hits, d.decoded_misses) == (32, 0)
    assert d.requests_sent == 0 == s3_server.requests.chunk_gets(s3_bucket) - gets
    assert 0 < cache.stats().decoded_used <= cache.stats().decoded_capacity


def test_first_read_decodes_once_per_chunk_and_counts_match_the_server(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    decodes: dict[str, int],
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    _write(url, s3_options, _data(), chunks=(1, 8, 8))
    cfg = _cfg(tmp_path, "cold")
    with _open(url, s3_options, cfg) as ds:
        cache = get_cache(cfg)
        before, gets = cache.stats(), s3_server.requests.count("GET", bucket=s3_bucket)
        decodes["chunks"] = 0
        ds.t.values  # noqa: B018
        d = cache.stats() - before
    assert decodes["chunks"] == 32
    assert (d.decoded_hits, d.decoded_misses) == (0, 32)
    assert d.requests_sent == s3_server.requests.count("GET", bucket=s3_bucket) - gets == 32


@pytest.mark.parametrize(
    "case", ["int16-fill-missing", "v2", "edges", "oindex", "scalar", "slices"]
)
def test_values_equal_zarrs(
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    decodes: dict[str, int],
    case: str,
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data()
    enc: dict[str, Any] = {"chunks": (1, 8, 8)}
    if case == "int16-fill-missing":
        data = data.astype("i2")
        data[2:5] = -9  # whole chunks of the fill value: left unwritten
        enc.update(fill_value=-9, write_empty_chunks=False)
    elif case == "v2":
        enc["zarr_format"] = 2
    elif case == "edges":
        data = _data((7, 13, 11))
        enc["chunks"] = (2, 5, 4)
    _write(url, s3_options, data, **enc)

    def select(ds: xr.Dataset) -> np.ndarray:
        t = ds.t
        if case == "oindex":
            return np.asarray(t.isel(time=[0, 3, 7], y=[1, 9, 15], x=slice(2, 12)).values)
        if case == "scalar":
            return np.asarray(t.isel(time=3, y=9, x=0).values)
        if case == "slices":
            return np.asarray(t.isel(time=slice(1, 6, 2), y=slice(3, 14), x=5).values)
        return np.asarray(t.values)

    with plain_dataset(url, s3_options) as plain:
        expected = select(plain)
    cfg = _cfg(tmp_path, f"eq-{case}")
    with _open(url, s3_options, cfg) as ds:
        _same(select(ds), expected)
        decodes["chunks"] = 0
        before = get_cache(cfg).stats()
        _same(select(ds), expected)
        d = get_cache(cfg).stats() - before
    assert decodes["chunks"] == 0
    assert d.decoded_hits > 0 and d.decoded_misses == 0
    if case == "int16-fill-missing":
        assert d.negative_hits > 0  # the missing chunks: the fill value, no request


# -- changes are served: another writer, writes and deletes through zcache ------------------------


def test_another_writer_is_seen_after_the_validation_interval(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    import time

    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data()
    _write(url, s3_options, data, chunks=(1, 8, 8))
    cfg = _cfg(tmp_path, "other-writer", validation=1)
    with _open(url, s3_options, cfg) as ds:
        _same(ds.t.values, data)
        _same(ds.t.values, data)  # decoded now
        write_at_source(url, s3_options, np.s_[2, :8, :8], np.full((8, 8), 5.0, "f4"))
        new = data.copy()
        new[2, :8, :8] = 5.0
        got = ds.t.values  # within the interval (if the machine is quick): old or new
        assert np.array_equal(got, data) or np.array_equal(got, new)
        time.sleep(1.3)
        _same(ds.t.values, new)
        _same(ds.t.values, new)  # and decoded again


def test_write_and_delete_through_a_cached_store_are_seen_at_once(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data()
    _write(url, s3_options, data, chunks=(1, 8, 8))
    cfg = _cfg(tmp_path, "writes")
    with _open(url, s3_options, cfg) as ds:
        _same(ds.t.values, data)
        _same(ds.t.values, data)
        writer = open_store(url, storage_options=s3_options, cache_config=cfg, read_only=False)
        arr = zarr.open_array(writer, path="t", mode="r+")
        arr[1, 8:, 8:] = np.full((8, 8), 3.0, "f4")
        new = data.copy()
        new[1, 8:, 8:] = 3.0
        _same(ds.t.values, new)
        sync(writer.delete("t/c/4/0/0"))
        new[4, :8, :8] = np.nan  # the fill value xarray wrote (decoded as NaN)
        _same(ds.t.values, new)
        _same(ds.t.values, _zarr_values(url, s3_options))


def test_memory_store_without_versions_sees_writes(tmp_path: Path) -> None:
    inner = MemoryStore()
    data = _data()
    xr.Dataset({"t": (("time", "y", "x"), data)}).to_zarr(
        inner, zarr_format=3, encoding={"t": {"chunks": (1, 8, 8)}}, consolidated=False
    )
    cfg = CacheConfig().with_name("mem").without_disk_cache()
    store = CachedStore(inner, cfg)
    with _open(store, None, cfg, consolidated=False) as ds:
        _same(ds.t.values, data)
        _same(ds.t.values, data)
        assert store.stats().decoded_hits == 32
        writable = CachedStore(inner, cfg, read_only=False)
        zarr.open_array(writable, path="t", mode="r+")[0] = np.zeros((16, 16), "f4")
        new = data.copy()
        new[0] = 0
        _same(ds.t.values, new)


# -- what the tier does not serve goes to zarr ----------------------------------------------------


def test_strings_go_to_zarr_and_vindex_through_zarrs_pipeline(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, decodes: dict[str, int]
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data()
    names = np.array([f"name-{i}" for i in range(8)], dtype=object)
    ds0 = xr.Dataset({"t": (("time", "y", "x"), data), "s": (("time",), names)})
    write_zarr(ds0, url, s3_options, zarr_format=3, encoding={"t": {"chunks": (1, 8, 8)}})
    cfg = _cfg(tmp_path, "passthrough")
    with _open(url, s3_options, cfg) as ds:
        for _ in range(2):
            assert ds.s.values.tolist() == names.tolist()
        assert get_cache(cfg).stats().decoded_hits == 0  # strings: not served decoded
        picks = ds.t.isel(
            time=xr.DataArray([0, 3, 5], dims="p"), y=xr.DataArray([1, 9, 2], dims="p")
        )
        for i in range(2):
            decodes["chunks"] = 0
            np.testing.assert_array_equal(picks.values, data[[0, 3, 5], [1, 9, 2]])
            # vindex: zarr's own read, through the decoded pipeline (decoded_pipeline.py):
            # decoded once, then served decoded
            assert decodes["chunks"] > 0 if i == 0 else decodes["chunks"] == 0


@pytest.mark.parametrize("chunks", [None, {}], ids=["values", "dask"])
def test_sharded_arrays_are_served_per_inner_chunk(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    decodes: dict[str, int],
    chunks: Any,
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data((7, 16, 13))
    data[2, :8, :8] = np.nan  # an inner chunk of the fill value only: left out of its shard
    enc = {"chunks": (1, 8, 8), "shards": (2, 16, 16), "write_empty_chunks": False}
    write_zarr(
        xr.Dataset({"t": (("time", "y", "x"), data)}),
        url,
        s3_options,
        zarr_format=3,
        encoding={"t": enc},
    )

    def reads(ds: xr.Dataset) -> list[np.ndarray]:
        t = ds.t
        return [
            np.asarray(t.values),
            np.asarray(t.isel(time=3, y=slice(2, 11)).values),
            np.asarray(t.isel(time=[0, 4, 6], x=[1, 12]).values),
        ]

    with plain_dataset(url, s3_options) as plain:
        expected = reads(plain)
    cfg = _cfg(tmp_path, f"sharded-{chunks is None}")
    with _open(url, s3_options, cfg, chunks=chunks) as ds:
        cache = get_cache(cfg)
        before, gets = cache.stats(), s3_server.requests.count("GET", bucket=s3_bucket)
        for got, want in zip(reads(ds), expected, strict=True):
            _same(got, want)
        d = cache.stats() - before
        assert d.requests_sent == s3_server.requests.count("GET", bucket=s3_bucket) - gets
        decodes["chunks"] = 0
        before = cache.stats()
        for got, want in zip(reads(ds), expected, strict=True):
            _same(got, want)
        d = cache.stats() - before
    assert decodes["chunks"] == 0
    assert d.decoded_hits > 0 and d.decoded_misses == 0 and d.requests_sent == 0


def test_a_partial_shard_read_sends_the_requests_zarr_sends(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """Inner chunks of one shard are read as zarr reads them: neighbours coalesced into
    one range (zarr's ``sharding_coalesce_*`` settings), not one GET per inner chunk.
    Before: 5 GETs (the index + 4 inner chunks) where zarr sends 2."""
    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data((64, 64))
    enc = {"chunks": (8, 64), "shards": (64, 64)}
    write_zarr(
        xr.Dataset({"t": (("y", "x"), data)}), url, s3_options, zarr_format=3, encoding={"t": enc}
    )
    sent = {}
    for decoded in (0, "8MB"):
        cfg = _cfg(tmp_path / str(decoded), f"coalesce-{decoded}", decoded=decoded)
        with _open(url, s3_options, cfg) as ds:
            gets = s3_server.requests.chunk_gets(s3_bucket)
            _same(ds.t[0:32].values, data[0:32])  # 4 of the shard's 8 inner chunks
            sent[decoded] = s3_server.requests.chunk_gets(s3_bucket) - gets
            gets = s3_server.requests.chunk_gets(s3_bucket)
            _same(ds.t[0:32].values, data[0:32])
            assert s3_server.requests.chunk_gets(s3_bucket) == gets  # warm: none
    assert sent["8MB"] == sent[0] == 2  # the index, then one range of 4 inner chunks


def test_variable_chunks_go_to_zarr(tmp_path: Path) -> None:
    inner = MemoryStore()
    with zarr.config.set({"array.rectilinear_chunks": True}):
        try:
            arr = zarr.create_array(
                inner, name="v", shape=(10,), chunks=[[3, 7]], dtype="f8", dimension_names=["x"]
            )
        except Exception as exc:  # pragma: no cover - zarr without variable chunk grids
            pytest.skip(f"zarr cannot write variable chunks here: {exc}")
        arr[:] = np.arange(10.0)
        cfg = CacheConfig().with_name("rect").without_disk_cache()
        store = CachedStore(inner, cfg)
        with _open(store, None, cfg, consolidated=False) as ds:
            for _ in range(2):
                assert ds.v.values.tolist() == list(np.arange(10.0))
        assert store.stats().decoded_hits == 0


# -- the bound and the option ---------------------------------------------------------------------


def test_a_small_tier_evicts_and_stays_within_its_bound(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data()
    _write(url, s3_options, data, chunks=(1, 8, 8))
    cfg = _cfg(tmp_path, "small", decoded="5kB")  # ~2 chunks of 256 B + their bytes
    with _open(url, s3_options, cfg) as ds:
        for _ in range(2):
            _same(ds.t.values, data)
    s = get_cache(cfg).stats()
    assert s.decoded_capacity == 5000
    assert 0 < s.decoded_used <= 5000
    assert s.decoded_evictions > 0 and s.decoded_entries < 32


def test_zero_turns_the_tier_off(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, decodes: dict[str, int]
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data()
    _write(url, s3_options, data, chunks=(1, 8, 8))
    cfg = _cfg(tmp_path, "off", decoded=0)
    with _open(url, s3_options, cfg) as ds:
        _same(ds.t.values, data)
        decodes["chunks"] = 0
        _same(ds.t.values, data)
    assert decodes["chunks"] == 32
    s = get_cache(cfg).stats()
    assert (s.decoded_hits, s.decoded_misses, s.decoded_used, s.decoded_capacity) == (0, 0, 0, 0)


def test_decoded_memory_size_option() -> None:
    assert CacheConfig(decoded_memory_size="2MB").decoded_memory_size == 2_000_000
    assert CacheConfig().with_decoded_memory_size(0).decoded_memory_size == 0
    default = CacheConfig().with_memory_size("100MB").with_decoded_memory_size(None)
    from xarray_zcache.cache.settings import CacheSettings

    assert CacheSettings.of(default).decoded_capacity() == 50_000_000
    for bad in ("lots", -1, True):
        with pytest.raises(ValueError, match="decoded_memory_size"):
            CacheConfig(decoded_memory_size=bad)
    import dask.config

    with dask.config.set({"zcache.decoded-memory-size": "3MB"}):
        assert CacheConfig().decoded_memory_size == 3_000_000
    with (
        dask.config.set({"zcache.decoded-memory-size": "lots"}),
        pytest.raises(ValueError, match="decoded-memory-size"),
    ):
        CacheConfig()


def test_decoded_tier_unit() -> None:
    tier = DecodedTier(3000)
    raw = bytes(100)
    assert tier.put("ns/a/c/0", raw, np.zeros(100, "f4"))
    hit = tier.get("ns/a/c/0", bytes(100))  # equal bytes, another object: still exact
    assert hit is not None and not hit.flags.writeable
    assert tier.get("ns/a/c/0", b"\x01" * 100) is None  # other bytes: a miss, dropped
    assert "ns/a/c/0" not in tier and tier.used_bytes() == 0
    tier.put("ns/a/c/0", raw, np.zeros(100, "f4"))
    tier.put("ns/a/c/1", raw, np.zeros(100, "f4"))
    assert tier.drop("ns/a/", prefix=True) == 2 and len(tier) == 0
    assert not tier.put("big", raw, np.zeros(10_000, "f4"))  # never fits


# -- Dask ---------------------------------------------------------------------------------------


def test_dask_graphs_unchanged_and_values_served_decoded(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, decodes: dict[str, int]
) -> None:
    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data()
    _write(url, s3_options, data, chunks=(1, 8, 8))
    tasks = {}
    for decoded in (0, None):
        cfg = _cfg(tmp_path, f"dask-{decoded}", decoded=decoded)
        with _open(url, s3_options, cfg, chunks={}) as ds:
            tasks[decoded] = len(ds.t.data.__dask_graph__())
            _same(ds.t.compute().values, data)
            decodes["chunks"] = 0
            _same(ds.t.compute().values, data)
            assert decodes["chunks"] == (32 if decoded == 0 else 0)
    assert tasks[0] == tasks[None]


def test_random_basic_and_orthogonal_selections_equal_zarrs() -> None:
    rng = np.random.default_rng(3)
    inner = MemoryStore()
    data = _data((7, 13, 11))
    xr.Dataset({"t": (("time", "y", "x"), data)}).to_zarr(
        inner, zarr_format=3, encoding={"t": {"chunks": (2, 5, 4)}}, consolidated=False
    )
    plain = zarr.open_array(inner, path="t", mode="r")
    cfg = CacheConfig().with_name("random").without_disk_cache()
    store = CachedStore(inner, cfg)
    cached = zarr.open_array(store, path="t", mode="r")
    from xarray_zcache.decoded_reads import plan_of, read_selection

    plan = plan_of(cached)
    assert plan is not None

    def pick(n: int) -> Any:
        kind = rng.integers(4)
        if kind == 0:
            return int(rng.integers(-n, n))
        if kind == 1:
            return np.int64(rng.integers(n))
        a, b = sorted(rng.integers(-n - 2, n + 2, 2).tolist())
        return slice(a, b, None if kind == 2 else int(rng.integers(1, 3)))

    for _ in range(300):
        sel = tuple(pick(n) for n in data.shape)
        got = read_selection(plan, sel, orthogonal=False)
        want = plain[sel]
        assert np.shape(got) == np.shape(want) and np.asarray(got).dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(got, want)
    for _ in range(50):
        sel = tuple(np.sort(rng.choice(n, rng.integers(1, n), replace=False)) for n in data.shape)
        np.testing.assert_array_equal(read_selection(plan, sel, orthogonal=True), plain.oindex[sel])
    assert store.stats().decoded_hits > 0


# -- on a cluster -------------------------------------------------------------------------------


def _worker_decoded(dask_worker: Any) -> tuple[int, int, int, int]:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None
    s = state.cache.stats()
    return s.decoded_hits, s.decoded_misses, s.decoded_used, s.decoded_capacity


def test_workers_serve_decoded_chunks(
    s3_server: LocalS3Server, s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster

    import xarray_zcache.distributed as zd

    url = f"s3://{s3_bucket}/ds.zarr"
    data = _data()
    _write(url, s3_options, data, chunks=(1, 8, 8))
    cfg = _cfg(tmp_path, "cluster")._replace(memory_fraction=None)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        zd.install(client, cfg)
        with _open(url, s3_options, cfg, chunks={}) as ds:
            _same(ds.t.compute().values, data)
            gets = s3_server.requests.chunk_gets(s3_bucket)
            _same(ds.t.compute().values, data)
            assert s3_server.requests.chunk_gets(s3_bucket) == gets
        ((hits, misses, used, capacity),) = client.run(_worker_decoded).values()
    assert (hits, misses) == (32, 32)
    assert 0 < used <= capacity == 16_000_000  # half of the 32 MB memory tier


def test_scalars_booleans_complex_and_times_are_served_exactly(decodes: dict[str, int]) -> None:
    inner = MemoryStore()
    ds0 = xr.Dataset(
        {
            "s": ((), np.float32(3.5)),
            "b": (("x",), np.array([True, False, True])),
            "c": (("x",), np.array([1 + 2j, 3, 4j], dtype="complex64")),
            "when": (("x",), np.array(["2020-01-01", "2021-01-01", "NaT"], dtype="M8[ns]")),
        }
    )
    ds0.to_zarr(inner, zarr_format=3, consolidated=False)
    cfg = CacheConfig().with_name("kinds").without_disk_cache()
    store = CachedStore(inner, cfg)
    for n in range(2):  # (open twice, closed at the end: closing lets the cache go)
        ds = _open(store, None, cfg, consolidated=False)
        # (xarray reads a time variable's ends while it opens, before the backend's
        # wrapper is in place: zarr decodes those)
        decodes["chunks"] = 0
        for name, var in ds0.data_vars.items():
            assert ds[name].dtype == var.dtype
            np.testing.assert_array_equal(ds[name].values, var.values)
        if n:
            assert decodes["chunks"] == 0
    ds.close()
    assert store.stats().decoded_hits >= 4


def test_disk_hits_with_equal_bytes_are_decoded_hits(
    tmp_path: Path, decodes: dict[str, int]
) -> None:
    """The memory tier too small for the chunks: every read finds the bytes on disk (a new
    bytes object each time); equal bytes still serve the decoded array, and a rewrite of
    a local file by another writer is seen after the validation interval."""
    import time

    path = tmp_path / "local.zarr"
    data = _data()
    xr.Dataset({"t": (("time", "y", "x"), data)}).to_zarr(
        path, zarr_format=3, encoding={"t": {"chunks": (1, 8, 8)}}, consolidated=False
    )
    cfg = (
        CacheConfig()
        .with_name("disk-hits")
        .with_memory_size(4096)  # a few chunks at most
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_decoded_memory_size("1MB")
        .with_prefetch(0)
        .with_validation(1)
    )
    ds = _open(str(path), None, cfg, consolidated=False)
    _same(ds.t.values, data)
    get_cache(cfg).flush()  # the disk writes done
    before = get_cache(cfg).stats()
    decodes["chunks"] = 0
    _same(ds.t.values, data)
    d = get_cache(cfg).stats() - before
    assert decodes["chunks"] == 0 and d.decoded_hits == 32
    assert d.total_hits(tier="disk") > 0 and d.requests_sent == 0
    other = zarr.open_array(str(path), path="t", mode="r+")
    other[5] = np.full((16, 16), 7.0, "f4")
    new = data.copy()
    new[5] = 7.0
    time.sleep(1.3)
    _same(ds.t.values, new)
    ds.close()
