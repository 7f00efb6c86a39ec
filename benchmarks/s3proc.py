"""The benchmark's S3: `LocalS3Server` (moto + latency + request log) in a separate process.

`xarray_zcache.testing.s3server.LocalS3Server` already injects a fixed per-request
latency (a sleep in its threaded WSGI server, so concurrent requests overlap like
against real S3, over keep-alive connections) and counts requests on the server
side. In the *same* process as the benchmark, though, moto's request handling
(a few ms of Python per request) competes for the GIL with the reader being
measured: on a 2-core machine that adds ~40 % to an uncached full read and
penalises whichever reader sends more requests. So the server runs here in a
child process (its own interpreter and GIL) and is driven over a pipe:
latency, request-log snapshots and resets. No latency-injecting proxy is
needed: the server-side sleep is equivalent (a fixed delay per request, keep-alive
connections, concurrent requests overlap) and costs no extra hop.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from xarray_zcache.testing.s3server import RequestLog, RequestRecord

__all__ = ["RemoteRequestLog", "S3Process"]


def _serve(conn: Any, latency: float) -> None:  # runs in the child process
    from xarray_zcache.testing.s3server import LocalS3Server

    server = LocalS3Server(latency=latency).start()
    conn.send(server.endpoint_url)
    try:
        while True:
            try:
                op, arg = conn.recv()
            except EOFError:
                return
            if op == "records":
                conn.send(server.requests.records())
            elif op == "count":
                conn.send(len(server.requests))
            elif op == "reset":
                server.requests.reset()
                conn.send(None)
            elif op == "most_delayed":  # the most requests in flight at once since the last ask
                conn.send(server.most_delayed)
                server.most_delayed = 0
            elif op == "latency":
                server.latency = float(arg)
                conn.send(None)
            elif op == "stop":
                conn.send(None)
                return
    finally:
        server.stop()


class RemoteRequestLog(RequestLog):
    """A `RequestLog` whose records live in the server process (all queries are snapshots)."""

    def __init__(self, owner: S3Process) -> None:
        super().__init__()
        self._owner = owner

    def records(self) -> list[RequestRecord]:
        return self._owner._call("records")  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._owner._call("reset")

    def __len__(self) -> int:
        return self._owner._call("count")  # type: ignore[no-any-return]


class S3Process:
    """Start `LocalS3Server(latency=...)` in a child process; same client-side API.

    Attributes ``requests`` (a `RequestLog`: ``count``, ``chunk_gets``, ``heads``,
    ``reset``...), ``latency`` (settable), ``endpoint_url``, ``storage_options()``,
    ``filesystem()`` and ``create_bucket()`` behave as on `LocalS3Server`.
    """

    def __init__(self, latency: float = 0.0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()
        self._proc = ctx.Process(target=_serve, args=(child, latency), daemon=True)
        self._proc.start()
        self.endpoint_url: str = self._conn.recv()
        self._latency = latency
        self.requests = RemoteRequestLog(self)

    def _call(self, op: str, arg: Any = None) -> Any:
        with self._lock:
            self._conn.send((op, arg))
            return self._conn.recv()

    @property
    def latency(self) -> float:
        return self._latency

    @latency.setter
    def latency(self, value: float) -> None:
        self._call("latency", value)
        self._latency = float(value)

    @contextmanager
    def latency_set(self, value: float) -> Iterator[None]:
        """Temporarily use another latency."""
        old = self._latency
        self.latency = value
        try:
            yield
        finally:
            self.latency = old

    def storage_options(self, tag: str = "", **extra: Any) -> dict[str, Any]:
        """s3fs options with ``max_concurrency=1`` (one GET per chunk, no HEAD).

        Unlike `LocalS3Server.storage_options` there is no ``skip_instance_cache``:
        re-opening a dataset reuses fsspec's cached filesystem (and its S3 client),
        as it does for a user. ``tag`` (in botocore's ``user_agent_extra``) gives
        each reader its own cached filesystem, so that no reader profits from
        another's s3fs listing cache.
        """
        s3cfg: dict[str, Any] = {"addressing_style": "path"}
        opts: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "key": "testing",
            "secret": "testing",
            "max_concurrency": 1,
            "config_kwargs": {"s3": s3cfg, **({"user_agent_extra": tag} if tag else {})},
        }
        opts.update(extra)
        return opts

    def default_storage_options(self, tag: str = "") -> dict[str, Any]:
        """s3fs options as a user would pass them: s3fs' own ``max_concurrency`` default."""
        opts = self.storage_options(tag)
        del opts["max_concurrency"]
        return opts

    def filesystem(self, **extra: Any) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options(skip_instance_cache=True, **extra))

    def most_delayed(self) -> int:
        """The most requests the server held in their latency sleep at once since the
        last call (the concurrency a reader reached)."""
        return int(self._call("most_delayed"))

    def create_bucket(self, name: str) -> None:
        self.filesystem().call_s3("create_bucket", Bucket=name)

    def stop(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(EOFError, OSError):
                self._call("stop")
            self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
