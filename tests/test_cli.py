"""The ``zcache`` command on real cache folders, filled by real reads from the local S3 server."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import dask.config
import numpy as np
import pytest
import xarray as xr
from entry_location import locate
from zarr.storage import LocalStore

from xarray_zcache import CacheConfig
from xarray_zcache.backend import open_store
from xarray_zcache.cache.disk import DiskTier
from xarray_zcache.cli import main
from xarray_zcache.identity import identify
from xarray_zcache.registry import close_all
from xarray_zcache.testing.faults import Span, entry_spans
from xarray_zcache.testing.s3server import LocalS3Server
from xarray_zcache.testing.writers import write_zarr

# zarr warns that consolidated metadata is not part of the Zarr v3 spec (when writing)
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")

# 2 variables x (4 x 2 x 2) chunks, plus 3 one-chunk coordinate arrays
CHUNKS_PER_DATASET = 2 * 16 + 3
CHUNKS_T2M = 16


def _dataset() -> xr.Dataset:
    rng = np.random.default_rng(0)
    shape = (8, 16, 16)
    return xr.Dataset(
        {
            "t2m": (("time", "lat", "lon"), rng.normal(280, 10, shape).astype("float32")),
            "tp": (("time", "lat", "lon"), rng.gamma(1.0, 1.0, shape).astype("float32")),
        },
        coords={"time": np.arange(8), "lat": np.linspace(-80, 80, 16), "lon": np.arange(16.0)},
    )


def _write(url: str, opts: dict[str, Any] | None = None) -> xr.Dataset:
    ds = _dataset()
    encoding = {v: {"chunks": (2, 8, 8)} for v in ds.data_vars}
    write_zarr(ds, url, opts, zarr_format=3, encoding=encoding)
    return ds


def _read(url: str, opts: dict[str, Any], config: CacheConfig, *variables: str) -> xr.Dataset:
    ds = xr.open_dataset(url, engine="zcache", chunks={}, storage_options=opts, cache_config=config)
    if variables:
        ds = ds[list(variables)]
    return ds.compute()


def _storage_args(opts: dict[str, Any]) -> list[str]:
    """``--storage-option`` arguments equivalent to the server's s3fs options."""
    args = [
        f"--storage-option=endpoint_url={opts['endpoint_url']}",
        f"--storage-option=key={opts['key']}",
        f"--storage-option=secret={opts['secret']}",
        "--storage-option=skip_instance_cache=true",
    ]
    for name, value in opts["config_kwargs"]["s3"].items():
        args.append(f"--storage-option=config_kwargs.s3.{name}={value}")
    return args


def _stored(folder: Path) -> list[Span]:
    """The bytes of the stored entries: payload files, and records in segment files."""
    return sorted(entry_spans(folder), key=lambda s: (str(s.path), s.start))


def _entries(folder: Path) -> list[dict[str, Any]]:
    with DiskTier(folder, 2**40) as tier:
        return tier.entries()


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@dataclasses.dataclass(frozen=True)
class Template:
    folder: Path
    ns_a: str  # read twice (hits recorded), never expires
    ns_b: str  # chunk TTL 0.5 s: its chunk entries are expired
    file_folder: Path  # the same, written with packing off: every entry a payload file


@pytest.fixture(scope="module")
def template(s3_server: LocalS3Server, tmp_path_factory: pytest.TempPathFactory) -> Template:
    """A cache folder holding two datasets read from S3 through the zcache engine."""
    bucket = f"cli-{uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    opts = s3_server.storage_options()
    url_a, url_b = f"s3://{bucket}/a.zarr", f"s3://{bucket}/b.zarr"
    _write(url_a, opts)
    _write(url_b, opts)
    folder = tmp_path_factory.mktemp("cli") / "cache"
    file_folder = folder.parent / "files"
    ns_a = open_store(url_a, storage_options=opts).namespace
    ns_b = open_store(url_b, storage_options=opts).namespace
    expiry = 0.0
    for where, pack in ((folder, "64KiB"), (file_folder, 0)):
        config = CacheConfig().with_memory_size("32MB").with_disk_cache(where, "256MB")
        config = config.with_disk_packing(pack)
        try:
            _read(url_a, opts, config)
            close_all()  # flushes the disk writes, like the end of a script
            _read(url_a, opts, config)  # a "new process": disk hits, recorded in the index
            close_all()
            _read(url_b, opts, config.with_ttl(chunks=0.5))
            close_all()
        finally:
            close_all()
        rows = _entries(where)
        expiry = max(
            expiry,
            *(r["expires"] for r in rows if r["namespace"] == ns_b and r["kind"] == "chunk"),
        )
    time.sleep(max(0.0, expiry - time.time()) + 0.05)
    return Template(folder, ns_a, ns_b, file_folder)


