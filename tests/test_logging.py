"""Log records of xarray-zcache: INFO on cache creation, rate-limited DEBUG per-chunk events."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from xarray_zcache import CacheConfig
from xarray_zcache.cache import logs
from xarray_zcache.registry import close_all


@pytest.fixture(autouse=True)
def _default_rate_limit() -> Iterator[None]:
    yield
    logs.set_rate_limit()


def _write(path: Path, n: int) -> None:
    """A local zarr dataset of ``n`` chunks of 4 float32 values each."""
    ds = xr.Dataset({"v": (("x",), np.arange(4 * n, dtype="f4"))})
    ds.to_zarr(path, zarr_format=3, encoding={"v": {"chunks": (4,)}}, consolidated=False)


def _read(path: Path, config: CacheConfig) -> None:
    ds = xr.open_dataset(path, engine="zcache", chunks={}, cache_config=config, consolidated=False)
    assert float(ds.v.sum().compute()) >= 0


def _ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("xarray_zcache")]


def test_importing_the_cache_loads_no_dask_or_zarr() -> None:
    code = (
        "import sys, xarray_zcache.cache, xarray_zcache.cache.logs;"
        "bad = [m for m in ('zarr', 'xarray', 'dask', 'distributed') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cold_then_warm_read_logs_creation_misses_fills_and_disk_hits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "data.zarr"
    _write(source, 8)
    config = (
        CacheConfig()
        .with_name("logging-test")
        .with_memory_size("16MB")
        .with_disk_cache(tmp_path / "cache", "64MB")
        .with_prefetch(0)
    )
    caplog.set_level(logging.DEBUG, logger="xarray_zcache")
    _read(source, config)
    close_all()  # flushes the disk writes, like the end of a script
    cold = _ours(caplog)
    created = [r for r in cold if r.levelno == logging.INFO and "created" in r.getMessage()]
    assert len(created) == 1
    assert created[0].name == "xarray_zcache.cache"
    text = created[0].getMessage()
    assert "'logging-test'" in text and "15.26 MiB" in text and str(tmp_path / "cache") in text
    assert "eviction policy lru" in text
    misses = [r for r in cold if r.getMessage().startswith("xarray-zcache: miss ")]
    assert any("/v/c/0'" in r.getMessage() for r in misses)
    assert all(r.levelno == logging.DEBUG for r in misses)
    assert any("filled" in r.getMessage() and "on disk" in r.getMessage() for r in cold)
    assert any(r.name == "xarray_zcache.store" and "opening" in r.getMessage() for r in cold)

    caplog.clear()
    _read(source, config)  # a new cache over the same folder: disk hits, nothing fetched
    warm = _ours(caplog)
    assert sum("created" in r.getMessage() for r in warm) == 1
    assert any(r.getMessage().startswith("xarray-zcache: disk hit ") for r in warm)
    assert not [r for r in warm if r.getMessage().startswith("xarray-zcache: miss ")]


def test_a_scan_of_many_chunks_logs_a_bounded_number_of_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "data.zarr"
    chunks = 400
    _write(source, chunks)
    # a window longer than the test: every event kind writes at most 5 records
    logs.set_rate_limit(5, 3600)
    config = CacheConfig().with_memory_size("16MB").with_disk_cache(tmp_path / "cache", "64MB")
    caplog.set_level(logging.DEBUG, logger="xarray_zcache")
    _read(source, config)
    close_all()
    records = [r for r in _ours(caplog) if r.levelno == logging.DEBUG]
    kinds = Counter(r.getMessage().split(" ")[1] for r in records)
    assert kinds["miss"] + kinds["read-ahead"] >= 5  # per-chunk events were logged ...
    assert kinds["miss"] <= 5 and kinds["read-ahead"] <= 5  # ... but at most 5 of a kind
    assert len(records) < 100 < 2 * chunks  # unlimited: a miss and a fill per chunk


def test_suppressed_records_are_summarized(caplog: pytest.LogCaptureFixture) -> None:
    log = logs.EventLog(logging.getLogger("xarray_zcache.test"))
    logs.set_rate_limit(3, 0.05)
    caplog.set_level(logging.DEBUG, logger="xarray_zcache")
    for i in range(100):
        log.debug("miss", "miss %d", i)
    assert [r.getMessage() for r in caplog.records] == ["miss 0", "miss 1", "miss 2"]
    time.sleep(0.1)  # the window ends
    logs.flush_suppressed()
    assert (
        caplog.records[-1].getMessage().startswith("xarray-zcache: 97 more miss events suppressed")
    )
    caplog.clear()
    log.debug("miss", "miss again")  # a new window, nothing owed
    assert [r.getMessage() for r in caplog.records] == ["miss again"]


def test_nothing_is_counted_when_debug_is_off(caplog: pytest.LogCaptureFixture) -> None:
    log = logs.EventLog(logging.getLogger("xarray_zcache.test.off"))
    caplog.set_level(logging.INFO, logger="xarray_zcache")
    for i in range(10):
        log.debug("miss", "miss %d", i)
    assert not log._kinds and not caplog.records


@pytest.mark.parametrize(
    ("records", "seconds", "match"),
    [(-1, 1.0, "records"), (True, 1.0, "records"), (5, 0, "seconds"), (5, "1s", "seconds")],
)
def test_bad_rate_limits_are_refused(records: Any, seconds: Any, match: str) -> None:
    with pytest.raises(ValueError, match=f"^{match}: invalid value"):
        logs.set_rate_limit(records, seconds)
