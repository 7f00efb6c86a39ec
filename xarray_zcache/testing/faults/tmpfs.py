"""A full disk: a size-limited tmpfs (root only), a filler file, or injected ENOSPC."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator

from xarray_zcache.cache.disk import hooks

__all__ = ["enospc_injected", "fill_disk", "small_tmpfs"]


@contextlib.contextmanager
def small_tmpfs(path: str | os.PathLike[str], size: str = "1m") -> Iterator[bool]:
    """Mount a tmpfs of ``size`` at ``path`` (created); yields False if mounting is impossible."""
    os.makedirs(path, exist_ok=True)
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", os.fspath(path)],
            capture_output=True,
            check=False,
        )
        mounted = proc.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            for _ in range(20):
                done = subprocess.run(["umount", os.fspath(path)], capture_output=True, check=False)
                if done.returncode == 0:
                    break
                time.sleep(0.1)
            else:  # still busy (a file left open by a failed test): detach it anyway
                subprocess.run(["umount", "-l", os.fspath(path)], capture_output=True, check=False)


def fill_disk(path: str | os.PathLike[str]) -> pathlib.Path:
    """Fill the filesystem holding ``path`` with a filler file; returns the filler's path."""
    filler = pathlib.Path(path) / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    break
                raise
        for small in (512, 64, 1):  # the last few bytes too
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block[:small])
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def enospc_injected(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Fallback when no tmpfs can be mounted: payload writes under ``folder`` fail (ENOSPC).

    Uses the disk tier's ``after-header-write`` and ``before-append`` hooks (this process
    only): the header of a temp file is written, then its payload write fails as on a full
    filesystem; appending records to a segment fails the same way.
    """
    root = os.fspath(folder)

    def no_space(path: object) -> None:
        if str(path).startswith(root):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    with (
        hooks.registered("after-header-write", no_space),
        hooks.registered("before-append", no_space),
    ):
        yield
