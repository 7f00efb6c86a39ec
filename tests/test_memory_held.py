"""The memory a reading process holds for the cache stays within its configured tiers
(issue 19: memory tier + decoded tier + 10 %), measured by `benchmarks/memory_held.py`
in processes of their own: a dataset 4x the two tiers read through xarray + Dask."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_held.py"
MiB = 2**20


@pytest.mark.slow
def test_the_tiers_hold_what_they_are_configured_to(tmp_path: Path) -> None:
    out = tmp_path / "held.json"
    argv = ["--mib", "24", "--memory", "4MiB", "--decoded", "2MiB", "--passes", "1"]
    argv += ["--threads", "2", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "growth beyond the control" in done.stdout
    figures = json.loads(out.read_text())
    run = figures["run"]
    capacity = run["memory_capacity"] + run["decoded_capacity"]
    assert run["memory_evictions"] > 0 and run["decoded_evictions"] > 0  # both tiers full
    assert run["accounted"] <= capacity
    # what the tiers keep alive (tables, keys, bytes, each array's whole buffer)
    assert run["asizeof_tiers"] <= 1.1 * capacity
