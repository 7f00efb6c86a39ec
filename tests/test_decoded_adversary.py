"""Adversarial tests of the decoded tier (issue 19 item 1), against a real moto S3.

Each test tries to make the decoded tier serve values zarr itself would not return now:
another process writing through zcache, another writer rewriting a chunk with bytes of
the same length or the very same bytes, encoded bytes read from disk each time, the
array's metadata changed under identical chunk bytes (dtype, endianness, chunk shape),
fill values of missing chunks, readers racing a writer, sharded arrays, the tier's
bound, and the selections the backend serves. Real S3 (moto), zarr, xarray, files and
a child process; no mocks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numcodecs
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
)

from xarray_zcache import CacheConfig, get_cache, open_store
from xarray_zcache.cache.decoded import DecodedTier
from xarray_zcache.sessions import close_filesystem_session
from xarray_zcache.testing.writers import s3fs_store, write_zarr

INTERVAL = 1.0
MARGIN = 0.5


def _cfg(
    tmp_path: Path, name: str, *, memory: str = "32MB", validation: Any = INTERVAL
) -> CacheConfig:
    return make_cfg(tmp_path, name, memory=memory, validation=validation, decoded="16MB")


def _write(url: str, opts: dict[str, Any], data: np.ndarray, **enc: Any) -> None:
    write_var(url, opts, data, compressors=enc.pop("compressors", None), **enc)


def _data(shape: tuple[int, ...] = (4, 8, 8), dtype: str = "f4", seed: int = 7) -> np.ndarray:
    return random_data(shape, dtype, seed)


_open, _zarr_values, _same = open_zcache, zarr_values, same


# -- 5. metadata changed under identical chunk bytes ----------------------------------------------


def _raw_array(
    url: str, opts: dict[str, Any], data: np.ndarray, chunks: tuple[int, ...], **kw: Any
) -> None:
    """``data`` as array ``t`` of a fresh zarr v3 group, written by plain zarr (no zcache)."""
    v2 = kw.pop("zarr_format", 3) == 2
    with s3fs_store(url, opts) as store:
        root = zarr.open_group(store, mode="w", zarr_format=2 if v2 else 3)
        dims = ("time", "y", "x")[: data.ndim]
        if not v2:
            kw["dimension_names"] = dims
        arr = root.create_array(
            "t",
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            compressors=kw.pop("compressors", None),
            fill_value=kw.pop("fill_value", None if v2 else 0),
            **kw,
        )
        if v2:
            arr.attrs["_ARRAY_DIMENSIONS"] = list(dims)
        arr[...] = data


def _raw(url: str, opts: dict[str, Any], key: str) -> bytes:
    import fsspec

    fs = fsspec.filesystem("s3", **opts)
    try:
        return bytes(fs.cat_file(f"{url.removeprefix('s3://')}/t/{key}"))
    finally:
        close_filesystem_session(fs)  # (not left to the garbage collector)


_CHANGES = ("dtype", "endian", "chunk-shape", "v2-dtype", "codec")


def test_metadata_change_under_identical_chunk_bytes(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """Another writer rewrites the array at the same path with new metadata whose chunk
    objects are byte for byte the old ones: int32 -> float32 (v3 and v2), little ->
    big endian, chunks 4x4 -> 2x8 (and zstd -> no compressor, other bytes). The old
    decoded arrays must not be served (before the fix: int values cast to float,
    unswapped ints, a broadcast error)."""
    old = np.arange(64, dtype="<i4").reshape(1, 8, 8) * 1000 + 1
    cfg = _cfg(tmp_path, "meta")
    url = {c: f"s3://{s3_bucket}/meta-{c}.zarr" for c in _CHANGES}
    fmt = {c: 2 if c.startswith("v2") else 3 for c in _CHANGES}
    for c in _CHANGES:
        zstd = [zarr.codecs.ZstdCodec()] if c == "codec" else None
        _raw_array(url[c], s3_options, old, (1, 4, 4), zarr_format=fmt[c], compressors=zstd)
        with _open(url[c], s3_options, cfg) as ds:
            _same(ds.t.values, old)
            _same(ds.t.values, old)  # decoded entries now
    assert get_cache(cfg).stats().decoded_hits == 4 * len(_CHANGES)
    expected = {}
    for c in _CHANGES:  # the same chunk keys, byte-identical chunk objects, new metadata
        if c in ("dtype", "v2-dtype"):
            new = old.view("<f4")
            _raw_array(url[c], s3_options, new, (1, 4, 4), zarr_format=fmt[c])
        elif c == "endian":
            new = old.byteswap()  # its big-endian encoding: the bytes of ``old`` little-endian
            big = zarr.codecs.BytesCodec(endian="big")
            _raw_array(url[c], s3_options, new, (1, 4, 4), serializer=big)
        elif c == "codec":  # zstd -> no compressor (other bytes: a plain miss)
            new = old * -3
            _raw_array(url[c], s3_options, new, (1, 4, 4))
        else:  # chunks c/0/0/0 and c/0/1/0 hold the same 64 bytes as before
            new = old.copy() + 7
            new[0, 0:2, :] = old[0, 0:4, 0:4].reshape(2, 8)
            new[0, 2:4, :] = old[0, 4:8, 0:4].reshape(2, 8)
            _raw_array(url[c], s3_options, new, (1, 2, 8))
        first = "c/0/0/0" if fmt[c] == 3 else "0.0.0"
        if c != "codec":  # the premise: the very same chunk bytes
            assert _raw(url[c], s3_options, first) == old[0, 0:4, 0:4].tobytes()
        expected[c] = _zarr_values(url[c], s3_options)
        _same(expected[c].astype(new.dtype), new)
    time.sleep(INTERVAL + MARGIN)
    for c in _CHANGES:
        with _open(url[c], s3_options, cfg) as ds:
            _same(ds.t.values, expected[c])
            _same(ds.t.values, expected[c])
            _same(ds.t[0, 1:7, ::-3].values, expected[c][0, 1:7, ::-3])


# -- 2, 3, 4: another writer rewrites a chunk -----------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "bytes_"),
    [("32MB", "same-length"), ("600B", "same-length"), ("32MB", "identical")],
    ids=["same-length", "same-length-disk-only", "identical"],
)
def test_another_writer_rewrites_a_chunk(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, memory: str, bytes_: str
) -> None:
    """Uncompressed chunks of 1 KB: a rewrite has the same length (different content) or
    the very same bytes. ``600B``: the memory tier holds no chunk, the encoded bytes come
    from the disk tier each time (a new ``bytes`` object, equal content)."""
    url = f"s3://{s3_bucket}/rw.zarr"
    data = _data((4, 16, 16))
    _write(url, s3_options, data, chunks=(1, 16, 16))
    cfg = _cfg(tmp_path, f"rw-{memory}-{bytes_}", memory=memory)
    with _open(url, s3_options, cfg) as ds:
        _same(ds.t.values, data)
        # the disk writer yields to reads (cache/writer.py): until it has written, the
        # chunks are served from its queue (memory hits); then from disk
        get_cache(cfg).flush()
        before = get_cache(cfg).stats()
        _same(ds.t.values, data)
        d = get_cache(cfg).stats() - before
        assert d.decoded_hits == 4 and d.decoded_misses == 0
        if memory == "600B":
            s = get_cache(cfg).stats()
            assert d.total_hits("chunk", "disk") >= 3, (s.memory_capacity, s.memory_used)
        new = data.copy()
        new[2] = data[2] if bytes_ == "identical" else data[2][::-1] + 0.5
        write_at_source(url, s3_options, 2, new[2])
        assert len(_raw(url, s3_options, "c/2/0/0")) == data[2].nbytes
        got = ds.t.values  # within the interval: old or new, whole
        assert np.array_equal(got, data) or np.array_equal(got, new)
        time.sleep(INTERVAL + MARGIN)
        for _ in range(3):
            _same(ds.t.values, new)
        _same(new, _zarr_values(url, s3_options))


# -- 6. fill value changed, a chunk deleted at the source -----------------------------------------


def test_missing_chunk_takes_the_new_fill_value(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    import fsspec

    url = f"s3://{s3_bucket}/fill.zarr"
    data = np.arange(128, dtype="i2").reshape(2, 8, 8)
    _raw_array(url, s3_options, data, (1, 4, 4), fill_value=-1)
    cfg = _cfg(tmp_path, "fill")
    with _open(url, s3_options, cfg, mask_and_scale=False) as ds:
        _same(ds.t.values, data)
        _same(ds.t.values, data)
    fill = -9
    _raw_array(url, s3_options, data, (1, 4, 4), fill_value=fill)
    fs = fsspec.filesystem("s3", **s3_options)
    fs.rm(f"{url.removeprefix('s3://')}/t/c/1/1/0")
    close_filesystem_session(fs)
    new = data.copy()
    new[1, 4:, :4] = fill
    time.sleep(INTERVAL + MARGIN)
    with _open(url, s3_options, cfg, mask_and_scale=False) as ds:
        _same(ds.t.values, new)
        _same(ds.t.values, new)
        _same(ds.t[1, 3:6, 2:5].values, new[1, 3:6, 2:5])
    with plain_dataset(url, s3_options, mask_and_scale=False) as z:
        _same(z.t.values, new)


# -- 1. another process writes through zcache into the same cache folder --------------------------

_WRITER = """
import json, sys
import numpy as np, zarr
from zarr.core.sync import sync
from xarray_zcache import CacheConfig, open_store
args = json.loads(sys.argv[1])
cfg = (CacheConfig().with_name("p1").with_memory_size("32MB")
       .with_disk_cache(args["folder"], "64MB").with_prefetch(0)
       .with_validation(args["interval"]).with_client("s3fs"))
