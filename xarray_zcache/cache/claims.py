"""Claims: at most one validation of a unit is in flight per cache folder.

In a process, the first reader of a stale unit validates it and the others wait for it
(`Flight`, any thread or event loop) and adopt its result or its failure. Across
processes, the validating one holds a claim in the book: a lease of `versions.LEASE`
seconds, renewed by a thread while the listing runs, released when the validation ends,
fails or is cancelled; a dead holder's claim lapses (at once on the same host). A
waiting reader never waits on an abandoned claim longer than the lease, then validates
itself (`xarray_zcache.cache.freshness`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Literal

from xarray_zcache.cache import versions as _versions

if TYPE_CHECKING:
    from xarray_zcache.cache.listing import Unit
    from xarray_zcache.cache.versions import VersionBook

__all__ = ["Claims", "Flight"]

logger = logging.getLogger("xarray_zcache.cache")


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Flight:
    """A validation of one unit in flight in this process: the tasks and threads that
    need the unit meanwhile wait for it here (whatever their event loop)."""

    __slots__ = ("_lock", "_waiters", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def finish(self) -> None:
        with self._lock:
            self.done.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # (its loop is closed)
                loop.call_soon_threadsafe(_wake, fut)

    async def wait(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self.done.is_set():
                return True
            self._waiters.append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        return True


class Claims:
    """The validations this process leads (one `Flight` per unit) and the claims of the
    book it holds for them (thread-safe). ``counts``: claims taken over (``lapsed``:
    not renewed, ``dead``: the holder is gone)."""

    def __init__(self, book: VersionBook, counts: Counter[str]) -> None:
        self.book = book
        self._counts = counts
        self._flights: dict[str, Flight] = {}
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._keeper: threading.Thread | None = None

    def take(self, unit: Unit, now: float) -> tuple[Literal["join", "busy", "lead"], Flight | None]:
        """One look at the claims of ``unit``: "join" this process's validation in flight;
        "busy": another process holds the claim; "lead": the caller validates (the claim
        is taken and the flight registered: `land` it when done)."""
        with self._lock:
            flight = self._flights.get(unit.name)
            if flight is not None:
                return "join", flight
            why = self.book.claim(unit.name, now)
            if why is None:
                return "busy", None
            flight = self._flights[unit.name] = Flight()
            self._held.add(unit.name)
            if self._keeper is None:
                self._keeper = threading.Thread(
                    target=self._keep_leases, name="zcache-leases", daemon=True
                )
                self._keeper.start()
        if why != "free":
            self._counts[why] += 1
            logger.info(
                "xarray-zcache: the claim to validate %s was taken over (its holder %s)",
                unit.prefix,
                "stopped renewing it" if why == "lapsed" else "is gone",
            )
        return "lead", flight

    def _keep_leases(self) -> None:
        """Renew the claims this process holds (a thread: a busy event loop or a
        synchronous listing must not let them lapse) until it holds none."""
        while True:
            time.sleep(_versions.LEASE / 3)
            with self._lock:
                held = list(self._held)
                if not held:
                    self._keeper = None
                    return
            for name in held:
                if not self.book.renew(name, time.time()):
                    logger.debug("xarray-zcache: the claim of %s was lost", name)

    def land(self, unit: Unit, flight: Flight) -> None:
        """End this process's validation of ``unit`` (done, failed or cancelled)."""
        with self._lock:
            if self._flights.get(unit.name) is flight:
                del self._flights[unit.name]
            self._held.discard(unit.name)
        self.book.release(unit.name)
        flight.finish()
