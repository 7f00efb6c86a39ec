"""The result record of a fault scenario, and a capture of the package's warnings.

Definitions used by every scenario:

*wrong bytes returned*
    a read through the cache returned bytes that differ from what the reference (the inner
    store, or a plain reference store) holds at that moment, or (under concurrent writers)
    bytes that are not a complete value of the key read.
*data lost*
    a read through the cache said "missing" (or failed once faults were gone) for a key the
    reference holds, or a write acknowledged through the cache is not in the inner store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator

__all__ = ["ScenarioResult", "WarningCapture", "timed"]

_MAX_NOTES = 20


@dataclasses.dataclass
class ScenarioResult:
    """Outcome of running one kind of fault ``runs`` times."""

    name: str
    faults: int = 0
    runs: int = 0
    wrong: int = 0
    lost: int = 0
    errors_to_user: int = 0
    #: broken invariants other than wrong or lost bytes (sizes over budget, inconsistent
    #: folder after repair, files left behind, exceptions where none may be raised)
    violations: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def note(self, text: str) -> None:
        """Keep ``text`` (the first 20 notes only)."""
        if len(self.notes) < _MAX_NOTES:
            self.notes.append(text)

    def __iadd__(self, other: ScenarioResult) -> ScenarioResult:
        self.faults += other.faults
        self.runs += other.runs
        self.wrong += other.wrong
        self.lost += other.lost
        self.errors_to_user += other.errors_to_user
        self.violations += other.violations
        self.notes += other.notes[: max(0, _MAX_NOTES - len(self.notes))]
        self.seconds += other.seconds
        return self

    def assert_clean(self, *, errors_allowed: bool = False) -> None:
        """No wrong bytes, no data lost, no violation (and no error, unless allowed)."""
        bad = self.wrong or self.lost or self.violations
        if not errors_allowed:
            bad = bad or self.errors_to_user
        assert not bad, dataclasses.asdict(self)


@contextlib.contextmanager
def timed(result: ScenarioResult) -> Iterator[ScenarioResult]:
    """Add the time spent in the ``with`` block to ``result.seconds``."""
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds += time.perf_counter() - t0


class WarningCapture(logging.Handler):
    """Collects WARNING+ records of the ``xarray_zcache`` loggers (a context manager)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> WarningCapture:
        logger = logging.getLogger("xarray_zcache")
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("xarray_zcache")
        logger.removeHandler(self)
        logger.setLevel(self._level)
