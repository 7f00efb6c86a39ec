"""Argument types of the ``zcache`` command: sizes, counts and ``--storage-option KEY=VALUE``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any, Final

from dask.utils import parse_bytes

from xarray_zcache.cli.errors import CliError

__all__ = ["count", "nested", "size", "storage_option", "threads"]

_SIZE_FORM: Final = "a number of bytes or a size such as '512MiB', '10GB' or '1.5TiB'"


def size(text: str) -> int:
    """Parse a positive byte size with `dask.utils.parse_bytes` (an argparse ``type``)."""
    try:
        value = parse_bytes(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; expected {_SIZE_FORM}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}; expected a size > 0: {_SIZE_FORM}"
        )
    return value


def _integer(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"invalid {what} {text!r}; expected an integer >= {least}")
    return value


def threads(text: str) -> int:
    return _integer(text, 1, "thread count")


def count(text: str) -> int:
    return _integer(text, 0, "count")


def storage_option(text: str) -> tuple[list[str], Any]:
    """Parse ``KEY=VALUE``: VALUE as JSON when it parses (``true``, ``3``, ``{...}``), else str.

    A dotted KEY (``client_kwargs.region_name=eu-west-1``) builds nested options.
    """
    key, sep, raw = text.partition("=")
    parts = key.split(".")
    if not sep or not all(parts):
        raise argparse.ArgumentTypeError(
            f"invalid storage option {text!r}; expected KEY=VALUE, e.g. anon=true or "
            "endpoint_url=http://127.0.0.1:9000 (dotted KEY for nested options)"
        )
    value: Any
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def nested(options: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """Merge parsed ``--storage-option`` values into one (nested) dict."""
    out: dict[str, Any] = {}
    for path, value in options:
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise CliError(
                    f"--storage-option {'.'.join(path)}: conflicts with {where}=..., "
                    "which is not a mapping"
                )
            node = child
        node[path[-1]] = value
    return out
