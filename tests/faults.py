"""Fault injection for the reliability suite (issue 6), shared with ``benchmarks/stress.py``.

* **Self-describing values** (:func:`make_value`, :func:`check_value`, :func:`check_slice`):
  every value is one 16-byte unit (key tag, version, length, CRC) repeated, so a read can tell
  a right value from a torn one, another key's, or garbage, whole or sliced.
* **Damage** (:func:`flip_bit`, :func:`truncate_file`, :func:`payload_files`...): bit flips and
  truncations of payload files, ``index.db`` and its WAL.
* **Disk full** (:func:`small_tmpfs`): a size-limited tmpfs mounted for the test (root only),
  with :func:`enospc_injected` as the fallback.
* **A fault-injecting HTTP proxy** (:class:`FaultProxy`) on 127.0.0.1 in front of the local S3
  server: HTTP 500, 503 SlowDown, connection resets, stalls past the client timeout, truncated
  bodies, chosen per request (method, path, count) at runtime.
* **Scenarios** (``run_*``): each runs one kind of fault N times and returns a
  :class:`ScenarioResult` (faults injected, runs, wrong bytes returned, data lost). The tests
  run them briefly and assert the last two are 0; ``benchmarks/stress.py`` runs them longer and
  writes the table of ``docs/reliability.md``.

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
import errno
import hashlib
import http.client
import logging
import multiprocessing
import os
import pathlib
import random
import shutil
import signal
import socket
import socketserver
import sqlite3
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

# --------------------------------------------------------------------------- values

UNIT = 16
_UNIT = struct.Struct("<6sIHI")  # key tag, version, number of units, crc32 of the first 12 bytes


def key_tag(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:6]


def make_value(key: str, version: int, nunits: int | None = None) -> bytes:
    """A value naming ``key`` and ``version``: one 16-byte unit repeated ``nunits`` times."""
    if nunits is None:
        nunits = 4 + (version * 7919) % 200
    head = key_tag(key) + struct.pack("<IH", version & 0xFFFFFFFF, nunits)
    unit = head + struct.pack("<I", zlib.crc32(head))
    return unit * nunits


def _parse_unit(key: str, unit: bytes) -> tuple[int, int] | None:
    if len(unit) != UNIT:
        return None
    tag, version, nunits, crc = _UNIT.unpack(unit)
    if tag != key_tag(key) or zlib.crc32(unit[:12]) != crc or nunits == 0:
        return None
    return version, nunits


def check_value(key: str, data: bytes | None) -> int | None:
    """The version if ``data`` is exactly a value of ``key`` (never torn), else None."""
    if not data:
        return None
    parsed = _parse_unit(key, data[:UNIT])
    if parsed is None:
        return None
    version, nunits = parsed
    return version if data == data[:UNIT] * nunits else None


def check_slice(key: str, data: bytes, start: int, stop: int | None) -> bool:
    """Whether ``data`` is ``make_value(key, v)[start:stop]`` for some version ``v``.

    ``start`` must be a multiple of 16 and smaller than every value's length (>= 64 bytes).
    """
    assert start % UNIT == 0
    parsed = _parse_unit(key, data[:UNIT])
    if parsed is None:
        return False
    version, nunits = parsed
    return data == make_value(key, version, nunits)[start:stop]


# --------------------------------------------------------------------------- damage


def payload_files(root: str | os.PathLike[str]) -> list[pathlib.Path]:
    """Payload files (not temp files) under a disk-tier folder."""
    base = pathlib.Path(root)
    return sorted(
        p
        for sub, ext in (("chunks", ".cache"), ("metadata", ".meta"))
        for p in (base / sub).glob(f"*/*{ext}")
        if not p.name.startswith(".")
    )


def temp_files(root: str | os.PathLike[str]) -> list[pathlib.Path]:
    return sorted(pathlib.Path(root).glob("*/*/*.tmp"))


def flip_bit(path: str | os.PathLike[str], rng: random.Random, offset: int | None = None) -> int:
    """Flip one random bit of the file (at ``offset`` if given); returns the offset."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return -1
        pos = rng.randrange(size) if offset is None else offset
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return pos


def truncate_file(path: str | os.PathLike[str], rng: random.Random) -> int:
    """Truncate the file at a random length shorter than it; returns the new length."""
    size = os.path.getsize(path)
    new = rng.randrange(size) if size else 0
    os.truncate(path, new)
    return new


def overwrite(path: str | os.PathLike[str], rng: random.Random, nbytes: int = 512) -> int:
    """Overwrite ``nbytes`` random bytes at a random offset; returns the offset."""
    size = os.path.getsize(path)
    if size == 0:
        return -1
    pos = rng.randrange(size)
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(rng.randbytes(min(nbytes, size - pos)))
    return pos


#: Byte range of the 4 unused padding bytes of a payload header: a flip there changes nothing.
HEADER_PAD = range(36, 40)


# --------------------------------------------------------------------------- disk full


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
def enospc_injected(folder: str) -> Iterator[None]:
    """Fallback when no tmpfs can be mounted: writes of files under ``folder`` fail (ENOSPC)."""
    real_write = os.write
    real_open = os.open
    fds: set[int] = set()

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if os.fspath(path).startswith(folder) and flags & (os.O_WRONLY | os.O_RDWR):
            fds.add(fd)
        return fd

    def fake_write(fd: int, data: Any) -> int:
        if fd in fds:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_write(fd, data)

    os.open, os.write = fake_open, fake_write  # type: ignore[assignment]
    try:
        yield
    finally:
        os.open, os.write = real_open, real_write  # type: ignore[assignment]


# --------------------------------------------------------------------------- the S3 proxy

FaultKind = Literal["500", "503", "reset", "stall", "truncate"]
FAULT_KINDS: tuple[FaultKind, ...] = ("500", "503", "reset", "stall", "truncate")

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{message}</Message><RequestId>zcache-fault</RequestId></Error>"
)
_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect"}


