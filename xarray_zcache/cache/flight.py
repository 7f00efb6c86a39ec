"""Single flight: concurrent misses of one key on one event loop send one request."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import weakref
from collections.abc import Callable

__all__ = ["Flight", "SingleFlight"]


@dataclasses.dataclass(slots=True)
class Flight:
    """A load in progress: its future and the generation token it started under."""

    future: asyncio.Future[bytes | None]
    token: tuple[int, int]


class SingleFlight:
    """The loads in flight, per event loop and key.

    A caller may join a flight only while the flight's token is still valid
    (``valid(key, token)``): a read issued after a write or delete of the key
    returned must not get the value a load that started before the write fetched.
    Loops are held weakly, so a process that runs many short loops
    (``asyncio.run``) keeps nothing of them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Flight]] = (
            weakref.WeakKeyDictionary()
        )

    def _table(self) -> dict[str, Flight]:
        loop = asyncio.get_running_loop()
        table = self._loops.get(loop)
        if table is None:
            with self._lock:
                table = self._loops.setdefault(loop, {})
        return table

    def joinable(
        self, key: str, valid: Callable[[str, tuple[int, int]], bool]
    ) -> asyncio.Future[bytes | None] | None:
        """The future of a valid flight of ``key`` on this loop, or ``None``."""
        flight = self._table().get(key)
        if flight is None or flight.future.done() or not valid(key, flight.token):
            return None
        return flight.future

    def start(self, key: str, token: tuple[int, int]) -> Flight:
        """Register this caller as the loader of ``key`` (replacing a stale flight)."""
        flight = Flight(asyncio.get_running_loop().create_future(), token)
        self._table()[key] = flight
        return flight

    def finish(self, key: str, flight: Flight) -> None:
        """Unregister ``flight`` (if it is still the registered one)."""
        table = self._table()
        if table.get(key) is flight:
            del table[key]