store = open_store(args["url"], storage_options=args["opts"], cache_config=cfg, read_only=False)
arr = zarr.open_array(store, path="t", mode="r+")
for line in sys.stdin:
    if line.strip() == "delete":
        sync(store.delete("t/c/2/0/0"))
    else:
        arr[1, :8, :8] = np.full((8, 8), float(line), "f4")
    print("written", flush=True)
"""


@pytest.mark.parametrize("memory", ["32MB", "600B"], ids=["memory", "disk-only"])
def test_another_process_writes_through_zcache(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, memory: str
) -> None:
    url = f"s3://{s3_bucket}/proc.zarr"
    data = _data((4, 16, 16))
    _write(url, s3_options, data, chunks=(1, 8, 8) if memory == "32MB" else (1, 16, 16))
    cfg = _cfg(tmp_path, f"p2-{memory}", memory=memory)
    args = {"folder": str(tmp_path / "cache"), "interval": INTERVAL, "url": url, "opts": s3_options}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with _open(url, s3_options, cfg) as ds:
            current = data
            for value in ("5.0", "delete"):
                _same(ds.t.values, current)
                _same(ds.t.values, current)  # decoded hits in this process
                new = current.copy()
                if value == "delete":  # the chunk at the source gone: the fill value (NaN)
                    side = 8 if memory == "32MB" else 16  # the chunk c/2/0/0
                    new[2, :side, :side] = np.nan
                else:
                    new[1, :8, :8] = float(value)
                proc.stdin.write(f"{value}\n")
                proc.stdin.flush()
                assert proc.stdout.readline().strip() == "written"
                written = time.monotonic()
                seen_new_at = None
                while time.monotonic() - written < INTERVAL + MARGIN:
                    got = ds.t.values
                    if np.array_equal(got, new, equal_nan=True):
                        seen_new_at = seen_new_at or time.monotonic() - written
                    else:  # old values only before the new ones were ever seen
                        _same(got, current)
                        assert seen_new_at is None, "old values after the new ones"
                    time.sleep(0.05)
                for _ in range(3):
                    _same(ds.t.values, new)
                assert seen_new_at is not None  # (within the interval + margin)
                current = new
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0


# -- 7. readers racing a writer through the cache -------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "memory"),
    [(None, "32MB"), ({}, "32MB"), (None, "100B")],
    ids=["values", "dask", "values-disk-only"],
)
def test_readers_racing_a_writer_see_whole_chunks(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, chunks: Any, memory: str
) -> None:
    """``100B``: no chunk fits the memory tier; the bytes come from the disk tier, whose
    writer runs behind (and yields to reads): an old version landing on disk after a
    newer write would be served."""
    url = f"s3://{s3_bucket}/race.zarr"
    base = np.arange(8 * 8, dtype="f8").reshape(8, 8)  # within a chunk: distinct values

    def version(k: int) -> np.ndarray:
        return np.tile(base, (2, 2, 2)) + 1000.0 * k  # (2, 16, 16), chunks (1, 8, 8)

    _write(url, s3_options, version(0), chunks=(1, 8, 8), compressors=[zarr.codecs.ZstdCodec()])
    cfg = _cfg(tmp_path, f"race-{chunks}-{memory}", memory=memory)
    writer = open_store(url, storage_options=s3_options, cache_config=cfg, read_only=False)
    arr = zarr.open_array(writer, path="t", mode="r+")
    last = 10
    problems: list[str] = []
    done = threading.Event()
    with _open(url, s3_options, cfg, chunks=chunks) as ds:
        _same(ds.t.values, version(0))

        def check(got: np.ndarray) -> None:
            for i in range(2):
                for y in (0, 8):
                    for x in (0, 8):
                        block = got[i, y : y + 8, x : x + 8]
                        k = (block[0, 0] - base[0, 0]) / 1000.0
                        if not (k == int(k) and np.array_equal(block, base + 1000.0 * k)):
                            problems.append(f"chunk {(i, y, x)} mixed: {np.unique(block // 1000)}")

        def read() -> None:
            while not done.is_set():
                check(np.asarray(ds.t.values))
                check(np.asarray(ds.t[:, ::-1, :][:, ::-1, :].values))

        def write() -> None:
            try:
                for k in range(1, last + 1):
                    arr[...] = version(k)
            finally:
                done.set()

        threads = [threading.Thread(target=read) for _ in range(3)]
        threads.append(threading.Thread(target=write))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not problems, problems[:5]
        _same(ds.t.values, version(last))
        _same(ds.t.values, version(last))
    _same(_zarr_values(url, s3_options), version(last))


# -- 8. a sharded array: an inner chunk rewritten by another writer -------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
def test_sharded_inner_chunk_rewritten_by_another_writer(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, compressed: bool
) -> None:
    url = f"s3://{s3_bucket}/shard.zarr"
    data = _data((4, 16, 16))
    enc: dict[str, Any] = {"chunks": (1, 8, 8), "shards": (2, 16, 16)}
    enc["compressors"] = [zarr.codecs.ZstdCodec()] if compressed else None
    _write(url, s3_options, data, **enc)
    cfg = _cfg(tmp_path, f"shard-{compressed}")

    def reads(ds: xr.Dataset) -> list[np.ndarray]:
        t = ds.t
        return [
            t[1, :8, 8:].values,  # one inner chunk: the index, then its range
            t[0:2, 4:12, 4:12].values,  # four inner chunks of two shards... of one shard
            t[:, ::-1, ::3].values,
            t.values,  # whole shards
        ]

    def expect(a: np.ndarray) -> list[np.ndarray]:
        return [a[1, :8, 8:], a[0:2, 4:12, 4:12], a[:, ::-1, ::3], a]

    with _open(url, s3_options, cfg) as ds:
        for _ in range(2):
            for got, want in zip(reads(ds), expect(data), strict=True):
                _same(got, want)
        assert get_cache(cfg).stats().decoded_hits > 0
        new = data.copy()
        new[1, :8, 8:] = data[0, 8:, :8] * -1.0  # the same length raw; its neighbours kept
        new[0, 8:, :8] = data[1, :8, 8:]  # two inner chunks swap places (raw: same ranges)
        write_at_source(url, s3_options, np.s_[0:2], new[0:2])
        time.sleep(INTERVAL + MARGIN)
        for _ in range(2):
            for got, want in zip(reads(ds), expect(new), strict=True):
                _same(got, want)
    _same(_zarr_values(url, s3_options), new)


# -- 9. the decoded tier stays within its bound ---------------------------------------------------


def test_decoded_tier_stays_bounded_under_many_arrays(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/many.zarr"
    rng = np.random.default_rng(3)
    vars_ = {f"v{i}": rng.normal(size=(4, 16, 16)).astype("f4") for i in range(24)}
    big = rng.normal(size=(1, 128, 128)).astype("f8")  # one chunk of 128 KB: never admitted
    ds0 = xr.Dataset({k: (("time", "y", "x"), v) for k, v in vars_.items()})
    ds0["big"] = (("one", "yy", "xx"), big)
    enc = {k: {"chunks": (1, 16, 16), "compressors": None} for k in vars_}
    write_zarr(ds0, url, s3_options, zarr_format=3, encoding=enc, mode="w")
    cfg = _cfg(tmp_path, "bounded").with_decoded_memory_size("40KB")
    problems: list[str] = []
    with _open(url, s3_options, cfg) as ds:
        cache = get_cache(cfg)
        cap = cache.stats().decoded_capacity
        assert 0 < cap <= 40 * 1024

        def hammer(seed: int) -> None:
            r = np.random.default_rng(seed)
            for _ in range(20):
                name = f"v{r.integers(24)}"
                i = int(r.integers(4))
                if not np.array_equal(ds[name][i, ::-1].values, vars_[name][i, ::-1]):
                    problems.append(name)
                s = cache.stats()
                if s.decoded_used > s.decoded_capacity:
                    problems.append(f"used {s.decoded_used} > {s.decoded_capacity}")
            if not np.array_equal(ds.big.values, big):
                problems.append("big")

        threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        s = cache.stats()
    assert not problems, problems[:5]
    assert 0 < s.decoded_used <= s.decoded_capacity
    assert s.decoded_evictions > 0 and s.decoded_hits > 0


# -- 10. selections of the backend equal zarr's own reads -----------------------------------------


def test_selections_equal_zarrs_own_reads(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/sel.zarr"
    rng = np.random.default_rng(11)
    shape = (5, 13, 11)
    ds0 = xr.Dataset(
        {
            "f": (("time", "y", "x"), rng.normal(size=shape).astype("f8")),
            "i": (("time", "y", "x"), rng.integers(-1000, 1000, shape).astype("i4")),
            "b": (("time", "y", "x"), rng.integers(0, 2, shape).astype(bool)),
            "u": (("time", "y", "x"), rng.integers(0, 200, shape).astype("u1")),
        },
        coords={"y": np.arange(13) * 10.0, "x": np.arange(11) * -2},
    )
    enc = {
        "f": {"chunks": (2, 4, 3)},
        "i": {"chunks": (1, 5, 4), "compressors": None},
        "b": {"chunks": (3, 3, 3)},
        "u": {"chunks": (2, 13, 2), "fill_value": 7, "write_empty_chunks": False},
    }
    ds0["u"][1:3, :, 0:4] = 7  # chunks of the fill value only: missing at the source
    write_zarr(ds0, url, s3_options, zarr_format=3, encoding=enc, mode="w")
    mask = rng.integers(0, 2, 13).astype(bool)
    sels: list[Any] = [
        lambda d: d,
        lambda d: d.isel(y=slice(None, None, -1)),
        lambda d: d.isel(time=slice(4, 0, -2), x=slice(-1, None, -3)),
        lambda d: d.isel(y=[12, 0, 5, 5, 3], x=[10, 1]),
        lambda d: d.isel(y=mask),
        lambda d: d.isel(time=-1, y=mask, x=slice(9, 2, -1)),
        lambda d: d.isel(time=2, y=7, x=3),
        lambda d: d.sel(y=slice(100.0, 20.0, -2)),
        lambda d: d.sel(x=slice(-2, -16), y=[30.0, 0.0]),
        lambda d: d.isel(x=slice(3, 3)),
        lambda d: d.isel(y=np.array([], dtype=int)),
    ]
    cfg = _cfg(tmp_path, "sel", validation="never")
    with plain_dataset(url, s3_options) as z:
        want = [{v: np.asarray(sel(z)[v].values) for v in ds0.data_vars} for sel in sels]
    for chunks in (None, {}):
        with _open(url, s3_options, cfg, chunks=chunks) as ds:
            for _ in range(2 if chunks is None else 1):  # cold, then decoded hits
                for n, sel in enumerate(sels if chunks is None else sels[1:9:4]):
                    n = n if chunks is None else 1 + 4 * n
                    for v in ds0.data_vars:
                        got = np.asarray(sel(ds)[v].values)
                        assert got.dtype == want[n][v].dtype, (n, v)
                        np.testing.assert_array_equal(got, want[n][v], err_msg=f"sel {n} {v}")
    assert get_cache(cfg).stats().decoded_hits > 0


# -- 8b. a partial shard read within the interval: a cached index, an uncached inner chunk -------


def test_partial_shard_read_never_mixes_an_old_index_with_new_bytes(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """The shard's index (and inner chunk A) are cached; another writer rewrites the shard
    (compressed: every inner chunk moves); inner chunk B, never read, is read within the
    interval: its byte range from the old index must not be cut from the new shard."""
    url = f"s3://{s3_bucket}/mix.zarr"
    rng = np.random.default_rng(5)
    data = rng.integers(0, 50, (2, 16, 16)).astype("i4")  # compressible, sizes vary
    enc = {"chunks": (1, 8, 8), "shards": (2, 16, 16), "compressors": [zarr.codecs.ZstdCodec()]}
    _write(url, s3_options, data, **enc)
    cfg = _cfg(tmp_path, "mix", validation=30)  # the interval does not pass in this test
    with _open(url, s3_options, cfg) as ds:
        _same(ds.t[0, :8, :8].values, data[0, :8, :8])  # the index and inner chunk A
        _same(ds.t[0, :8, :8].values, data[0, :8, :8])
        new = rng.integers(0, 5000, (2, 16, 16)).astype("i4")  # other sizes
        write_at_source(url, s3_options, ..., new)
        for sel in (np.s_[1, 8:, 8:], np.s_[0, :8, 8:], np.s_[:, 4:12, 4:12], np.s_[...]):
            got = ds.t[sel].values
            assert np.array_equal(got, data[sel]) or np.array_equal(got, new[sel]), sel
    _same(_zarr_values(url, s3_options), new)


# -- 10b. zarr v2: big-endian, Fortran order; values handed out are copies ------------------------


def test_v2_big_endian_fortran_and_mutating_results(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/v2.zarr"
    rng = np.random.default_rng(2)
    with s3fs_store(url, s3_options) as store:
        root = zarr.open_group(store, mode="w", zarr_format=2)
        values = {}
        delta = [numcodecs.Delta(dtype="<i8")]
        scale = [numcodecs.FixedScaleOffset(offset=0, scale=10, dtype="<f8", astype="<i4")]
        for name, dtype, order, filters in (
            ("be", ">f8", "C", None),
            ("fo", "<i8", "F", None),
            ("de", "<i8", "C", delta),  # numcodecs filters: zarr's V2Codec decodes them
            ("sc", "<f8", "F", scale),
            ("mi", "<u2", "C", None),  # no fill value, chunks missing at the source
        ):
            a = rng.integers(-300, 300, (3, 7, 5)).astype(dtype)
            arr = root.create_array(
                name,
                shape=a.shape,
                dtype=dtype,
                chunks=(2, 3, 4),
                order=order,
                fill_value=None,
                filters=filters,
                compressors=numcodecs.Zlib(level=1),
            )
            arr.attrs["_ARRAY_DIMENSIONS"] = ["time", "y", "x"]
            if name == "mi":
                arr[0:2, 0:3] = a[0:2, 0:3]
                a[:, 3:] = a[2:, :] = 0  # zarr's default for no fill value
            else:
                arr[...] = a
            values[name] = a
        zarr.consolidate_metadata(root.store)
    cfg = _cfg(tmp_path, "v2", validation="never")
    sels = [np.s_[::-1, 1:6, ::-2], np.s_[2, :, 3]]
    with plain_dataset(url, s3_options) as z:
        want = {(n, i): np.asarray(z[n][s].values) for n in values for i, s in enumerate(sels)}
    with _open(url, s3_options, cfg) as ds:
        for _ in range(2):
            for n in values:
                for i, s in enumerate(sels):
                    got = np.asarray(ds[n][s].values)
                    assert got.dtype == want[n, i].dtype, (n, got.dtype, want[n, i].dtype)
                    np.testing.assert_array_equal(got, want[n, i], err_msg=f"{n} {s}")
                    np.testing.assert_array_equal(got, values[n][s])
                    if got.ndim and got.flags.writeable:
                        got[...] = 0  # must not reach the decoded arrays
        assert get_cache(cfg).stats().decoded_hits > 0


def test_decoded_tier_entry_needs_the_same_decoding_spec() -> None:
    tier = DecodedTier(10_000)
    raw = np.arange(4, dtype="<i4").tobytes()
    assert tier.put("k", raw, np.arange(4, dtype="<i4"), "int32")
    assert tier.get("k", bytes(raw), "float32") is None  # equal bytes, another dtype
    assert "k" not in tier and tier.used_bytes() == 0  # dropped: it could never hit
    assert tier.put("k", raw, np.arange(4, dtype="<i4"), "int32")
    got = tier.get("k", bytes(raw), "int32")
    assert got is not None and got.tolist() == [0, 1, 2, 3]