@dataclasses.dataclass
class Fault:
    """One rule of a :class:`FaultProxy`.

    Parameters
    ----------
    kind
        ``"500"`` (InternalError), ``"503"`` (SlowDown), ``"reset"`` (TCP reset),
        ``"stall"`` (no answer for ``stall`` seconds, then close), ``"truncate"`` (the real
        answer, with its full ``Content-Length`` but half the body, then close).
    method, path
        Only requests with this method / whose path contains this substring.
    times
        Fire this many times, then stop (None: until removed).
    after
        Send the request to S3 first, then inject the fault into the answer (a write then
        reaches S3 although the client sees an error). ``truncate`` is always "after".
    stall
        Seconds a ``stall`` lasts (longer than the client's read timeout).
    """

    kind: FaultKind
    method: str | None = None
    path: str | None = None
    times: int | None = None
    after: bool = False
    stall: float = 3.0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path is None or self.path in path
        )


class _Request:
    __slots__ = ("body", "headers", "method", "target", "version")

    def __init__(
        self, method: str, target: str, version: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        self.method, self.target, self.version, self.headers, self.body = (
            method,
            target,
            version,
            headers,
            body,
        )

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class FaultProxy:
    """A keep-alive HTTP/1.1 proxy on 127.0.0.1 that injects faults into S3 traffic.

    Examples
    --------
    >>> proxy = FaultProxy("http://127.0.0.1:9000").start()  # doctest: +SKIP
    >>> proxy.add(Fault("503", method="GET", path="/bucket/a/c/", times=2))  # doctest: +SKIP
    >>> opts = server.storage_options(endpoint_url=proxy.url)  # doctest: +SKIP
    """

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        parts = upstream.split("://", 1)[-1].rstrip("/").split(":")
        self.upstream = (parts[0], int(parts[1]) if len(parts) > 1 else 80)
        self.host = host
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: socketserver.ThreadingTCPServer | None = None
        self.injected: Counter[str] = Counter()
        self.forwarded = 0

    # -- control ---------------------------------------------------------------------------

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take(self, method: str, path: str, after: bool) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                is_after = fault.after or fault.kind == "truncate"
                if is_after != after or not fault.matches(method, path):
                    continue
                if fault.times is not None:
                    if fault.times <= 0:
                        continue
                    fault.times -= 1
                self.injected[fault.kind] += 1
                return fault
        return None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((self.host, 0), Handler)
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving ---------------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        rfile = sock.makefile("rb")
        upstream: http.client.HTTPConnection | None = None
        try:
            while not self._stop.is_set():
                req = self._read_request(rfile, sock)
                if req is None:
                    return
                path = req.target.split("?", 1)[0]
                fault = self._take(req.method, path, after=False)
                if fault is not None:
                    if not self._inject(sock, fault, req, None):
                        return
                    continue
                try:
                    upstream, answer = self._forward(upstream, req)
                except (OSError, http.client.HTTPException):
                    return  # S3 itself unreachable: drop the client connection
                fault = self._take(req.method, path, after=True)
                if fault is not None:
                    if not self._inject(sock, fault, req, answer):
                        return
                    continue
                sock.sendall(self._render(req, *answer))
                if (req.header("connection") or "").lower() == "close":
                    return
        except (OSError, ValueError):
            return
        finally:
            with contextlib.suppress(OSError):
                rfile.close()
            if upstream is not None:
                upstream.close()
            with contextlib.suppress(OSError):
                sock.close()

    @staticmethod
    def _read_request(rfile: Any, sock: socket.socket) -> _Request | None:
        line = rfile.readline(65537)
        if not line:
            return None
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            h = rfile.readline(65537)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        req = _Request(method, target, version, headers, b"")
        if (req.header("expect") or "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if (req.header("transfer-encoding") or "").lower() == "chunked":
            parts = []
            while True:
                size = int(rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(rfile.read(size))
                rfile.readline()
            req.body = b"".join(parts)
        else:
            length = int(req.header("content-length") or 0)
            req.body = rfile.read(length) if length else b""
        return req

    def _forward(
        self, conn: http.client.HTTPConnection | None, req: _Request
    ) -> tuple[http.client.HTTPConnection, tuple[int, str, list[tuple[str, str]], bytes]]:
        headers = {k: v for k, v in req.headers if k.lower() not in _HOP_BY_HOP}
        for attempt in (0, 1):
            if conn is None:
                conn = http.client.HTTPConnection(*self.upstream, timeout=30)
            try:
                conn.request(req.method, req.target, body=req.body or None, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.forwarded += 1
                return conn, (resp.status, resp.reason, list(resp.getheaders()), body)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _render(
        req: _Request, status: int, reason: str, headers: list[tuple[str, str]], body: bytes
    ) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}"]
        length = len(body)
        for k, v in headers:
            if k.lower() == "content-length" and req.method == "HEAD":
                length = int(v)
            if k.lower() not in _HOP_BY_HOP:
                lines.append(f"{k}: {v}")
        lines.append(f"Content-Length: {length}")
        lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if req.method == "HEAD" else head + body

    def _inject(
        self,
        sock: socket.socket,
        fault: Fault,
        req: _Request,
        answer: tuple[int, str, list[tuple[str, str]], bytes] | None,
    ) -> bool:
        """Apply ``fault``; returns whether the client connection stays usable."""
        if fault.kind in _ERRORS:
            status, reason, code, message = _ERRORS[fault.kind]
            body = _ERROR_BODY.format(code=code, message=message).encode()
            headers = [("Content-Type", "application/xml"), ("x-amz-request-id", "fault")]
            if req.method == "HEAD":
                body = b""
            sock.sendall(self._render(req, status, reason, headers, body))
            return True
        if fault.kind == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if fault.kind == "stall":
            self._stop.wait(fault.stall)
            return False
        # truncate: the real status and headers, half the body, then close
        assert answer is not None
        status, reason, headers, body = answer
        data = self._render(req, status, reason, headers, body)
        cut = len(data) - len(body) + len(body) // 2 if body else len(data) // 2
        sock.sendall(data[:cut])
        return False


# --------------------------------------------------------------------------- results


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
        if len(self.notes) < 20:
            self.notes.append(text)

    def __iadd__(self, other: ScenarioResult) -> ScenarioResult:
        self.faults += other.faults
        self.runs += other.runs
        self.wrong += other.wrong
        self.lost += other.lost
        self.errors_to_user += other.errors_to_user
        self.violations += other.violations
        self.notes += other.notes[: max(0, 20 - len(self.notes))]
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
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds += time.perf_counter() - t0


# --------------------------------------------------------------------------- shared pieces


def dataset_keys(n: int) -> list[str]:
    """``n`` zarr-like keys (three metadata documents, then chunks) for the scenarios."""
    keys = ["zarr.json", "v/zarr.json", "w/zarr.json"]
    keys += [f"v/c/{i}/0" for i in range(n // 2)]
    keys += [f"w/c/{i}" for i in range(n - len(keys))]
    return keys


def config(cache_dir: str | os.PathLike[str], name: str, **sizes: Any) -> Any:
    """A `CacheConfig` with a disk tier in ``cache_dir`` (no read-ahead, quick maintenance)."""
    from xarray_zcache import CacheConfig

    cfg = (
        CacheConfig()
        .with_name(name)
        .with_memory_size(sizes.get("memory", "8MB"))
        .with_disk_cache(os.fspath(cache_dir), sizes.get("disk", "64MB"))
        .with_prefetch(0)
    )
    return cfg


def local_store(path: str | os.PathLike[str]) -> Any:
    from zarr.storage import LocalStore

    return LocalStore(os.fspath(path))


def cached(
    data: str | os.PathLike[str], cache_dir: str | os.PathLike[str], name: str, **kw: Any
) -> Any:
    """A `CachedStore` over a `LocalStore` at ``data`` with its disk tier in ``cache_dir``."""
    from xarray_zcache import CachedStore

    return CachedStore(local_store(data), config(cache_dir, name, **kw))


def buf(data: bytes) -> Any:
    from zarr.core.buffer import cpu

    return cpu.Buffer.from_bytes(data)


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"


def compare_all(
    store: Any, reference: Any, keys: list[str], result: ScenarioResult, what: str
) -> None:
    """Read every key through ``store`` (whole and a range) and compare with ``reference``.

    Counts wrong bytes and lost data in ``result``; an exception counts as an error to the
    user (and as lost data: the key could not be read).
    """
    from zarr.abc.store import RangeByteRequest

    for key in keys:
        expected = reference.get_sync(key)
        expected_bytes = None if expected is None else expected.to_bytes()
        for byte_range in (None, RangeByteRequest(16, 48)):
            try:
                got = store.get_sync(key, byte_range=byte_range)
            except Exception as exc:
                result.errors_to_user += 1
                result.lost += 1
                result.note(f"{what}: {key} raised {type(exc).__name__}: {exc}")
                continue
            want = expected_bytes
            if want is not None and byte_range is not None:
                want = want[16:48]
            got_bytes = None if got is None else got.to_bytes()
            if got_bytes == want:
                continue
            if got_bytes is None:
                result.lost += 1
                result.note(f"{what}: {key} missing")
            else:
                result.wrong += 1
                result.note(f"{what}: {key} wrong bytes (range={byte_range})")


def verify_folder(
    cache_dir: str | os.PathLike[str],
    capacity: int,
    result: ScenarioResult,
    *,
    crashed: bool,
    damaged: bool = False,
) -> dict[str, int]:
    """``DiskTier.verify`` then ``verify(repair=True)``; inconsistencies are noted as violations.

    After a crash, rows without file and temp files are expected (``crashed=True``); damaged,
    orphan or mismatched files never are. After outside damage (``damaged=True``) anything
    may be found. After repair everything must be consistent.
    """
    from xarray_zcache.cache.disk import DiskTier

    tier = DiskTier(cache_dir, capacity)
    try:
        report = tier.verify()
        allowed = {"ok", "index_damaged"} | ({"missing_files", "temp_files"} if crashed else set())
        bad = {k: v for k, v in report.items() if v and k not in allowed}
        if bad and not damaged:
            result.note(f"verify: {bad}")
            result.violations += 1
        tier.verify(repair=True)
        again = tier.verify()
        bad = {k: v for k, v in again.items() if v and k != "ok"}
        if bad:
            result.note(f"verify after repair: {bad}")
            result.violations += 1
        if tier.used_bytes() > capacity:
            result.note(f"disk tier over capacity: {tier.used_bytes()} > {capacity}")
            result.violations += 1
        on_disk = sum(
            f.stat().st_size for f in payload_files(cache_dir)
        )  # payloads + small headers
        if on_disk > capacity * 1.25 + 4096:
            result.note(f"payload files over capacity: {on_disk} > {capacity}")
            result.violations += 1
        return report
    finally:
        tier.close()


# --------------------------------------------------------------------------- 1. crashes

CRASH_MEMORY = "256kB"  # small: most reads reach the disk tier
CRASH_DISK = 600_000  # small: the children evict while they fill


def _crash_child(
    data: str, cache_dir: str, seed: int, ready: Any, writes: bool, name: str
) -> None:  # pragma: no cover - runs in a child process that is SIGKILLed
    """Fill the disk tier through a `CachedStore` until killed (optionally writing too)."""
    from zarr.abc.store import RangeByteRequest

    store = cached(data, cache_dir, name, memory=CRASH_MEMORY, disk=CRASH_DISK)
    keys = dataset_keys(40)
    rng = random.Random(seed)
    cache = store.cache
    i = 0
    while True:
        key = rng.choice(keys)
        op = rng.random()
        if writes and op < 0.10:
            store.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))
        elif writes and op < 0.13:
            store.delete_sync(key)
        elif op < 0.25:
            store.get_sync(key, byte_range=RangeByteRequest(16, 48))
        elif op < 0.27:
            cache.flush()
        elif op < 0.28:
            cache.maintain()
        else:
            store.get_sync(key)
        i += 1
        if i == 30:
            ready.set()


def _spawn(target: Callable[..., None], *args: Any) -> Any:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def run_crash_rounds(
    workdir: str | os.PathLike[str],
    rounds: int,
    seed: int = 0,
    *,
    child_writes: bool = False,
    max_delay: float = 0.4,
) -> ScenarioResult:
    """SIGKILL a process filling the disk tier at random moments, ``rounds`` times in a row.

    Between rounds the parent changes some keys through its own `CachedStore` (so stale
    entries would show). After each kill a fresh cache (empty memory, new `DiskTier`) reads
    every key, whole and ranged, and must get what the inner store holds; `DiskTier.verify`
    must find only what a crash may leave (rows without file, temp files) and
    ``verify(repair=True)`` must leave the folder consistent.
    """
    result = ScenarioResult("SIGKILL while filling" + (" and writing" if child_writes else ""))
    work = pathlib.Path(workdir)
    data, cache_dir = work / "data", work / "cache"
    keys = dataset_keys(40)
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    with timed(result):
        writer = cached(data, cache_dir, _unique("writer"), memory=CRASH_MEMORY, disk=CRASH_DISK)
        reference = local_store(data)
        for key in keys:
            writer.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))
        writer.cache.flush()
        for r in range(rounds):
            for key in rng.sample(keys, 4):
                writer.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))
            for key in rng.sample(keys, 2):
                if rng.random() < 0.5:
                    writer.delete_sync(key)
                else:
                    writer.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))
            writer.cache.flush()
            ready = ctx.Event()
            proc = ctx.Process(
                target=_crash_child,
                args=(str(data), str(cache_dir), seed * 1000 + r, ready, child_writes, "child"),
                daemon=True,
            )
            proc.start()
            try:
                deadline = time.monotonic() + 60
                while not ready.wait(0.05):
                    if not proc.is_alive() or time.monotonic() > deadline:
                        result.violations += 1
                        result.note(f"round {r}: child never got going ({proc.exitcode})")
                        break
                time.sleep(rng.uniform(0.0, max_delay))
            finally:
                proc.kill()  # SIGKILL
                proc.join(30)
            result.faults += 1
            result.runs += 1
            reader = cached(
                data, cache_dir, _unique("reader"), memory=CRASH_MEMORY, disk=CRASH_DISK
            )
            try:
                compare_all(reader, reference, keys, result, f"round {r}")
            finally:
                reader.cache.close()
            verify_folder(cache_dir, CRASH_DISK, result, crashed=True)
            if r % 20 == 19:
                _forget_caches()
        writer.cache.close()
    return result


