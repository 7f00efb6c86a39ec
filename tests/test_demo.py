"""`python -m xarray_zcache.demo` (what ``make demo`` runs) works end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_cold_warm_restart() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xarray_zcache.demo", "--latency", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for name in ("cold", "warm", "restart"):
        assert f"\n{name} " in proc.stdout, output
    assert "results identical across passes: yes" in proc.stdout, output
    assert "FAILED" not in proc.stdout, output


@pytest.mark.slow
def test_demo_on_a_cluster() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xarray_zcache.demo", "--latency", "0", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "every worker restarted" in proc.stdout, output
    assert "Per worker" in proc.stdout and "total" in proc.stdout, output
    assert "Promotion decisions" in proc.stdout, output
    assert "results identical across passes: yes" in proc.stdout, output


def test_demo_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xarray_zcache.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--url" in proc.stdout
    assert "--latency" in proc.stdout
    assert "_restart-pass" not in proc.stdout


def test_demo_rejects_remote_options_without_url() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xarray_zcache.demo", "--storage-option", "anon=true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--url" in proc.stderr
