"""zarr's array API over a `CachedStore` through the decoded tier (issue 19: "within 3x of
TensorStore's warm read through the array API"), `xarray_zcache.decoded_pipeline`.

Real zarr, a real moto S3 where another writer or the request count matters, MemoryStores
for the grids of selections. Each test tries to make ``zarr.open_array(store=
CachedStore(...))[...]`` return what zarr itself would not return now: selections of
every kind (basic with steps and integers, orthogonal, vectorized, masks, blocks) over
partial edge chunks, missing chunks, sharded arrays and several dtypes; writes through
the array API (whole and partial chunks, sharded and not); another writer; the array's
metadata rewritten under the very same chunk bytes; arrays over other stores, the switch
off, and a codec pipeline the user chose.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pytest
import zarr
from decoded_helpers import make_cfg, same
from zarr.core.codec_pipeline import BatchedCodecPipeline, FusedCodecPipeline
from zarr.storage import MemoryStore

from xarray_zcache import CacheConfig, CachedStore, get_cache, open_store
from xarray_zcache import decoded_pipeline as dp
from xarray_zcache.decoded_pipeline import DecodedCodecPipeline
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import s3fs_store

INTERVAL = 1.0
MARGIN = 0.5


def _pipeline(a: zarr.Array) -> Any:
    return a._async_array.codec_pipeline


def _mem_cfg(name: str, decoded: Any = None) -> CacheConfig:
    return CacheConfig().with_name(name).without_disk_cache().with_decoded_memory_size(decoded)


def test_installed_over_zarrs_default() -> None:
    assert zarr.config.get("codec_pipeline.path") == dp.PATH
    assert dp.install() is True


# -- warm reads: decoded hits, no request, no decode ----------------------------------------------


def test_second_read_sends_no_request_and_counts_decoded_hits(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    decodes: dict[str, int],
) -> None:
    url = f"s3://{s3_bucket}/a.zarr"
    data = np.random.default_rng(1).normal(size=(8, 32, 32)).astype("f4")
    with s3fs_store(url, s3_options) as plain:  # (its session closed after)
        raw = zarr.create_array(
            plain,
            shape=data.shape,
            chunks=(1, 16, 16),
            dtype="f4",
            compressors=[zarr.codecs.ZstdCodec()],
        )
        raw[...] = data  # 32 chunks
    cfg = make_cfg(tmp_path, "api-hits")
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    a = zarr.open_array(store, mode="r")
    assert type(_pipeline(a)) is DecodedCodecPipeline
    cache = get_cache(cfg)
    before, gets = cache.stats(), s3_server.requests.chunk_gets(s3_bucket)
    decodes["chunks"] = 0
    same(a[:], data)
    d = cache.stats() - before
    assert decodes["chunks"] == 32 and (d.decoded_hits, d.decoded_misses) == (0, 32)
    assert d.requests_sent == s3_server.requests.chunk_gets(s3_bucket) - gets == 32
    for read in (lambda: a[:], lambda: a[...], lambda: a.oindex[:, :, :]):
        decodes["chunks"] = 0
        before, gets = cache.stats(), s3_server.requests.chunk_gets(s3_bucket)
        same(read(), data)
        d = cache.stats() - before
        assert decodes["chunks"] == 0
        assert (d.decoded_hits, d.decoded_misses) == (32, 0)
        assert d.requests_sent == 0 == s3_server.requests.chunk_gets(s3_bucket) - gets
    # a partial read: only the chunks it touches, all hits
    before = cache.stats()
    same(a[2:4, 5:20, 17], data[2:4, 5:20, 17])
    d = cache.stats() - before
    assert (d.decoded_hits, d.decoded_misses, d.requests_sent) == (4, 0, 0)


# -- values: zarr's own, for a grid of arrays and selections --------------------------------------


def _array(inner: MemoryStore, kind: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Array ``kind`` written into ``inner`` by plain zarr; its data and open options."""
    rng = np.random.default_rng(3)
    shape, chunks = (7, 13, 11), (2, 5, 4)  # partial edge chunks on every axis
    kw: dict[str, Any] = {"compressors": [zarr.codecs.ZstdCodec()]}
    opts: dict[str, Any] = {}
    if kind == "int16-missing":
        data = rng.integers(-500, 500, shape).astype("i2")
        data[2:4] = -9  # whole chunks of the fill value: not written
        data[:, 10:, :4] = -9
        kw.update(fill_value=-9, config={"write_empty_chunks": False})
    elif kind == "bool":
        data = rng.random(shape) > 0.5
    elif kind == "datetime64":
        data = (np.datetime64("2020-01-01", "s") + rng.integers(0, 10**8, shape)).astype("M8[s]")
    elif kind == "big-endian":
        data = rng.normal(size=shape).astype(">f8")
        kw["serializer"] = zarr.codecs.BytesCodec(endian="big")
    elif kind == "sharded":
        data = rng.normal(size=shape).astype("f4")
        data[4:, :, :] = 0  # whole inner chunks and a whole shard of the fill value
        kw.update(shards=(4, 10, 8), fill_value=0, config={"write_empty_chunks": False})
    elif kind == "sharded-int16-edge":
        data = rng.integers(-500, 500, shape).astype("i2")
        kw.update(shards=(4, 10, 8), compressors=None)
    elif kind == "v2":
        data = rng.normal(size=shape).astype("f4")
        kw = {"zarr_format": 2, "compressors": None, "fill_value": 0}
    elif kind == "F-order":
        data = rng.normal(size=shape).astype("f4")
        opts["config"] = {"order": "F"}
    elif kind == "transpose":
        data = rng.normal(size=shape).astype("f4")
        kw["filters"] = [zarr.codecs.TransposeCodec(order=(2, 0, 1))]
    else:
        data = rng.normal(size=shape).astype("f4")
    a = zarr.create_array(inner, name="t", shape=shape, chunks=chunks, dtype=data.dtype, **kw)
    a[...] = data
    return data, opts