def _crash_at_child(data: str, cache_dir: str, point: str) -> None:  # pragma: no cover
    """Crash (SIGKILL itself) at a chosen point of a write through the cache."""
    store = cached(data, cache_dir, "crash-at", memory=CRASH_MEMORY, disk=CRASH_DISK)
    key = "v/c/0/0"
    store.get_sync(key)  # cached (memory and disk) with its first version
    store.cache.flush()

    def die(*_args: Any, **_kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    inner = store.inner
    if point == "after_inner_write_of_missing_key":
        # the key is missing: the read leaves a negative entry (persisted on disk)
        key = "v/c/new"
        assert store.get_sync(key) is None
        store.cache.flush()
        point = "after_inner_write"
    if point == "after_inner_write":
        real_set = inner.set_sync

        def set_then_die(k: str, v: Any) -> None:
            real_set(k, v)
            die()

        inner.set_sync = set_then_die
        store.set_sync(key, buf(make_value(key, 2)))
    elif point == "after_inner_delete":
        real_delete = inner.delete_sync

        def delete_then_die(k: str) -> None:
            real_delete(k)
            die()

        inner.delete_sync = delete_then_die
        store.delete_sync(key)
    elif point == "before_replace":
        os.replace = die  # type: ignore[assignment]  # DiskTier.put: between its transactions
        store.cache.disk_tier.put("other", b"x" * 1000)
    elif point == "mid_temp_write":
        real_write = os.write
        calls = []

        def write_then_die(fd: int, data: Any) -> int:
            calls.append(1)
            if len(calls) == 2:  # header written, payload not
                die()
            return real_write(fd, data)

        os.write = write_then_die  # type: ignore[assignment]
        store.cache.disk_tier.put("other", b"x" * 1000)
    elif point == "mid_eviction":
        real_unlink = os.unlink
        calls = []

        def unlink_then_die(path: Any, *a: Any, **k: Any) -> None:
            real_unlink(path, *a, **k)
            calls.append(1)
            if len(calls) == 3:
                die()

        os.unlink = unlink_then_die  # type: ignore[assignment]
        store.cache.disk_tier.evict(0)
    raise SystemExit(f"crash point {point!r} not reached")


def crash_at(workdir: str | os.PathLike[str], point: str) -> ScenarioResult:
    """Kill a process at one precise point of a write; a fresh cache must read the truth."""
    result = ScenarioResult(f"SIGKILL at {point}")
    work = pathlib.Path(workdir)
    data, cache_dir = work / "data", work / "cache"
    keys = dataset_keys(12)
    reference = local_store(data)
    for key in keys:
        reference.set_sync(key, buf(make_value(key, 1)))
    with timed(result):
        filler = cached(data, cache_dir, _unique("filler"), memory=CRASH_MEMORY, disk=CRASH_DISK)
        for key in keys:
            filler.get_sync(key)
        filler.cache.close()
        proc = _spawn(_crash_at_child, str(data), str(cache_dir), point)
        proc.join(60)
        if point == "after_inner_write_of_missing_key":
            keys = [*keys, "v/c/new"]
        result.faults += 1
        result.runs += 1
        if proc.exitcode != -signal.SIGKILL:
            result.violations += 1
            result.note(f"child exit code {proc.exitcode}: crash point not reached")
        reader = cached(data, cache_dir, _unique("reader"), memory=CRASH_MEMORY, disk=CRASH_DISK)
        try:
            compare_all(reader, reference, keys, result, point)
        finally:
            reader.cache.close()
        verify_folder(cache_dir, CRASH_DISK, result, crashed=True)
    return result


# --------------------------------------------------------------------------- 2. corruption

DAMAGE_KINDS = (
    "payload-bitflip",
    "payload-truncate",
    "payload-garbage",
    "index-bitflip",
    "index-overwrite",
    "index-truncate",
    "index-garbage",
    "index-delete",
    "wal-bitflip",
    "wal-truncate",
    "wal-overwrite",
    "wal-delete",
)


def _fill(data: pathlib.Path, keys: list[str], rng: random.Random) -> None:
    reference = local_store(data)
    for key in keys:
        reference.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))


