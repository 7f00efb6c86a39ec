"""What the ``zcache`` command prints: JSON, aligned tables, readable keys and times, messages,
and a quiet end when the reader closes the output pipe."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from dask.utils import format_time

from xarray_zcache.cli.errors import PROG

__all__ = [
    "emit",
    "emit_json",
    "error",
    "library_warnings",
    "note",
    "plural",
    "printable",
    "quiet_stdout",
    "show_key",
    "table",
    "warn",
    "when",
]


def emit(text: str = "") -> None:
    """A line of the command's output (stdout)."""
    print(text, flush=True)


def emit_json(data: Any) -> None:
    """The command's output as one JSON document (sizes in bytes, times in epoch seconds)."""
    emit(json.dumps(data, indent=2))


def note(text: str, *, as_json: bool) -> None:
    """A progress line: on stdout, or on stderr when stdout carries ``--json`` output."""
    print(text, file=sys.stderr if as_json else sys.stdout, flush=True)


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def table(rows: Sequence[tuple[str, str]], indent: str = "  ") -> list[str]:
    """``KEY  VALUE`` lines with the keys padded to one width."""
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{indent}{k:<{width}}  {v}" for k, v in rows]


def printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show_key(key: str) -> str:
    """A cache key for people: the byte range of a ranged entry spelled out."""
    base, sep, rng = key.partition("\x00")
    shown = printable(base)
    if not sep:
        return shown
    if rng.startswith("r") and "-" in rng:
        start, _, end = rng[1:].partition("-")
        return f"{shown} [bytes {start}-{end}]"
    if rng.startswith("o"):
        return f"{shown} [bytes {rng[1:]}-]"
    if rng.startswith("s"):
        return f"{shown} [last {rng[1:]} bytes]"
    return f"{shown} [{printable(rng)}]"


def when(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    age = now - t
    if age < 0:
        return f"{stamp} (in {format_time(-age)})"
    return f"{stamp} ({format_time(age)} ago)"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


def quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null, so the flush at exit cannot fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


@contextlib.contextmanager
def library_warnings() -> Iterator[None]:
    """Show the library's warnings (damaged files, disk full...) on stderr while running."""
    lib = logging.getLogger("xarray_zcache")
    if lib.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    lib.addHandler(handler)
    try:
        yield
    finally:
        lib.removeHandler(handler)