_KINDS = (
    "float32",
    "int16-missing",
    "bool",
    "datetime64",
    "big-endian",
    "sharded",
    "sharded-int16-edge",
    "v2",
    "F-order",
    "transpose",
)

_MASK = np.random.default_rng(5).random((7, 13, 11)) > 0.7

#: (how, selection): how is "basic", "oindex", "vindex" or "blocks"
_SELECTIONS: list[tuple[str, Any]] = [
    ("basic", slice(None)),
    ("basic", Ellipsis),
    ("basic", ()),
    ("basic", 3),
    ("basic", -1),
    ("basic", (1, 2, 3)),
    ("basic", (6, 12, 10)),
    ("basic", (slice(1, 7, 2), slice(None, None, 3), 5)),
    ("basic", (slice(None, None, 4), slice(2, 13, 5), slice(3, 4))),
    ("basic", (-2, slice(-4, None), slice(None, -3))),
    ("basic", (slice(5, 5), slice(None), 0)),
    ("basic", (Ellipsis, 10)),
    ("oindex", ([0, 3, 6], slice(None), [1, 2, 10])),
    ("oindex", ([6, 0, 0, 3], [12, 1], slice(2, 9, 3))),
    ("oindex", (np.array([True, False, True, False, False, True, True]), 4, slice(None))),
    ("oindex", (2, [0, 12], [10])),
    ("vindex", ([0, 3, 6, 6], [1, 12, 5, 5], [0, 10, 3, 3])),
    ("vindex", ([[0, 1], [6, 5]], [[2, 3], [12, 11]], [[0, 4], [8, 10]])),
    ("vindex", (_MASK,)),
    ("blocks", (1, slice(None), 1)),
    ("blocks", (slice(0, 2), 0, slice(None))),
]


def _select(a: Any, how: str, sel: Any) -> Any:
    if how == "basic":
        return a[sel]
    if how == "oindex":
        return a.oindex[sel]
    if how == "vindex":
        return a.vindex[sel[0] if len(sel) == 1 else sel]
    return a.blocks[sel]


def _expected(data: np.ndarray, raw: zarr.Array, how: str, sel: Any) -> Any:
    got = _select(raw, how, sel)
    if how == "basic":
        want = data[sel]
        assert np.array_equal(np.asarray(got), want)  # zarr itself agrees with NumPy
    return got


