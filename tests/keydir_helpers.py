"""Helpers of the location-map tests (``test_disk_keydir.py``, ``test_review_keydir.py``):
a folder of known entries, another process acting on it, a fork()ed child, old code of the
package from git history."""

from __future__ import annotations

import faulthandler
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

from xarray_zcache.cache.disk import DiskTier, Fill
from xarray_zcache.cache.disk.segments import SEGMENT_THRESHOLD

KEYS = [f"ns/v/c/{i}" for i in range(200)]


def value(key: str, tag: str = "v1") -> bytes:
    """The self-describing value of ``key`` (its key and ``tag``, repeated)."""
    return f"<{key}|{tag}>".encode() * 20


def tier(path: pathlib.Path, capacity: int = 1 << 30) -> DiskTier:
    return DiskTier(path, capacity, segment_threshold=SEGMENT_THRESHOLD)


def filled(path: pathlib.Path, keys: list[str] = KEYS) -> None:
    """``path`` holding ``keys`` (their `value`), written and closed (a hint written)."""
    with tier(path) as t:
        assert all(t.put_many([Fill(k, value(k), namespace="ns") for k in keys]))


def in_another_process(path: pathlib.Path, code: str, capacity: int = 1 << 30) -> None:
    """Run ``code`` with ``t``, a tier on ``path``, in a new Python process."""
    script = (
        "import sys\n"
        "from xarray_zcache.cache.disk import DiskTier, Fill, rows\n"
        f"t = DiskTier({str(path)!r}, {capacity})\n"
        f"{code}\n"
        "t.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)


def forked(child: Callable[[], None]) -> int:
    """Run ``child`` in a real fork()ed process; its exit status (0: no exception)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        faulthandler.dump_traceback_later(60, exit=True)  # a hang: its stack, then exit 1
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def extract_package(commit: str, dest: pathlib.Path) -> bool:
    """The package as of ``commit`` (``git archive``) under ``dest``; False if this
    checkout's history does not hold it."""
    archive = subprocess.run(
        ["git", "archive", commit, "xarray_zcache"],
        capture_output=True,
        cwd=pathlib.Path(__file__).parent.parent,
    )
    if archive.returncode != 0:
        return False
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return True