@pytest.fixture
def cache_dir(template: Template, tmp_path: Path) -> Path:
    """A private copy of the template cache folder (tests may damage or clear it)."""
    target = tmp_path / "cache"
    shutil.copytree(template.folder, target)
    return target


@pytest.fixture
def file_cache_dir(template: Template, tmp_path: Path) -> Path:
    """The same, with every entry a payload file (packing off)."""
    target = tmp_path / "cache"
    shutil.copytree(template.file_folder, target)
    return target


@pytest.fixture(params=["record", "file"])
def any_cache_dir(request: pytest.FixtureRequest) -> Path:
    """:func:`cache_dir` (records: the default), then :func:`file_cache_dir`."""
    return request.getfixturevalue("cache_dir" if request.param == "record" else "file_cache_dir")


# -- stats --------------------------------------------------------------------------------------


def test_stats_table_and_json(
    template: Template, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _entries(cache_dir)

    code, out, err = _run(capsys, "stats", cache_dir)
    assert code == 0, err
    assert f"Disk cache {cache_dir}" in out
    assert "Namespaces (2)" in out
    assert template.ns_a in out and template.ns_b in out
    assert f"{CHUNKS_PER_DATASET} expired" in out  # dataset b's chunks
    assert "Most hit entries" in out
    assert "244.14 MiB (recorded in the folder; " in out  # the size the folder was opened with

    code, out, err = _run(capsys, "stats", cache_dir, "--json", "--top", "5")
    assert code == 0, err
    data = json.loads(out)
    assert data["path"] == str(cache_dir)
    assert data["entries"] == len(rows)
    assert data["bytes"] == sum(r["size"] for r in rows)
    assert data["capacity"] == 256 * 10**6
    kinds = data["kinds"]
    assert kinds["chunk"]["entries"] == 2 * CHUNKS_PER_DATASET
    assert kinds["chunk"]["entries"] + kinds["metadata"]["entries"] == len(rows)
    assert data["expired"]["entries"] == CHUNKS_PER_DATASET
    assert data["oldest_created"] <= data["newest_created"] <= data["generated"]
    assert data["oldest_key"].startswith(template.ns_a + "/")  # dataset a was read first
    assert data["newest_key"].startswith(template.ns_b + "/")

    by_ns = {n["namespace"]: n for n in data["namespaces"]}
    assert set(by_ns) == {template.ns_a, template.ns_b}
    a, b = by_ns[template.ns_a], by_ns[template.ns_b]
    assert a["kinds"]["chunk"]["entries"] == b["kinds"]["chunk"]["entries"] == CHUNKS_PER_DATASET
    assert a["kinds"]["metadata"]["entries"] >= 1
    assert a["entries"] + b["entries"] == len(rows)
    assert a["hits"] >= CHUNKS_PER_DATASET  # the second read of a hit every chunk on disk
    assert a["hits"] == sum(r["hits"] for r in rows if r["namespace"] == template.ns_a)
    assert a["expired"]["entries"] == 0
    assert b["expired"]["entries"] == CHUNKS_PER_DATASET
    assert len(data["top_hits"]) == 5
    hits = [h["hits"] for h in data["top_hits"]]
    assert hits == sorted(hits, reverse=True) and hits[-1] >= 1
    assert hits[0] == max(r["hits"] for r in rows)
    by_key = {r["key"]: r for r in rows}
    assert all(by_key[h["key"]]["hits"] == h["hits"] for h in data["top_hits"])

    assert _entries(cache_dir) == rows  # stats changes nothing


def test_stats_shows_capacity_of_the_configured_folder(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (cache_dir / "settings.json").unlink()  # no record of its own (an older folder)
    with dask.config.set({"zcache.disk.path": str(cache_dir), "zcache.disk.size": "1GB"}):
        code, out, err = _run(capsys, "stats", cache_dir, "--json")
        assert code == 0, err
        assert json.loads(out)["capacity"] == 10**9
        code, out, err = _run(capsys, "stats", cache_dir)
    assert code == 0, err
    assert "0.93 GiB (zcache.disk.size; 0.0% used)" in out


# -- clear --------------------------------------------------------------------------------------


def test_clear_namespace_removes_only_that_namespace(
    template: Template, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _entries(cache_dir)
    keep = [r for r in rows if r["namespace"] == template.ns_b]
    gone = [r for r in rows if r["namespace"] == template.ns_a]

    code, out, err = _run(capsys, "clear", cache_dir, "--namespace", template.ns_a)
    assert code == 0, err
    assert f"Removed {len(gone)} entries of namespace {template.ns_a}" in out

    assert _entries(cache_dir) == keep  # rows of b untouched, hit counts included
    assert len(_stored(cache_dir)) == len(keep)
    with DiskTier(cache_dir, 2**40) as tier:
        counts = tier.verify()
    assert counts["ok"] == len(keep)
    assert counts["corrupt"] == counts["orphan_files"] == counts["missing_files"] == 0

    # an unknown namespace is an error that names the namespaces present; nothing removed
    code, out, err = _run(capsys, "clear", cache_dir, "--namespace", "s3://nope/x.zarr")
    assert code == 1
    assert "zcache: error: no entries of namespace 's3://nope/x.zarr'" in err
    assert template.ns_b in err
    assert _entries(cache_dir) == keep


def test_clear_namespace_spares_a_dataset_nested_under_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cache"
    outer, inner = "s3://bucket/data", "s3://bucket/data/nested.zarr"
    with DiskTier(folder, 2**20) as tier:
        assert tier.put(f"{outer}/zarr.json", b"{}", namespace=outer, kind="metadata")
        assert tier.put(f"{outer}/x/c/0", b"outer", namespace=outer)
        assert tier.put(f"{inner}/y/c/0", b"inner", namespace=inner)
    code, out, err = _run(capsys, "clear", folder, "--namespace", outer + "/")
    assert code == 0, err
    assert f"Removed 2 entries of namespace {outer}" in out
    assert [r["key"] for r in _entries(folder)] == [f"{inner}/y/c/0"]


def test_clear_expired_removes_only_expired_entries(
    template: Template, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _entries(cache_dir)
    now = time.time()
    expired = [r for r in rows if r["expires"] is not None and r["expires"] < now]
    assert len(expired) == CHUNKS_PER_DATASET
    assert {r["namespace"] for r in expired} == {template.ns_b}

    code, out, err = _run(capsys, "clear", cache_dir, "--expired")
    assert code == 0, err
    assert f"Removed {CHUNKS_PER_DATASET} expired entries" in out
    assert template.ns_b in out

    left = _entries(cache_dir)
    assert left == [r for r in rows if r not in expired]
    assert len(_stored(cache_dir)) == len(left)

    code, out, err = _run(capsys, "clear", cache_dir, "--expired")
    assert code == 0, err
    assert "Removed 0 expired entries" in out
    assert _entries(cache_dir) == left


def test_clear_all_keeps_the_folder_and_foreign_files(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _entries(cache_dir)
    notes = cache_dir / "NOTES.txt"
    notes.write_text("not a cache file")
    bucket = cache_dir / "chunks" / "ab"  # (records: the default, leave chunks/ empty)
    bucket.mkdir(exist_ok=True)
    foreign = bucket / "foreign.bin"
    foreign.write_bytes(b"not ours")
    stale_temp = bucket / f".{'ab' * 32}.1234.{uuid4().hex}.tmp"  # left by a crashed writer
    stale_temp.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(stale_temp, (an_hour_ago, an_hour_ago))

    code, out, err = _run(capsys, "clear", cache_dir)
    assert code == 0, err
    assert f"Removed {len(rows)} entries" in out

    assert cache_dir.is_dir() and (cache_dir / "index.db").is_file()
    assert notes.read_text() == "not a cache file"
    assert foreign.read_bytes() == b"not ours"
    assert not stale_temp.exists()
    assert _stored(cache_dir) == []
    assert _entries(cache_dir) == []

    code, out, err = _run(capsys, "stats", cache_dir, "--json")
    assert code == 0, err
    assert json.loads(out)["entries"] == 0


# -- verify -------------------------------------------------------------------------------------


def test_verify_reports_a_truncated_payload_and_repair_fixes_it(
    any_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated payload file, or a truncated record (its end zeroed)."""
    cache_dir = any_cache_dir
    n = len(_entries(cache_dir))
    code, out, err = _run(capsys, "verify", cache_dir)
    assert code == 0, err
    assert "Consistent: no damage found." in out

    key = next(r["key"] for r in _entries(cache_dir) if r["kind"] == "chunk")
    victim = locate(cache_dir, key)
    assert victim.in_segment == (cache_dir.joinpath("segments").is_dir())
    victim.truncate(len(victim.read()) // 2)
    damaged = victim.read()

    code, out, err = _run(capsys, "verify", cache_dir)
    assert code == 1
    assert "Damage found: 1 problem." in out
    code, out, err = _run(capsys, "verify", cache_dir, "--json")
    assert code == 1
    report = json.loads(out)
    assert report["found"]["corrupt"] == 1
    assert report["found"]["ok"] == n - 1
    assert report["consistent"] is False and report["repaired"] is False
    assert victim.read() == damaged  # verify without --repair changes nothing

    code, out, err = _run(capsys, "verify", cache_dir, "--repair")
    assert code == 0, err
    assert f"Repaired 1 problem; now consistent ({n - 1} entries ok)." in out
    assert key not in {r["key"] for r in _entries(cache_dir)}
    assert victim.in_segment or not victim.exists()
    assert len(_entries(cache_dir)) == n - 1

    code, out, err = _run(capsys, "verify", cache_dir, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["consistent"] is True
    assert report["found"]["ok"] == n - 1 and report["damage"] == 0


def test_verify_repair_rebuilds_a_lost_or_damaged_index(
    file_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Payload files (packing off) carry all a row holds; records are not recovered by a
    rebuild (misses: fetched again, never stale), see tests/test_reliability_crash.py."""
    cache_dir = file_cache_dir

    def index_view() -> list[tuple[str, str, str, int]]:
        return [(r["key"], r["namespace"], r["kind"], r["size"]) for r in _entries(cache_dir)]

    now = time.time()
    live = [  # the rebuild drops expired entries
        (r["key"], r["namespace"], r["kind"], r["size"])
        for r in _entries(cache_dir)
        if r["expires"] is None or r["expires"] >= now
    ]
    foreign = cache_dir / "NOTES.txt"
    foreign.write_text("keep me")
    (cache_dir / "index.db").unlink()

    code, out, err = _run(capsys, "verify", cache_dir)
    assert code == 1
    assert "the index is missing: no index.db in it" in out
    assert not (cache_dir / "index.db").exists()  # nothing created without --repair

    # the other subcommands refuse the folder and do not create an index either
    code, out, err = _run(capsys, "stats", cache_dir)
    assert code == 2
    assert "no index.db" in err
    assert not (cache_dir / "index.db").exists()

    code, out, err = _run(capsys, "verify", cache_dir, "--repair", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["index"] == "missing: no index.db in it"
    assert report["consistent"] is True and report["damage"] >= 1
    assert report["rebuilt"]["indexed"] == len(live)
    assert index_view() == live  # every live entry is back, from the payload headers
    assert foreign.read_text() == "keep me"

    # a damaged index: stats points to verify --repair, which rebuilds it
    (cache_dir / "index.db").write_bytes(b"garbage" * 100)
    for side in ("index.db-wal", "index.db-shm"):
        (cache_dir / side).unlink(missing_ok=True)
    code, out, err = _run(capsys, "stats", cache_dir)
    assert code == 1
    assert "index is damaged" in err and "--repair" in err
    code, out, err = _run(capsys, "verify", cache_dir, "--repair")
    assert code == 0, err
    assert "index.db was damaged: index.db is unreadable" in out
    assert f"rebuilt from the payload files' headers: {len(live)} entries" in out
    assert index_view() == live


# -- warm ---------------------------------------------------------------------------------------


def test_warm_then_a_fresh_read_sends_no_chunk_gets(
    s3_server: LocalS3Server,
    s3_bucket: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"s3://{s3_bucket}/era5.zarr"
    expected = _write(url, s3_options)
    folder = tmp_path / "new" / "cache"  # warm creates it
    log = s3_server.requests
    warm = ["warm", url, "--cache", str(folder), "--cache-size", "256MB", "--memory-size", "16MB"]
    warm += _storage_args(s3_options)

    code, out, err = _run(capsys, *warm, "--variables", "t2m")
    assert code == 0, err
    assert f"Created disk cache folder {folder}" in out
    assert "Warming" in out and "1 variable (t2m)" in out
    assert "100% Completed" in err  # dask's progress bar
    namespace = open_store(url, storage_options=s3_options).namespace
    assert f"namespace    {namespace}" in out
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    fresh = CacheConfig().with_memory_size("8MB").with_disk_cache(folder, "256MB")
    before = log.chunk_gets(s3_bucket)
    t2m = _read(url, s3_options, fresh, "t2m")
    assert log.chunk_gets(s3_bucket) - before == 0
    xr.testing.assert_identical(t2m, expected[["t2m"]])
    close_all()

    code, out, err = _run(capsys, *warm, "-q")
    assert code == 0, err
    assert "2 variables (t2m, tp)" in out
    assert f"{CHUNKS_PER_DATASET - CHUNKS_T2M - 3} sent to the source" in out  # only tp's
    assert "Completed" not in err  # --quiet

    before = log.chunk_gets(s3_bucket)
    everything = _read(url, s3_options, fresh)
    assert log.chunk_gets(s3_bucket) - before == 0
    xr.testing.assert_identical(everything, expected)
    close_all()

    rows = _entries(folder)
    assert {r["namespace"] for r in rows} == {namespace}
    assert sum(r["kind"] == "chunk" for r in rows) == CHUNKS_PER_DATASET

    code, out, err = _run(capsys, *warm, "--variables", "t2m,nope")
    assert code == 2
    assert "zcache: error: --variables: 'nope' not in" in err and "t2m, tp" in err


def test_warm_a_local_dataset_with_a_slow_disk_and_a_tiny_write_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "local.zarr"
    _write(str(source))
    folder = tmp_path / "cache"
    folder.mkdir()  # an empty folder is fine
    put = DiskTier.put

    def slow_put(self: DiskTier, *args: Any, **kwargs: Any) -> bool:
        time.sleep(0.01)  # a disk slower than the source
        return put(self, *args, **kwargs)

    monkeypatch.setattr(DiskTier, "put", slow_put)
    # a write queue of 8 kB (the root zarr.json is 5 kB, the 32 chunks 17 kB): reading flat
    # out overflows it (the cache then drops disk writes); warm waits for the writes instead
    with dask.config.set({"zcache.write-queue-size": "8kB"}):
        code, out, err = _run(capsys, "warm", source, "--cache", folder, "-q")
    assert code == 0, err
    assert "(1 thread)" in out
    rows = _entries(folder)
    assert {r["namespace"] for r in rows} == {identify(LocalStore(source)).namespace}
    assert sum(r["kind"] == "chunk" for r in rows) == CHUNKS_PER_DATASET


def test_warm_with_many_threads_waits_for_the_disk_instead_of_dropping_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "local.zarr"
    rng = np.random.default_rng(1)
    data = rng.normal(size=(64, 16, 16)).astype("float32")  # 128 chunks of 512 bytes: 64 kB
    xr.Dataset({"v": (("t", "y", "x"), data)}).to_zarr(
        source, zarr_format=3, encoding={"v": {"chunks": (2, 8, 8)}}
    )
    folder = tmp_path / "cache"
    put = DiskTier.put

    def slow_put(self: DiskTier, *args: Any, **kwargs: Any) -> bool:
        time.sleep(0.02)  # a disk much slower than the source: the backlog builds up
        return put(self, *args, **kwargs)

    monkeypatch.setattr(DiskTier, "put", slow_put)
    # 24 kB of queue for 64 kB of chunks: reading flat out would overflow it (the cache then
    # drops disk writes); warm waits for the disk writer instead, with several readers
    with dask.config.set({"zcache.write-queue-size": "24kB"}):
        code, out, err = _run(
            capsys, "warm", source, "--cache", folder, "-q", "--json", "--threads", "8"
        )
    assert code == 0, err
    assert "(2 threads)" in err
    report = json.loads(out)
    assert report["disk_write_failures"] == 0
    assert report["chunk_misses"] == 128
    assert sum(r["kind"] == "chunk" for r in _entries(folder)) == 128


# -- bad input ----------------------------------------------------------------------------------

PATH_COMMANDS = [
    ["stats"],
    ["stats", "--json"],
    ["clear"],
    ["clear", "--expired"],
    ["clear", "--namespace", "s3://b/x"],
    ["clear", "--dry-run", "--json"],
    ["verify"],
    ["verify", "--repair"],
]


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
        for p in [folder, *folder.rglob("*")]
    }


@pytest.mark.parametrize("command", PATH_COMMANDS, ids=" ".join)
def test_bad_paths_are_refused_and_left_alone(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, *options = command
    missing = tmp_path / "missing" / "cache"
    code, _, err = _run(capsys, name, missing, *options)
    assert code == 2
    assert err.startswith("zcache: error: ") and "no such folder" in err
    assert not (tmp_path / "missing").exists()

    regular = tmp_path / "file.txt"
    regular.write_text("data")
    code, _, err = _run(capsys, name, regular, *options)
    assert code == 2
    assert "is a regular file" in err
    assert regular.read_text() == "data"

    plain = tmp_path / "plain"
    (plain / "chunks").mkdir(parents=True)  # even with a chunks/ folder: no index, no cache
    (plain / "data.txt").write_text("data")
    plain.chmod(0o755)
    before = _snapshot(plain)
    code, _, err = _run(capsys, name, plain, *options)
    assert code == 2
    assert "is not an xarray-zcache disk cache folder (no index.db in it)" in err
    assert _snapshot(plain) == before  # nothing created, nothing chmod-ed

    other_db = tmp_path / "app"
    other_db.mkdir()
    with sqlite3.connect(other_db / "index.db") as conn:
        conn.execute("CREATE TABLE things(x)")
    before = _snapshot(other_db)
    code, _, err = _run(capsys, name, other_db, *options)
    assert code == 2
    assert "without the tables of a zcache index" in err
    assert _snapshot(other_db) == before


def test_bad_warm_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cache"
    source = tmp_path / "local.zarr"
    _write(str(source))

    code, _, err = _run(capsys, "warm", "nosuchproto://bucket/x.zarr", "--cache", folder)
    assert code == 2
    assert (
        "zcache: error: URL 'nosuchproto://bucket/x.zarr': unknown or unavailable URL scheme "
        "'nosuchproto'" in err
    )

    code, _, err = _run(capsys, "warm", tmp_path / "nope.zarr", "--cache", folder)
    assert code == 2
    assert "no such local dataset" in err

    code, _, err = _run(capsys, "warm", source, "--cache", folder, "--cache-size", "12XB")
    assert code == 2
    assert "zcache: error: argument --cache-size: invalid size '12XB'" in err
    assert "'512MiB'" in err  # the expected form

    code, _, err = _run(capsys, "warm", source, "--cache", folder, "--memory-size", "0")
    assert code == 2
    assert "invalid size '0'; expected a size > 0" in err

    code, _, err = _run(capsys, "warm", source, "--cache", folder, "--storage-option", "anon")
    assert code == 2
    assert "expected KEY=VALUE" in err

    code, _, err = _run(
        capsys,
        "warm",
        "s3://bucket/x.zarr",
        "--cache",
        folder,
        "--storage-option",
        "a=1",
        "--storage-option",
        "a.b=2",
    )
    assert code == 2
    assert "conflicts with a=..." in err

    assert not folder.exists()  # no bad invocation created the cache folder

    regular = tmp_path / "file.txt"
    regular.write_text("data")
    code, _, err = _run(capsys, "warm", source, "--cache", regular)
    assert code == 2
    assert "--cache" in err and "regular file" in err

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.txt").write_text("data")
    plain.chmod(0o755)
    before = _snapshot(plain)
    code, _, err = _run(capsys, "warm", source, "--cache", plain)
    assert code == 2
    assert "non-empty folder that is not an xarray-zcache disk cache" in err
    assert _snapshot(plain) == before

    code, _, err = _run(capsys)
    assert code == 2
    assert "zcache: error: the following arguments are required: COMMAND" in err


def test_warm_a_missing_remote_dataset_fails_cleanly(
    s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{s3_bucket}/absent.zarr"
    code, out, err = _run(
        capsys, "warm", url, "--cache", tmp_path / "cache", *_storage_args(s3_options)
    )
    assert code == 1
    assert f"zcache: error: cannot open {url}" in err
    assert "Traceback" not in err
    assert s3_options["secret"] not in err + out


# -- help and the console script ----------------------------------------------------------------


def test_help_reads_well(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert out.startswith("usage: zcache")
    for word in ("stats", "clear", "warm", "verify", "examples:", "exit status:"):
        assert word in out
    for name in ("stats", "clear", "warm", "verify"):
        code, out, _ = _run(capsys, name, "--help")
        assert code == 0
        assert out.startswith(f"usage: zcache {name}")
        assert "examples:" in out and f"zcache {name} " in out


@pytest.fixture
def console_script() -> Iterator[Path]:
    script = Path(sys.executable).with_name("zcache")
    if not script.exists():
        pytest.fail(f"{script} missing: run `pip install -e .` to install the console script")
    yield script


def test_console_script_runs(template: Template, cache_dir: Path, console_script: Path) -> None:
    proc = subprocess.run(
        [str(console_script), "stats", str(cache_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {n["namespace"] for n in data["namespaces"]} == {template.ns_a, template.ns_b}


# -- the configured folder, --json, --dry-run, closed pipes --------------------------------------


def test_path_defaults_to_the_configured_folder(
    template: Template, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _entries(cache_dir)
    with dask.config.set({"zcache.disk.path": str(cache_dir)}):
        code, out, err = _run(capsys, "stats", "--json")
        assert code == 0, err
        assert json.loads(out)["path"] == str(cache_dir)
        assert json.loads(out)["entries"] == len(rows)
        code, out, err = _run(capsys, "verify")
        assert code == 0, err
        assert f"Disk cache {cache_dir}" in out and "Consistent" in out
        code, out, err = _run(capsys, "clear", "--dry-run")
        assert code == 0, err
        assert f"Would remove {len(rows)} entries" in out and str(cache_dir) in out
        assert _entries(cache_dir) == rows
    # XDG_CACHE_HOME gives the default folder when zcache.disk.path is not set
    home = tmp_path / "xdg"
    shutil.copytree(cache_dir, home / "xarray-zcache")
    env = {**os.environ, "XDG_CACHE_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "xarray_zcache.cli", "stats", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["path"] == str(home / "xarray-zcache")
    # a configured folder that does not exist yet, or no disk tier at all: clear errors
    with dask.config.set({"zcache.disk.path": str(tmp_path / "never")}):
        code, _, err = _run(capsys, "stats")
    assert code == 1 and "configured disk cache folder (zcache.disk.path) does not exist" in err
    assert not (tmp_path / "never").exists()
    with dask.config.set({"zcache.disk.enabled": False}):
        code, _, err = _run(capsys, "clear")
    assert code == 2 and "disables the disk tier" in err and "pass the disk cache folder" in err


@pytest.mark.parametrize(
    "which", [[], ["--expired"], ["--namespace", "NS_A"]], ids=["all", "expired", "namespace"]
)
def test_clear_dry_run_says_what_clear_removes_and_removes_nothing(
    template: Template, cache_dir: Path, capsys: pytest.CaptureFixture[str], which: list[str]
) -> None:
    which = [template.ns_a if w == "NS_A" else w for w in which]
    rows = _entries(cache_dir)
    files = _stored(cache_dir)
    code, out, err = _run(capsys, "clear", cache_dir, *which, "--dry-run")
    assert code == 0, err
    assert out.startswith("Would remove ") and "Dry run: nothing was removed." in out
    code, out, err = _run(capsys, "clear", cache_dir, *which, "--dry-run", "--json")
    assert code == 0, err
    planned = json.loads(out)
    assert planned["dry_run"] is True
    assert _entries(cache_dir) == rows and _stored(cache_dir) == files

    code, out, err = _run(capsys, "clear", cache_dir, *which, "--json")
    assert code == 0, err
    done = json.loads(out)
    assert done["dry_run"] is False
    assert {k: v for k, v in done.items() if k != "dry_run"} == {
        k: v for k, v in planned.items() if k != "dry_run"
    }
    assert len(_entries(cache_dir)) == len(rows) - done["entries"] and done["entries"] > 0


def test_every_subcommand_has_json(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xarray_zcache.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert isinstance(commands, dict) and set(commands) == {
        "stats",
        "clear",
        "warm",
        "verify",
        "validate",
    }
    for name, sub in commands.items():
        assert any("--json" in a.option_strings for a in sub._actions), name

    for argv in (["stats"], ["verify"], ["clear", "--expired"]):
        code, out, err = _run(capsys, argv[0], cache_dir, *argv[1:], "--json")
        assert code == 0, err
        assert json.loads(out)["path"] == str(cache_dir)

    source = tmp_path / "local.zarr"
    _write(str(source))
    folder = tmp_path / "warm-cache"
    code, out, err = _run(capsys, "warm", source, "--cache", folder, "-q", "--json")
    assert code == 0, err
    report = json.loads(out)  # stdout is JSON only: the progress lines went to stderr
    assert report["path"] == str(folder) and report["chunk_misses"] == CHUNKS_PER_DATASET
    assert report["disk_write_failures"] == 0 and report["disk_entries"] >= CHUNKS_PER_DATASET
    assert "Created disk cache folder" in err and "Warming" in err


def test_closed_pipe_exits_0(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    with DiskTier(folder, 2**30) as tier:  # ~1 MB of --json output: more than a pipe holds
        for i in range(1500):
            tier.put(f"s3://bucket/d{i}.zarr/c/0", b"x" * 16, namespace=f"s3://bucket/d{i}.zarr")
        tier.flush()
    script = (
        f"set -o pipefail; {sys.executable} -m xarray_zcache.cli stats {folder} --json | head -3"
    )
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "{" and len(proc.stdout.splitlines()) == 3
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr
    # the whole output is indeed larger than the pipe's buffer
    full = subprocess.run(
        [sys.executable, "-m", "xarray_zcache.cli", "stats", str(folder), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert len(full.stdout) > 256 * 1024


def test_warm_refuses_a_folder_a_newer_version_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``zcache warm`` exists to fill a folder: on one written by a newer xarray-zcache (the
    cache then runs in memory only, leaving the folder alone) it must fail, not read the
    whole dataset into memory and report it warmed, exit status 0, with nothing written."""
    from old_index import become_newer

    source = tmp_path / "local.zarr"
    _write(str(source))
    folder = tmp_path / "cache"
    code, _, err = _run(capsys, "warm", source, "--cache", folder, "-q", "--variables", "t2m")
    assert code == 0, err
    close_all()
    become_newer(folder / "index.db")
    before = (folder / "index.db").read_bytes()

    code, out, err = _run(capsys, "warm", source, "--cache", folder, "-q")
    close_all()
    assert code != 0, out
    assert "newer" in err and str(folder) in err
    assert "upgrade xarray-zcache" in err  # the reason the cache gave (`disk_refused`)
    assert (folder / "index.db").read_bytes() == before