@pytest.mark.parametrize("kind", _KINDS)
def test_selections_equal_zarrs_own(kind: str, decodes: dict[str, int]) -> None:
    """Every selection read through the decoded pipeline twice (cold: decodes and admits;
    warm: decoded hits only) equals zarr's own read over the raw store, dtype, shape,
    order and value; scalars are scalars."""
    inner = MemoryStore()
    data, opts = _array(inner, kind)
    raw = zarr.open_array(inner, path="t", mode="r", **opts)
    assert type(_pipeline(raw)) is BatchedCodecPipeline
    store = CachedStore(inner, _mem_cfg(f"grid-{kind}"))
    a = zarr.open_array(store, path="t", mode="r", **opts)
    assert type(_pipeline(a)) is DecodedCodecPipeline
    expected = [_expected(data, raw, how, sel) for how, sel in _SELECTIONS]
    for rnd in range(2):
        decodes["chunks"] = 0
        before = store.stats()
        for (how, sel), want in zip(_SELECTIONS, expected, strict=True):
            got = _select(a, how, sel)
            assert type(got) is type(want), (how, sel)
            if isinstance(want, np.ndarray):
                same(got, want)
                assert got.flags.c_contiguous == want.flags.c_contiguous, (how, sel)
                assert got.flags.writeable  # the caller's own array, never a cached one
            else:
                assert got == want and np.asarray(got).dtype == np.asarray(want).dtype
        d = store.stats() - before
        if rnd == 1:
            assert decodes["chunks"] == 0, kind
            assert d.decoded_hits > 0 and d.decoded_misses == 0
    np.testing.assert_array_equal(a[:], data)


def test_a_read_into_a_cached_array_never_changes_it() -> None:
    """The output is a new array; writing into it leaves the decoded chunks intact."""
    inner = MemoryStore()
    data, _ = _array(inner, "float32")
    a = zarr.open_array(CachedStore(inner, _mem_cfg("mutate")), path="t", mode="r")
    first = a[:]
    first[...] = -1
    block = a[0:2, 0:5, 0:4]  # exactly one chunk
    block[...] = -2
    same(a[:], data)


def test_missing_chunks_raise_as_zarr_does_when_asked_to() -> None:
    inner = MemoryStore()
    _array(inner, "int16-missing")
    for kind in ("int16-missing",):
        strict = {"config": {"read_missing_chunks": False}}
        raw = zarr.open_array(inner, path="t", mode="r", **strict)
        a = zarr.open_array(CachedStore(inner, _mem_cfg(f"strict-{kind}")), path="t", **strict)
        for arr in (raw, a, a):
            with pytest.raises(zarr.errors.ChunkNotFoundError):
                arr[:]
            np.testing.assert_array_equal(arr[0:2, 0:5, 0:4], raw[0:2, 0:5, 0:4])


# -- writes through the array API -----------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["chunks", "shards"])
def test_writes_through_the_array_api_are_read_back(sharded: bool) -> None:
    """Whole chunks, partial chunks, a scalar, a chunk rewritten to the fill value (deleted
    with ``write_empty_chunks=False``), through the same array object and through
    another array object of the same store, then read through the first."""
    inner = MemoryStore()
    shape = (6, 12, 12)
    kw: dict[str, Any] = {"shards": (2, 12, 12)} if sharded else {}
    zarr.create_array(
        inner,
        name="t",
        shape=shape,
        chunks=(1, 6, 6),
        dtype="f4",
        fill_value=0,
        config={"write_empty_chunks": False},
        **kw,
    )
    store = CachedStore(inner, _mem_cfg(f"writes-{sharded}"), read_only=False)
    a = zarr.open_array(store, path="t", mode="r+")
    other = zarr.open_array(store, path="t", mode="r+")
    assert type(_pipeline(a)) is DecodedCodecPipeline
    want = np.random.default_rng(2).normal(size=shape).astype("f4")
    a[...] = want
    same(a[:], want)
    same(a[:], want)  # decoded now
    steps: list[tuple[Any, Any, Any]] = [
        (a, (0, slice(None), slice(None)), -1.0),  # whole chunks
        (a, (2, slice(3, 9), slice(4, 5)), -2.0),  # partial chunks
        (a, (3, 0, 0), -3.0),  # one element
        (other, (4, slice(0, 6), slice(0, 6)), 0.0),  # a whole chunk of the fill value
        (other, (slice(1, 6, 2), slice(None, None, 5), 7), 9.0),  # steps
        (a, (5,), np.arange(144, dtype="f4").reshape(12, 12)),
    ]
    for writer, sel, value in steps:
        writer[sel] = value
        want[sel] = value
        for _ in range(2):
            same(a[:], want)
            same(other[:], want)
            same(a.oindex[[0, 2, 4, 5], :, [4, 7]], want[[0, 2, 4, 5]][:, :, [4, 7]])
    assert a.stats().decoded_hits if hasattr(a, "stats") else store.stats().decoded_hits > 0