def _snapshot_index(cache_dir: pathlib.Path, into: pathlib.Path) -> None:
    """Copy ``index.db`` and its WAL as they are now (with a connection open: a crash state)."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ("index.db", "index.db-wal"):
        src = cache_dir / name
        if src.exists():
            shutil.copyfile(src, into / name)


def _damage(kind: str, cache_dir: pathlib.Path, rng: random.Random) -> tuple[int, list[str]]:
    """Damage the folder; returns (number of damaged files, damaged payload keys' hashes)."""
    target, _, how = kind.partition("-")
    if target == "payload":
        files = payload_files(cache_dir)
        chosen = rng.sample(files, max(1, len(files) // 4))
        for f in chosen:
            if how == "bitflip":
                pos = flip_bit(f, rng)
                while pos in HEADER_PAD:  # a flip in the padding changes nothing: redo
                    flip_bit(f, rng, pos)  # (undo)
                    pos = flip_bit(f, rng)
            elif how == "truncate":
                truncate_file(f, rng)
            else:
                overwrite(f, rng, 64)
        return len(chosen), [f.stem for f in chosen]
    path = cache_dir / ("index.db" if target == "index" else "index.db-wal")
    if not path.exists() or path.stat().st_size == 0:
        return 0, []
    if how == "bitflip":
        for _ in range(rng.randint(1, 8)):
            flip_bit(path, rng)
    elif how == "overwrite":
        overwrite(path, rng, 4096)
    elif how == "truncate":
        truncate_file(path, rng)
    elif how == "garbage":
        path.write_bytes(rng.randbytes(path.stat().st_size))
    elif how == "delete":
        path.unlink()
    return 1, []


def run_corruption_rounds(
    workdir: str | os.PathLike[str], rounds: int, seed: int = 0, kinds: tuple[str, ...] = ()
) -> ScenarioResult:
    """Damage payload files, ``index.db`` or its WAL, then read everything through the cache.

    Each round fills a cache through a `CachedStore` (the "live" store), damages the folder
    in one way (``kinds``, cycled), and reads every key through the live store (its memory
    tier emptied, so reads reach the disk) and through a fresh store: the bytes must be right,
    nothing may raise, damaged payload files must be counted in ``stats().corruptions`` and
    logged once. Writes through the live store must still work; ``verify(repair=True)`` must
    leave the folder consistent. WAL damage is applied to a crash state (``index.db`` and
    ``index.db-wal`` copied while a connection was open, restored after it closed).
    """
    kinds = kinds or DAMAGE_KINDS
    result = ScenarioResult("damaged payload files, index.db, WAL")
    rng = random.Random(seed)
    keys = dataset_keys(30)
    capture = _WarningCapture()
    with timed(result), capture:
        for r in range(rounds):
            kind = kinds[r % len(kinds)]
            work = pathlib.Path(workdir) / f"round{r}"
            data, cache_dir = work / "data", work / "cache"
            _fill(data, keys, rng)
            reference = local_store(data)
            live = cached(data, cache_dir, _unique("live"))
            for key in keys:
                live.get_sync(key)
            live.cache.flush()
            restart = kind.startswith("wal") or (r // len(kinds)) % 2 == 0
            if kind.startswith("wal"):
                # a crash state with a WAL: copy the files while the connection is open
                for key in rng.sample(keys, 5):  # some fresh commits in the WAL
                    live.set_sync(key, buf(make_value(key, rng.randrange(1 << 30))))
                live.cache.flush()
                _snapshot_index(cache_dir, work / "snap")
                live.cache.close()
                for name in ("index.db", "index.db-wal"):
                    if (work / "snap" / name).exists():
                        shutil.copyfile(work / "snap" / name, cache_dir / name)
                (cache_dir / "index.db-shm").unlink(missing_ok=True)
            elif restart:
                live.cache.close()  # damage while no process runs (checkpoints the WAL)
            else:  # damage under a running store: move the pages from the WAL to index.db
                with contextlib.closing(sqlite3.connect(cache_dir / "index.db")) as side:
                    side.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            capture.records.clear()
            n, _hashes = _damage(kind, cache_dir, rng)
            result.faults += n
            result.runs += 1
            if restart:
                live = cached(data, cache_dir, _unique("live"))
            else:
                live.cache.memory_tier.clear()  # make the live store read its (damaged) disk tier
            fresh = cached(data, cache_dir, _unique("fresh"))
            try:
                compare_all(live, reference, keys, result, f"{kind} (live)")
                compare_all(fresh, reference, keys, result, f"{kind} (fresh)")
                # writes still go through and are read back right
                for key in rng.sample(keys, 3):
                    value = make_value(key, rng.randrange(1 << 30))
                    try:
                        live.set_sync(key, buf(value))
                    except Exception as exc:
                        result.errors_to_user += 1
                        result.note(f"{kind}: set raised {type(exc).__name__}: {exc}")
                        continue
                    live.cache.memory_tier.clear()
                    got = live.get_sync(key)
                    if got is None or got.to_bytes() != value:
                        result.wrong += 1
                        result.note(f"{kind}: written value not read back")
                stats = fresh.stats() + live.stats()
                if kind.startswith("payload") and stats.corruptions < 1:
                    result.violations += 1
                    result.note(f"{kind}: damage not counted in stats ({stats.corruptions})")
                damaged_warnings = [rec for rec in capture.records if "damaged" in rec.getMessage()]
                if len(damaged_warnings) > 2:  # at most once per cache (live, fresh)
                    result.violations += 1
                    result.note(f"{kind}: {len(damaged_warnings)} warnings (expected once)")
            except Exception as exc:  # anything raised to the user
                result.errors_to_user += 1
                result.note(f"{kind}: raised {type(exc).__name__}: {exc}")
            finally:
                fresh.cache.close()
                live.cache.close()
            verify_folder(cache_dir, 64_000_000, result, crashed=True, damaged=True)
            _forget_caches()
    return result


def _forget_caches() -> None:
    """Close and forget this process's caches (long runs open thousands)."""
    from xarray_zcache.registry import close_all

    close_all()


class _WarningCapture(logging.Handler):
    """Collects WARNING+ records of the ``xarray_zcache`` loggers."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _WarningCapture:
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


# --------------------------------------------------------------------------- 3. concurrency

STRESS_MEMORY = "128kB"  # small: most reads reach the shared disk folder
STRESS_DISK = 400_000  # small: constant eviction
STRESS_KEYS = 48


def stress_value(key: str, version: int) -> bytes:
    return make_value(key, version, 4 + (version * 7919) % 1500)


def _check_read(key: str, got: bytes | None, byte_range: Any) -> bool:
    """Whether ``got`` (a read of ``key`` with ``byte_range``) is part of one valid value."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    if got is None:
        return True  # deleted (by its owner) or not written yet: nothing to check
    if byte_range is None:
        return check_value(key, got) is not None
    if isinstance(byte_range, RangeByteRequest):
        return check_slice(key, got, byte_range.start, byte_range.end)
    if isinstance(byte_range, OffsetByteRequest):
        return check_slice(key, got, byte_range.offset, None)
    assert isinstance(byte_range, SuffixByteRequest)
    parsed = _parse_unit(key, got[:UNIT])
    if parsed is None:
        return False
    version, nunits = parsed
    full = make_value(key, version, nunits)
    return got == full[max(0, len(full) - byte_range.suffix) :]


def _random_range(rng: random.Random) -> Any:
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    start = UNIT * rng.randrange(4)  # every value has >= 4 units
    pick = rng.random()
    if pick < 0.5:
        return RangeByteRequest(start, start + UNIT * rng.randint(1, 40))
    if pick < 0.75:
        return OffsetByteRequest(start)
    return SuffixByteRequest(UNIT * rng.randint(1, 40))


def _stress_worker(
    data: str,
    cache_dir: str,
    index: int,
    nproc: int,
    threads: int,
    ops: int,
    seed: int,
    barrier: Any,
    out: Any,
    shared_writers: bool = False,
) -> None:  # pragma: no cover - runs in a child process
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    proto = default_buffer_prototype()
    store = cached(data, cache_dir, "stress", memory=STRESS_MEMORY, disk=STRESS_DISK)
    cache = store.cache
    keys = dataset_keys(STRESS_KEYS)
    owned = keys if shared_writers else [k for i, k in enumerate(keys) if i % nproc == index]
    counts: Counter[str] = Counter()
    notes: list[str] = []
    lock = threading.Lock()
    version = iter(range((index + 1) << 24, (index + 2) << 24))

    def note(text: str) -> None:
        with lock:
            if len(notes) < 10:
                notes.append(text)

    def run(t: int) -> None:
        rng = random.Random(seed * 1000 + index * 16 + t)
        use_async = t % 2 == 1  # half the threads go through zarr's event loop
        barrier.wait()
        for n in range(ops):
            key = rng.choice(keys)
            op = rng.random()
            try:
                if op < 0.12:
                    key = rng.choice(owned)
                    with lock:
                        v = next(version)
                    value = buf(stress_value(key, v))
                    if use_async:
                        sync(store.set(key, value))
                    else:
                        store.set_sync(key, value)
                    counts["writes"] += 1
                elif op < 0.16:
                    key = rng.choice(owned)
                    if use_async:
                        sync(store.delete(key))
                    else:
                        store.delete_sync(key)
                    counts["deletes"] += 1
                else:
                    byte_range = _random_range(rng) if op < 0.4 else None
                    if use_async:
                        got = sync(store.get(key, proto, byte_range))
                    else:
                        got = store.get_sync(key, byte_range=byte_range)
                    counts["reads"] += 1
                    data_ = None if got is None else got.to_bytes()
                    if not _check_read(key, data_, byte_range):
                        counts["wrong"] += 1
                        note(f"wrong bytes for {key} {byte_range}")
            except Exception as exc:
                counts["errors"] += 1
                note(f"{type(exc).__name__}: {exc}")
            if n % 25 == 0:
                if cache.memory_tier.used_bytes() > cache.memory_tier.capacity:
                    counts["bounds"] += 1
                    note(f"memory {cache.memory_tier.used_bytes()} > {cache.memory_tier.capacity}")
                if (
                    cache.disk_tier is not None
                    and cache.disk_tier.used_bytes() > cache.disk_tier.capacity
                ):
                    counts["bounds"] += 1
                    note(f"disk {cache.disk_tier.used_bytes()} > {cache.disk_tier.capacity}")

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stats = cache.stats()
    counts["memory_hits"] = stats.total_hits(tier="memory")
    counts["disk_hits"] = stats.total_hits(tier="disk")
    counts["misses"] = stats.total_misses()
    counts["disk_evictions"] = stats.evictions["disk"]
    cache.close()
    out.put((index, dict(counts), notes))


def run_stress(
    workdir: str | os.PathLike[str],
    processes: int = 4,
    threads: int = 4,
    ops: int = 200,
    seed: int = 0,
    *,
    shared_writers: bool = False,
) -> ScenarioResult:
    """``processes`` x ``threads`` reading and writing overlapping keys on one disk folder.

    Every key is read by everyone (whole, ranges, offsets, suffixes; through ``get_sync``
    and through zarr's event loop) and written or deleted by the threads of one process (its
    owner). Values are self-describing: a read must be (part of) a complete value of the
    key read, never torn or another key's. Memory and disk use stay within their budgets.
    At the end a fresh cache must read exactly what the inner store holds, and the folder
    must verify clean. With ``shared_writers`` every process writes every key (concurrent
    writers of one key in several processes).
    """
    result = ScenarioResult(
        f"{processes} processes x {threads} threads, one disk folder"
        + (", every process writing every key" if shared_writers else "")
    )
    work = pathlib.Path(workdir)
    data, cache_dir = work / "data", work / "cache"
    keys = dataset_keys(STRESS_KEYS)
    reference = local_store(data)
    for key in keys:
        reference.set_sync(key, buf(stress_value(key, 1)))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes * threads)
    out = ctx.Queue()
    with timed(result):
        procs = [
            ctx.Process(
                target=_stress_worker,
                args=(
                    str(data),
                    str(cache_dir),
                    i,
                    processes,
                    threads,
                    ops,
                    seed,
                    barrier,
                    out,
                    shared_writers,
                ),
                daemon=True,
            )
            for i in range(processes)
        ]
        for p in procs:
            p.start()
        reports = []
        for _ in procs:
            try:
                reports.append(out.get(timeout=600))
            except Exception:
                result.violations += 1
                result.note("a stress process did not report")
                break
        for p in procs:
            p.join(30)
            if p.exitcode != 0:
                result.violations += 1
                result.note(f"stress process exit code {p.exitcode}")
        totals: Counter[str] = Counter()
        for _index, counts, _notes in reports:
            totals.update(counts)
        result.note(
            "hits memory/disk, misses, disk evictions: "
            f"{totals['memory_hits']}/{totals['disk_hits']}, {totals['misses']}, "
            f"{totals['disk_evictions']}"
        )
        for _index, counts, notes in reports:
            result.runs += sum(counts.get(k, 0) for k in ("reads", "writes", "deletes"))
            result.faults += counts.get("writes", 0) + counts.get("deletes", 0)
            result.wrong += counts.get("wrong", 0)
            result.errors_to_user += counts.get("errors", 0)
            result.violations += counts.get("bounds", 0)
            for text in notes:
                result.note(text)
        reader = cached(data, cache_dir, _unique("reader"), memory=STRESS_MEMORY, disk=STRESS_DISK)
        try:
            compare_all(reader, reference, keys, result, "after the stress run")
        finally:
            reader.cache.close()
        verify_folder(cache_dir, STRESS_DISK, result, crashed=False)
    return result


# --------------------------------------------------------------------------- 4. S3 faults


@dataclasses.dataclass(frozen=True)
class S3Case:
    """One fault from S3: ``kind`` on ``op`` requests, ``times`` times (None: until cleared)."""

    kind: FaultKind
    op: Literal["get", "get-meta", "get-range", "set"] = "get"
    times: int | None = None
    after: bool = False  # the request reaches S3 (a write is applied), the answer is faulty


def s3_client_options(server: Any, endpoint_url: str) -> dict[str, Any]:
    """s3fs options with short timeouts and few retries (faults end quickly)."""
    return server.storage_options(  # type: ignore[no-any-return]
        endpoint_url=endpoint_url,
        config_kwargs={
            "s3": {"addressing_style": "path"},
            "read_timeout": 0.3,
            "connect_timeout": 0.3,
            "retries": {"total_max_attempts": 1},  # s3fs retries (SlowDown, timeouts...)
        },
    )


@contextlib.contextmanager
def few_s3fs_retries(n: int = 2) -> Iterator[None]:
    """s3fs retries timeouts and truncated bodies 5 times by default: make it ``n``."""
    import s3fs

    saved = s3fs.S3FileSystem.retries
    s3fs.S3FileSystem.retries = n
    try:
        yield
    finally:
        s3fs.S3FileSystem.retries = saved


def _cached_entries(store: Any, key: str) -> list[str]:
    """Where anything about ``key`` is held by the store's cache (memory, pending, disk...)."""
    cache = store.cache
    ck = f"{store.namespace}/{key}"
    mine = lambda k: k == ck or k.startswith(ck + "\0")  # noqa: E731
    in_memory = cache.memory_tier.keys()
    found = [f"memory:{k!r}" for k in in_memory if mine(k)]
    found += [f"pending:{k!r}" for k in list(cache._pending) if mine(k)]
    if ck in cache._negatives:
        found.append("negative entry")
    if cache.disk_tier is not None:
        cache.flush()
        on_disk = cache.disk_tier.keys()
        found += [f"disk:{k!r}" for k in on_disk if mine(k)]
    return found


def run_s3_faults(
    server: Any,
    cases: list[S3Case],
    workdir: str | os.PathLike[str],
    seed: int = 0,
) -> ScenarioResult:
    """Inject each fault of ``cases`` between the cache and the local S3 server.

    While the fault is active the operation must succeed with the right bytes (s3fs or
    botocore retried) or raise an error to the user; nothing about the key may then be
    cached. Once the faults stop, a read through the same store must return exactly what S3
    holds (read directly, without the proxy).
    """
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from xarray_zcache.backend import open_store

    proto = default_buffer_prototype()
    result = ScenarioResult("faults from S3 (500, 503, reset, stall, truncate)")
    rng = random.Random(seed)
    bucket = f"faults-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    server.create_bucket(bucket)
    direct = server.filesystem()
    keys = ["zarr.json", "v/zarr.json", *[f"v/c/{i}" for i in range(len(cases) + 4)]]
    for key in keys:
        direct.pipe_file(f"{bucket}/ds/{key}", make_value(key, 1, 600))
    with timed(result), FaultProxy(server.endpoint_url) as proxy, few_s3fs_retries(2):
        opts = s3_client_options(server, proxy.url)
        cfg = config(pathlib.Path(workdir) / "cache", _unique("s3"), memory="8MB")
        store = open_store(
            f"s3://{bucket}/ds", storage_options=opts, cache_config=cfg, read_only=False
        )
        chunk_keys = [k for k in keys if "/c/" in k]
        rng.shuffle(chunk_keys)
        for i, case in enumerate(cases):
            key = "v/zarr.json" if case.op == "get-meta" else chunk_keys[i % len(chunk_keys)]
            path = f"/{bucket}/ds/{key}"
            method = "PUT" if case.op == "set" else "GET"
            before = sum(proxy.injected.values())
            proxy.add(
                Fault(
                    case.kind,
                    method=method,
                    path=path,
                    times=case.times,
                    after=case.after,
                    stall=1.0,
                )
            )
            byte_range = RangeByteRequest(16, 80) if case.op == "get-range" else None
            new_value = make_value(key, 1000 + i, 300)
            failed = False
            try:
                if case.op == "set":
                    sync(store.set(key, buf(new_value)))
                else:
                    got = sync(store.get(key, proto, byte_range))
                    want = direct.cat_file(f"{bucket}/ds/{key}")
                    want = want if byte_range is None else want[16:80]
                    if got is None or got.to_bytes() != want:
                        result.wrong += got is not None
                        result.lost += got is None
                        result.note(f"{case}: wrong answer while faulty")
            except Exception as exc:
                failed = True
                result.errors_to_user += 1
                if not str(exc) and not type(exc).__name__:
                    result.violations += 1
                held = _cached_entries(store, key)
                if held and case.op != "set":
                    result.violations += 1
                    result.note(f"{case}: failed read left {held} in the cache")
            proxy.clear()
            result.faults += sum(proxy.injected.values()) - before
            result.runs += 1
            if case.times is None and not failed and sum(proxy.injected.values()) > before:
                result.note(f"{case}: persistent fault but no error")
            # faults gone: the cache must serve exactly what S3 holds
            truth = direct.cat_file(f"{bucket}/ds/{key}")
            for rr in (None, RangeByteRequest(16, 80)):
                try:
                    got = sync(store.get(key, proto, rr))
                except Exception as exc:
                    result.lost += 1
                    result.note(f"{case}: read after the faults raised {type(exc).__name__}")
                    continue
                want = truth if rr is None else truth[16:80]
                if got is None:
                    result.lost += 1
                    result.note(f"{case}: missing after the faults")
                elif got.to_bytes() != want:
                    result.wrong += 1
                    result.note(f"{case}: wrong bytes after the faults (range={rr})")
            if case.op == "set" and not failed and truth != new_value:
                result.lost += 1
                result.note(f"{case}: acknowledged write not in S3")
        store.cache.close()
    return result


def s3_cases_all() -> list[S3Case]:
    """Every fault kind, once (retried) and persistent, on the read paths and on writes."""
    cases = []
    for kind in FAULT_KINDS:
        cases.append(S3Case(kind, "get", times=1))
        cases.append(S3Case(kind, "get", times=None))
    cases += [
        S3Case("500", "get-meta", None),
        S3Case("truncate", "get-meta", None),
        S3Case("503", "get-range", 1),
        S3Case("reset", "get-range", None),
        S3Case("500", "set", None, after=True),
        S3Case("reset", "set", 1, after=True),
        S3Case("503", "set", None),
    ]
    return cases


def s3_cases_random(n: int, seed: int) -> list[S3Case]:
    rng = random.Random(seed)
    ops: list[Literal["get", "get-meta", "get-range", "set"]] = [
        "get",
        "get-meta",
        "get-range",
        "set",
    ]
    return [
        S3Case(
            rng.choice(FAULT_KINDS),
            rng.choice(ops),
            times=rng.choice([1, 1, 2, None]),
            after=rng.random() < 0.5,
        )
        for _ in range(n)
    ]


# --------------------------------------------------------------------------- 5. disk full


def run_disk_full_rounds(
    workdir: str | os.PathLike[str], rounds: int, seed: int = 0, *, force_injection: bool = False
) -> ScenarioResult:
    """The disk tier's filesystem fills up (a 1 MiB tmpfs; injected ENOSPC if none can be
    mounted) while a store reads and writes through it, and a new cache opens on it.

    Every read must return the right bytes and no call may raise; a warning is logged; no
    temp file is left behind; reads are served from memory; once space is freed the disk
    tier stores entries again.
    """
    result = ScenarioResult(
        "disk tier's filesystem full"
        + (" (ENOSPC injected at every write)" if force_injection else " (1 MiB tmpfs)")
    )
    rng = random.Random(seed)
    keys = dataset_keys(40)
    with timed(result):
        for r in range(rounds):
            work = pathlib.Path(workdir) / f"full{r}"
            data, mnt = work / "data", work / "mnt"
            reference = local_store(data)
            for key in keys:  # ~2 MiB in all: twice the filesystem
                reference.set_sync(key, buf(make_value(key, rng.randrange(1 << 30), 3000)))
            with contextlib.ExitStack() as stack:
                mounted = False if force_injection else stack.enter_context(small_tmpfs(mnt))
                cache_dir = mnt / "cache"
                capture = stack.enter_context(_WarningCapture())
                store = cached(data, cache_dir, _unique("full"), memory="16MB", disk="64MB")
                order = keys[:]
                rng.shuffle(order)
                split = rng.randrange(5, len(order) - 5)
                try:
                    compare_all(store, reference, order[:split], result, "before full")
                    store.cache.flush()
                    injection = None
                    filler = None
                    if mounted:
                        filler = fill_disk(mnt)
                    else:
                        injection = enospc_injected(os.fspath(cache_dir))
                        injection.__enter__()
                    try:
                        result.faults += 1
                        result.runs += 1
                        compare_all(store, reference, order, result, "disk full")
                        for key in rng.sample(keys, 6):
                            value = make_value(key, rng.randrange(1 << 30), 3000)
                            store.set_sync(key, buf(value))
                            stored = reference.get_sync(key)
                            if stored is None or stored.to_bytes() != value:
                                result.lost += 1
                                result.note(f"round {r}: acknowledged write not in the store")
                        store.delete_sync(order[0])
                        compare_all(store, reference, keys, result, "disk full, after writes")
                        store.cache.flush()
                        other = cached(data, cache_dir, _unique("newcomer"), memory="16MB")
                        compare_all(other, reference, keys, result, "new cache on a full disk")
                        other.cache.close()
                        result.faults += store.stats().disk_write_failures
                    finally:
                        # space again (or no more injected errors)
                        if filler is not None:
                            filler.unlink()
                        if injection is not None:
                            injection.__exit__(None, None, None)
                    if not any(rec.name.startswith("xarray_zcache") for rec in capture.records):
                        result.violations += 1
                        result.note(f"round {r}: no warning logged")
                    left = temp_files(cache_dir)
                    if left:
                        result.violations += 1
                        result.note(f"round {r}: temp files left: {len(left)}")
                    # the disk tier stores again
                    probe = f"{store.namespace}/{order[-1]}"
                    store.cache.memory_tier.clear()
                    store.cache.invalidate(probe)
                    store.get_sync(order[-1])
                    store.cache.flush()
                    if store.cache.disk_tier is None or probe not in store.cache.disk_tier:
                        result.violations += 1
                        result.note(f"round {r}: the disk tier did not recover")
                except Exception as exc:
                    result.errors_to_user += 1
                    result.note(f"round {r}: raised {type(exc).__name__}: {exc}")
                finally:
                    store.cache.close()
                    from xarray_zcache.registry import close_all

                    close_all()
    return result
