"""Named points of the disk tier's write and removal paths, for crash and fault tests.

A test registers a callable for a point (``hooks.register("before-replace", die)``) instead of
patching ``os.replace`` or ``os.write`` for the whole process. With nothing registered,
:func:`fire` is one dictionary lookup. Points:

``after-header-write`` (temp path)
    A payload file's header is in its temp file, the payload not yet.
``after-temp-write`` (temp path)
    The temp file is complete, not yet renamed into place.
``before-replace`` (temp path, final path)
    ``put``'s second transaction holds the write lock and found its row: the rename is next.
``after-replace`` (final path)
    The payload file is in place; the second transaction is not yet committed.
``before-append`` (segment path)
    Records of small entries are about to be appended to a segment file (nothing of them
    written yet; their rows are committed after the append).
``after-unlink`` (path)
    A payload file of a removed row (eviction, deletion) was unlinked; the row is not yet
    deleted (it is, in the same transaction).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Final

__all__ = ["POINTS", "clear", "fire", "register", "registered"]

POINTS: Final = frozenset(
    {
        "after-header-write",
        "after-temp-write",
        "before-replace",
        "after-replace",
        "before-append",
        "after-unlink",
    }
)

_hooks: dict[str, list[Callable[..., object]]] = {}


def register(point: str, hook: Callable[..., object]) -> None:
    """Call ``hook(*args)`` each time the disk tier reaches ``point`` (see the module doc)."""
    if point not in POINTS:
        raise ValueError(f"point must be one of {sorted(POINTS)}, got {point!r}")
    _hooks.setdefault(point, []).append(hook)


def clear(point: str | None = None) -> None:
    """Forget the hooks of ``point`` (None: of every point)."""
    if point is None:
        _hooks.clear()
    else:
        _hooks.pop(point, None)


@contextlib.contextmanager
def registered(point: str, hook: Callable[..., object]) -> Iterator[None]:
    """``register`` for the duration of a ``with`` block."""
    register(point, hook)
    try:
        yield
    finally:
        hooks = _hooks.get(point, [])
        if hook in hooks:
            hooks.remove(hook)


def fire(point: str, *args: object) -> None:
    """Run the hooks registered for ``point`` (in registration order)."""
    hooks = _hooks.get(point)
    if hooks:
        for hook in list(hooks):
            hook(*args)