def test_a_write_through_the_raw_store_of_a_memory_store_is_seen_after_a_write_through_zcache() -> (
    None
):
    """MemoryStore has no versions: what zcache cannot know about (a write around it) is
    not seen; a write through a CachedStore of the same cache is seen at once."""
    inner = MemoryStore()
    data, _ = _array(inner, "float32")
    cfg = _mem_cfg("around")
    a = zarr.open_array(CachedStore(inner, cfg), path="t", mode="r")
    same(a[:], data)
    w = zarr.open_array(CachedStore(inner, cfg, read_only=False), path="t", mode="r+")
    w[1:3, 2:9, 3] = 42
    data[1:3, 2:9, 3] = 42
    same(a[:], data)
    same(a[1:3, 2:9, 3], data[1:3, 2:9, 3])


# -- another writer, metadata changes -------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["chunks", "shards"])
def test_another_writer_is_seen_after_validation(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, sharded: bool
) -> None:
    """Another CachedStore (its own cache) and plain zarr rewrite chunks on S3: within
    the validation interval each chunk is old or new; after it, the new values."""
    url = f"s3://{s3_bucket}/w.zarr"
    data = np.random.default_rng(4).normal(size=(4, 16, 16)).astype("f4")
    kw: dict[str, Any] = {"shards": (2, 16, 16)} if sharded else {}
    with s3fs_store(url, s3_options) as plain:  # (plain zarr: its session closed after)
        raw = zarr.create_array(plain, shape=data.shape, chunks=(1, 8, 8), dtype="f4", **kw)
        raw[...] = data
    cfg = make_cfg(tmp_path, f"reader-{sharded}", validation=INTERVAL)
    a = zarr.open_array(open_store(url, storage_options=s3_options, cache_config=cfg), mode="r")
    same(a[:], data)
    same(a[:], data)
    before = get_cache(cfg).stats()
    same(a[:], data)
    assert (get_cache(cfg).stats() - before).requests_sent == 0
    writer_cfg = make_cfg(tmp_path / "w", f"writer-{sharded}", validation=INTERVAL)
    w_store = open_store(url, storage_options=s3_options, cache_config=writer_cfg, read_only=False)
    w = zarr.open_array(w_store, mode="r+")
    new = data.copy()
    new[1, 3:12, 2:5] = -7  # partial chunks (and part of a shard)
    w[1, 3:12, 2:5] = -7
    new[3] = data[3][::-1] + 0.5  # same length, other bytes
    with s3fs_store(url, s3_options) as plain:
        zarr.open_array(plain, mode="r+")[3] = new[3]
    got = a[:]
    for t in range(4):  # within the interval: every chunk old or new
        for y in (0, 8):
            for x in (0, 8):
                part = got[t, y : y + 8, x : x + 8]
                assert np.array_equal(part, data[t, y : y + 8, x : x + 8]) or np.array_equal(
                    part, new[t, y : y + 8, x : x + 8]
                )
    time.sleep(INTERVAL + MARGIN)
    for _ in range(2):
        same(a[:], new)
        same(a[1, 3:12], new[1, 3:12])
        same(a.vindex[[1, 3], [3, 15], [2, 0]], new[[1, 3], [3, 15], [2, 0]])
    with s3fs_store(url, s3_options, read_only=True) as plain:
        same(np.asarray(zarr.open_array(plain, mode="r")[:]), new)


