"""A pytest plugin counting the aiohttp sessions tests leave open (opt-in, patches nothing
the tests see: it only records `aiohttp.ClientSession` creation and collection).

    PYTHONPATH=.:tests ZCACHE_SESSION_CENSUS=/tmp/census python -m pytest -p session_census ...
    python tests/session_census.py /tmp/census   # the summary (all xdist workers)

Every session is followed from its creation (the test running then, where it came from:
the first frames of this repository on the creating thread, or on the main thread when it
was created on fsspec's I/O thread, and whether its s3fs filesystem is synchronous) to its
end: closed by the end of its test, or left open then. A session left open is then either
closed later (a synchronous s3fs filesystem's finalizer, a later close), collected while
open (aiohttp's "Unclosed client session") or still open when the run ends (what
`conftest.pytest_sessionfinish` closes). Each worker writes ``<dir>/census-<worker>.json``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import traceback
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = str(Path(__file__).resolve().parent.parent)
_current = ["(collection)"]
_records: list[dict[str, Any]] = []
_refs: list[tuple[weakref.ref[Any], dict[str, Any]]] = []
_by_id: dict[int, dict[str, Any]] = {}


def _project_frames(frame: Any, limit: int = 4) -> list[str]:
    out = []
    for summary in traceback.extract_stack(frame, limit=60)[::-1]:
        name = summary.filename
        if name.startswith(ROOT) and not name.endswith("session_census.py"):
            out.append(f"{os.path.relpath(name, ROOT)}:{summary.lineno} {summary.name}")
            if len(out) >= limit:
                break
    return out


def _synchronous(frame: Any) -> bool | None:
    while frame is not None:
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "S3FileSystem":
            return not owner.asynchronous
        frame = frame.f_back
    return None


def pytest_configure(config: pytest.Config) -> None:
    import aiohttp

    init, delete = aiohttp.ClientSession.__init__, aiohttp.ClientSession.__del__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        frame = sys._getframe(1)
        origin = _project_frames(frame)
        if not origin:  # created on fsspec's I/O thread: where the main thread waits
            main = sys._current_frames().get(threading.main_thread().ident or 0)
            origin = _project_frames(main) if main is not None else []
        record = {
            "test": _current[0],
            "thread": threading.current_thread().name,
            "sync": _synchronous(frame),
            "origin": origin,
            "end": None,
        }
        _records.append(record)
        _refs.append((weakref.ref(self), record))
        _by_id[id(self)] = record

    def recording_del(self: Any, *args: Any, **kwargs: Any) -> None:
        record = _by_id.pop(id(self), None)
        if record is not None and not self.closed and record["end"] in (None, "open at test end"):
            record["end"] = "collected open"
        delete(self, *args, **kwargs)

    aiohttp.ClientSession.__init__ = recording_init  # type: ignore[method-assign]
    aiohttp.ClientSession.__del__ = recording_del  # type: ignore[method-assign]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _current[0] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    yield  # (the fixtures are torn down)
    for ref, record in _refs:
        if record["test"] == item.nodeid and record["end"] is None:
            session = ref()
            record["end"] = (
                "open at test end" if session is not None and not session.closed else "closed"
            )
    _current[0] = "(between tests)"


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    gc.collect()
    for ref, record in _refs:
        s = ref()
        open_now = s is not None and not s.closed
        if record["end"] is None:
            record["end"] = "open at run end" if open_now else "closed"
        elif record["end"] == "open at test end":
            later = "still open at run end" if open_now else "closed later"
            record["end"] = f"left open, {later}"
        elif record["end"] == "collected open":
            record["end"] = "left open, collected open"
    folder = os.environ.get("ZCACHE_SESSION_CENSUS")
    if folder:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"census-{worker}.json").write_text(json.dumps(_records, indent=1))


def summarize(records: list[dict[str, Any]]) -> str:
    """Counts by end, the ones left open by file and by where they came from."""
    lines = [f"{len(records)} sessions"]
    for end, n in Counter(r["end"] for r in records).most_common():
        lines.append(f"  {n:4d} {end}")
    left = [r for r in records if r["end"] not in ("closed",)]
    lines.append(f"left open at the end of their test (or after): {len(left)}")
    by_file = Counter((r["test"].split("::")[0], r["sync"]) for r in left)
    for (name, sync), n in sorted(by_file.items()):
        lines.append(f"  {n:4d} {name} (sync s3fs: {sync})")
    lines.append("by origin:")
    by_origin = Counter(((r["origin"] or ["?"])[0], r["sync"], r["end"]) for r in left)
    for (origin, sync, end), n in by_origin.most_common():
        lines.append(f"  {n:4d} {origin} (sync: {sync}; {end})")
    return "\n".join(lines)


if __name__ == "__main__":
    found: list[dict[str, Any]] = []
    for path in sorted(Path(sys.argv[1]).glob("census-*.json")):
        found += json.loads(path.read_text())
    print(summarize(found))
