"""Sizing: the memory tier against a Dask worker's memory_limit; the disk folder's own size."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import xarray_zcache.distributed as zd
from xarray_zcache import CacheConfig
from xarray_zcache.cache.disk.folder import SETTINGS_FILE, recorded_disk_size
from xarray_zcache.cache.hybrid import HybridCache
from xarray_zcache.cli import main
from xarray_zcache.distributed.worker import worker_memory_size

GiB = 2**30
MiB = 2**20


def _config(tmp_path: Path) -> CacheConfig:
    return CacheConfig().with_name("sizing-test").with_disk_cache(tmp_path / "cache", "64MB")


# -- the memory tier of a worker ------------------------------------------------------------


def test_memory_fraction_bounds_the_tier_by_the_workers_memory_limit(tmp_path: Path) -> None:
    cfg = _config(tmp_path).with_memory_size("512MiB")
    assert cfg.memory_fraction == 0.1  # the default (zcache.distributed.memory-fraction)
    assert worker_memory_size(cfg, "w", 2 * GiB) == (int(0.2 * GiB), None)
    assert worker_memory_size(cfg, "w", 100 * GiB) == (512 * MiB, None)  # memory-size is less
    assert worker_memory_size(cfg, "w", None) == (512 * MiB, None)  # no limit: as is
    assert worker_memory_size(cfg, "w", 0) == (512 * MiB, None)


def test_a_tier_over_a_quarter_of_memory_limit_is_warned_about(tmp_path: Path) -> None:
    cfg = _config(tmp_path).with_memory_size("512MiB")._replace(memory_fraction=None)
    size, warning = worker_memory_size(cfg, "tcp://10.0.0.1:4000", GiB)
    assert size == 512 * MiB
    assert warning is not None
    # 512 MiB memory + 256 MiB decoded (half of it, the default): 75% of 1 GiB
    for part in ("tcp://10.0.0.1:4000", "512.00 MiB", "1.00 GiB", "75%", "25%"):
        assert part in warning
    assert "zcache.memory-size" in warning and "zcache.distributed.memory-fraction" in warning
    assert worker_memory_size(cfg, "w", 4 * GiB) == (512 * MiB, None)  # 12.5%: fine


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, "a tenth", True])
def test_bad_memory_fractions_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"^memory_fraction: invalid value .*\(0, 1\]"):
        CacheConfig(memory_fraction=bad)


def test_memory_fraction_from_dask_config() -> None:
    with dask.config.set({"zcache.distributed.memory-fraction": None}):
        assert CacheConfig().memory_fraction is None
    with dask.config.set({"zcache.distributed.memory-fraction": 0.05}):
        assert CacheConfig.from_dask_config().memory_fraction == 0.05
    with (
        dask.config.set({"zcache.distributed.memory-fraction": 2}),
        pytest.raises(ValueError, match=r"zcache\.distributed\.memory-fraction"),
    ):
        CacheConfig()


def _capacity(dask_worker: Any) -> int:
    from xarray_zcache.distributed.worker import worker_cache_state

    state = worker_cache_state(dask_worker)
    assert state is not None
    return int(state.cache.memory_tier.capacity)


def test_worker_memory_tiers_on_a_cluster(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limit = GiB
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            memory_limit=limit,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
        caplog.at_level(logging.INFO, logger="xarray_zcache.distributed"),
    ):
        zd.install(client, _config(tmp_path).with_memory_size("512MiB"))
        (capacity,) = client.run(_capacity).values()
        assert capacity == int(0.1 * limit)
        sized = [r for r in caplog.records if "memory tier 102.40 MiB" in r.getMessage()]
        assert len(sized) == 1 and sized[0].levelno == logging.INFO
        # zcache's own records only: another library's (an aiohttp "Unclosed client
        # session" of an earlier test collected now) is not this test's business
        assert not [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("xarray_zcache")
        ]

    caplog.clear()
    explicit = _config(tmp_path).with_name("sizing-explicit").with_memory_size("512MiB")
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            memory_limit=limit,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
        caplog.at_level(logging.INFO, logger="xarray_zcache.distributed"),
    ):
        zd.install(client, explicit._replace(memory_fraction=None))
        (address, capacity), *_ = client.run(_capacity).items()
        assert capacity == 512 * MiB
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    # the memory tier and its decoded tier (half of it by default): 75% of the limit
    assert "512.00 MiB" in text and "1.00 GiB" in text and "75%" in text
    assert "zcache.distributed.memory-fraction" in text
    assert f"worker 0 ({address})" in text


# -- the disk folder's own record of its size -----------------------------------------------


def test_the_folder_records_its_size_and_stats_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cache"
    cache = HybridCache(_config(tmp_path).with_disk_cache(folder, "300MB"))
    cache.close()
    record = json.loads((folder / SETTINGS_FILE).read_text())
    assert record["disk_size"] == 300 * 10**6
    assert recorded_disk_size(folder) == 300 * 10**6
    assert (folder / SETTINGS_FILE).stat().st_mode & 0o077 == 0
    # the current dask config says otherwise: the folder's record wins
    with dask.config.set({"zcache.disk.path": str(folder), "zcache.disk.size": "1GB"}):
        assert main(["stats", str(folder), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["capacity"] == 300 * 10**6
        assert data["capacity_source"] == "recorded in the folder"
        assert main(["stats", str(folder)]) == 0
    assert "286.10 MiB (recorded in the folder; 0.0% used)" in capsys.readouterr().out
    # reopened with another size: the record follows
    HybridCache(_config(tmp_path).with_disk_cache(folder, "200MB")).close()
    assert recorded_disk_size(folder) == 200 * 10**6


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"disk_size": -5}', ""])
def test_a_damaged_record_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / SETTINGS_FILE).write_text(content)
    assert recorded_disk_size(tmp_path) is None


def test_warm_reports_the_folders_size_every_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "data.zarr"
    ds = xr.Dataset({"v": (("x",), np.arange(64, dtype="f4"))})
    ds.to_zarr(source, zarr_format=3, encoding={"v": {"chunks": (8,)}})
    folder = tmp_path / "cache"
    code = main(["warm", str(source), "--cache", str(folder), "--cache-size", "500MB", "--json"])
    first = json.loads(capsys.readouterr().out)
    assert code == 0
    assert first["disk_capacity"] == 500 * 10**6
    with dask.config.set({"zcache.disk.size": "10GiB"}):
        code = main(["warm", str(source), "--cache", str(folder), "--json"])
    second = json.loads(capsys.readouterr().out)
    assert code == 0
    assert second["disk_capacity"] == 500 * 10**6  # not the configured 10 GiB
    assert recorded_disk_size(folder) == 500 * 10**6


def test_the_decoded_tier_is_sized_with_the_memory_tier_and_counted_in_the_warning() -> None:
    from xarray_zcache.distributed.worker import worker_decoded_size

    cfg = CacheConfig().with_memory_size("512MiB").without_disk_cache()
    cfg = dataclasses.replace(cfg, memory_fraction=0.1)
    # default: half of the worker's (sized) memory tier
    size, warning = worker_memory_size(cfg, "w", 2 * GiB)
    assert worker_decoded_size(cfg, size, 2 * GiB) == size // 2 and warning is None
    # an explicit size is bounded by the fraction too
    big = cfg.with_decoded_memory_size("1GiB")
    assert worker_decoded_size(big, size, 2 * GiB) == int(0.2 * GiB)
    assert worker_decoded_size(big, size, None) == GiB
    # 20% memory + 20% decoded: over the safe quarter together
    loose = dataclasses.replace(big, memory_fraction=0.2)
    _, warning = worker_memory_size(loose, "w", 2 * GiB)
    assert warning is not None and "decoded tier" in warning
    off = loose.with_decoded_memory_size(0)
    assert worker_memory_size(off, "w", 2 * GiB)[1] is None