def test_metadata_rewritten_with_another_dtype_over_identical_bytes(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """int32 -> float32 at the same path, chunk objects byte for byte the same: an array
    opened after the change returns float32 values, never the int32 decoded chunks."""
    url = f"s3://{s3_bucket}/m.zarr"
    old = np.arange(64, dtype="<i4").reshape(1, 8, 8) * 1000 + 1
    new = old.view("<f4")

    def write(values: np.ndarray) -> None:
        with s3fs_store(url, s3_options) as plain:  # (its session closed after)
            arr = zarr.create_array(
                plain,
                shape=values.shape,
                chunks=(1, 4, 4),
                dtype=values.dtype,
                compressors=None,
                fill_value=0,
                overwrite=True,
            )
            arr[...] = values

    write(old)
    cfg = make_cfg(tmp_path, "meta", validation=INTERVAL)
    store = open_store(url, storage_options=s3_options, cache_config=cfg)
    a = zarr.open_array(store, mode="r")
    same(a[:], old)
    same(a[:], old)
    assert store.stats().decoded_hits >= 4
    write(new)
    import fsspec

    from xarray_zcache.sessions import close_filesystem_session

    fs = fsspec.filesystem("s3", **s3_options)
    try:
        assert fs.cat_file(f"{url.removeprefix('s3://')}/c/0/0/0") == old[0, :4, :4].tobytes()
    finally:
        close_filesystem_session(fs)
    time.sleep(INTERVAL + MARGIN)
    b = zarr.open_array(open_store(url, storage_options=s3_options, cache_config=cfg), mode="r")
    assert b.dtype == np.dtype("f4")
    for _ in range(2):
        same(b[:], new)
        same(b.oindex[0, [1, 6], :], new[0][[1, 6], :])


# -- what is not served: zarr's own pipeline ------------------------------------------------------


def test_arrays_over_other_stores_get_zarrs_pipeline(decodes: dict[str, int]) -> None:
    inner = MemoryStore()
    data, _ = _array(inner, "float32")
    a = zarr.open_array(inner, path="t", mode="r")
    assert type(_pipeline(a)) is BatchedCodecPipeline
    same(a[:], data)
    decodes["chunks"] = 0
    same(a[:], data)
    assert decodes["chunks"] > 0
    strings = zarr.create_array(inner, name="s", shape=(4,), chunks=(2,), dtype=str)
    strings[...] = np.array(["a", "bb", "ccc", "d"])
    store = CachedStore(inner, _mem_cfg("strings"))
    s = zarr.open_array(store, path="s", mode="r")
    assert type(_pipeline(s)) is BatchedCodecPipeline  # strings: not decodable here
    assert s[:].tolist() == ["a", "bb", "ccc", "d"]
    assert store.stats().decoded_hits == 0


def test_the_tier_off_reads_through_zarr(decodes: dict[str, int]) -> None:
    inner = MemoryStore()
    data, _ = _array(inner, "float32")
    store = CachedStore(inner, _mem_cfg("off", decoded=0))
    a = zarr.open_array(store, path="t", mode="r")
    for _ in range(2):
        decodes["chunks"] = 0
        same(a[:], data)
        assert decodes["chunks"] > 0
    assert store.stats().decoded_hits == 0


def test_the_switch_off_gives_zarrs_default_pipeline(
    monkeypatch: pytest.MonkeyPatch, decodes: dict[str, int]
) -> None:
    inner = MemoryStore()
    data, _ = _array(inner, "float32")
    store = CachedStore(inner, _mem_cfg("switch"))
    with dask.config.set({dp.SWITCH: False}):
        assert not dp.enabled() and dp.install() is False
        a = zarr.open_array(store, path="t", mode="r")
    assert type(_pipeline(a)) is BatchedCodecPipeline
    for _ in range(2):
        decodes["chunks"] = 0
        same(a[:], data)
        assert decodes["chunks"] > 0
    assert store.stats().decoded_hits == 0
    # uninstall: zarr's default path; install again: this pipeline
    dp.uninstall()
    try:
        assert zarr.config.get("codec_pipeline.path") == dp.DEFAULT
        assert type(_pipeline(zarr.open_array(store, path="t", mode="r"))) is (BatchedCodecPipeline)
    finally:
        assert dp.install() is True
    assert type(_pipeline(zarr.open_array(store, path="t", mode="r"))) is DecodedCodecPipeline


def test_a_pipeline_the_user_chose_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    inner = MemoryStore()
    data, _ = _array(inner, "float32")
    monkeypatch.setattr(dp, "_told", False)
    fused = "zarr.core.codec_pipeline.FusedCodecPipeline"
    with zarr.config.set({"codec_pipeline.path": fused}):
        with caplog.at_level(logging.INFO, logger=dp.__name__):
            assert dp.install() is False
            assert dp.install() is False
        assert zarr.config.get("codec_pipeline.path") == fused
        told = [r for r in caplog.records if r.name == dp.__name__]
        assert len(told) == 1 and told[0].levelno == logging.INFO and fused in told[0].message
        a = zarr.open_array(CachedStore(inner, _mem_cfg("fused")), path="t", mode="r")
        assert type(_pipeline(a)) is FusedCodecPipeline
        same(a[:], data)
    assert zarr.config.get("codec_pipeline.path") == dp.PATH


@pytest.mark.parametrize("sharded", [False, True], ids=["chunks", "shards"])
def test_readers_racing_a_writer_see_each_chunk_of_one_version(sharded: bool) -> None:
    """Three threads read ``a[:]`` through their own array objects while a fourth writes
    whole new versions (every element ``k``) through the same store: every chunk read is
    one version's (never a decoded chunk of a version the bytes no longer hold mixed
    with another's), and after the last write every reader sees the last version."""
    import threading

    inner = MemoryStore()
    kw: dict[str, Any] = {"shards": (2, 16, 16)} if sharded else {}
    zarr.create_array(inner, name="t", shape=(4, 16, 16), chunks=(1, 8, 8), dtype="i4", **kw)
    store = CachedStore(inner, _mem_cfg(f"race-{sharded}"), read_only=False)
    w = zarr.open_array(store, path="t", mode="r+")
    w[...] = 1
    stop = threading.Event()
    seen: list[set[int]] = [set() for _ in range(3)]
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        r = zarr.open_array(store, path="t", mode="r")
        try:
            while not stop.is_set():
                got = r[:]
                for t in range(4):
                    for y in (0, 8):
                        for x in (0, 8):
                            values = np.unique(got[t, y : y + 8, x : x + 8])
                            assert len(values) == 1, values
                            seen[i].add(int(values[0]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    last = 1
    for k in range(2, 25):
        w[...] = k
        last = k
    time.sleep(0.05)
    stop.set()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert all(s <= set(range(1, last + 1)) for s in seen)
    for _ in range(2):
        for arr in (w, zarr.open_array(store, path="t", mode="r")):
            same(arr[:], np.full((4, 16, 16), last, dtype="i4"))


# -- the batched look-up: what the per-chunk one answered, counted the same ------------------------


def test_batched_look_up_answers_and_counts_as_one_look_up_per_chunk() -> None:
    """`bytes_now_many` and `DecodedTier.get_many` answer, chunk for chunk, what
    `bytes_now` and `DecodedTier.get` answer (memory hits, negative entries, chunks never
    read), and count the same hits; the memo of a batch's reads is not used once the
    read's context changes (`RECHECK_MISSING`), and a write still changes the answer."""
    from xarray_zcache.cache.hybrid import Unanswered
    from xarray_zcache.store import RECHECK_MISSING

    inner = MemoryStore()
    data, _ = _array(inner, "int16-missing")  # chunks t/c/1/...: missing (negative entries)
    store = CachedStore(inner, _mem_cfg("batched"), read_only=False)
    a = zarr.open_array(store, path="t", mode="r+")
    same(a[:], data)  # warm: every chunk in memory and decoded
    keys = [f"t/c/{i}/{j}/{k}" for i in range(2) for j in range(3) for k in range(3)]
    keys += ["t/c/9/9/9"]  # never read: not in memory, no negative entry
    cache = store.cache
    one = [store.bytes_now(k, cache) for k in keys]
    before = store.stats()
    memo: dict[Any, Any] = {}
    cks, answers = store.bytes_now_many(keys, cache, memo)
    after = store.stats()
    assert cks == [ck for ck, _ in one] and any(w is None for _, w in one)
    for (_, want), got in zip(one, answers, strict=True):
        assert (isinstance(got, Unanswered) and isinstance(want, Unanswered)) or got is want
    hits = after.total_hits(tier="memory") - before.total_hits(tier="memory")
    assert hits == sum(isinstance(w, bytes) for _, w in one) > 0
    tier = cache.decoded_tier
    tag = _pipeline(a).decoding.tag(a._async_array.config.order)
    tokens = [a if isinstance(a, bytes) else None for a in answers]
    hits0 = tier.hits
    arrays = tier.get_many(cks, tokens, tag)
    assert [x is None for x in arrays] == [t is None for t in tokens]
    assert tier.hits - hits0 == sum(t is not None for t in tokens)
    for ck, token, array in zip(cks, tokens, arrays, strict=True):
        if token is not None:
            assert tier.get(ck, token, tag) is array and not array.flags.writeable
    # the memo serves the same reads again; another context builds them anew
    assert store.bytes_now_many(keys, cache, memo)[0] == cks and len(memo) == 1
    held = next(iter(memo.values()))[1]
    token = RECHECK_MISSING.set(True)
    try:
        store.bytes_now_many(keys, cache, memo)
        assert next(iter(memo.values()))[1] is not held
        assert all(r.recheck for r in next(iter(memo.values()))[1])
    finally:
        RECHECK_MISSING.reset(token)
    # a write: the batched answer is the new bytes, the old decoded array is not served
    old = answers[0]
    a[0:1, 0:4, 0:4] = -1
    _, again = store.bytes_now_many(keys, cache, memo)
    assert again[0] is not old
    got = tier.get_many(cks[:1], [again[0] if isinstance(again[0], bytes) else None], tag)
    assert got == [None]
    same(a[:], zarr.open_array(inner, path="t", mode="r")[:])
