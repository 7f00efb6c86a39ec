"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1 in front of the local S3 server.

HTTP 500, 503 SlowDown, connection resets, stalls past the client timeout and truncated
bodies, chosen per request (method, path, count) at runtime with :meth:`FaultProxy.add`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import socket
import socketserver
import struct
import threading
from collections import Counter
from typing import BinaryIO, Literal

__all__ = ["FAULT_KINDS", "Fault", "FaultKind", "FaultProxy"]

_Answer = tuple[int, str, list[tuple[str, str]], bytes]

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
    query
        Only requests whose query string contains this substring (``"list-type"``:
        object listings).
    """

    kind: FaultKind
    method: str | None = None
    path: str | None = None
    times: int | None = None
    after: bool = False
    stall: float = 3.0
    query: str | None = None

    def matches(self, method: str, path: str, query: str = "") -> bool:
        return (
            (self.method is None or self.method == method)
            and (self.path is None or self.path in path)
            and (self.query is None or self.query in query)
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

    def _take(self, method: str, path: str, after: bool, query: str = "") -> Fault | None:
        with self._lock:
            for fault in self._faults:
                is_after = fault.after or fault.kind == "truncate"
                if is_after != after or not fault.matches(method, path, query):
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
                path, _, query = req.target.partition("?")
                fault = self._take(req.method, path, after=False, query=query)
                if fault is not None:
                    if not self._inject(sock, fault, req, None):
                        return
                    continue
                try:
                    upstream, answer = self._forward(upstream, req)
                except (OSError, http.client.HTTPException):
                    return  # S3 itself unreachable: drop the client connection
                fault = self._take(req.method, path, after=True, query=query)
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
    def _read_request(rfile: BinaryIO, sock: socket.socket) -> _Request | None:
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
    ) -> tuple[http.client.HTTPConnection, _Answer]:
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
        answer: _Answer | None,
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
