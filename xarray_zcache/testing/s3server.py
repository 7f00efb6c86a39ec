"""An embedded local S3 server that counts the requests reaching it.

The server is moto's S3 implementation (the same WSGI application that
``moto.server.ThreadedMotoServer`` runs), served by werkzeug on
``127.0.0.1`` in a daemon thread, behind a small WSGI middleware that

* records every request (method, bucket, key, query string, status, ``Range``
  header) in a thread-safe :class:`RequestLog`, so tests can assert how many
  round trips a code path really costs, and
* optionally sleeps a fixed ``latency`` before handling each request, to
  emulate S3 round-trip times. The server is threaded, so concurrent requests
  overlap (as they would against real S3) instead of queueing behind each
  other's delays.

Request costs with s3fs
-----------------------
With s3fs' defaults (``max_concurrency=10``) a whole-object read
(``fs.cat_file(path)``, which is what ``zarr.storage.FsspecStore.get`` does for
a full chunk) first issues a ``HEAD`` to learn the object size (s3fs splits
large objects into concurrent ranged GETs), then the ``GET``: two requests per
chunk. A missing key costs ``HEAD`` (404) followed by a ``LIST``
(``list-type=2``, probing whether the path is a "directory") and no GET.

With ``max_concurrency=1`` s3fs skips the size probe entirely: a present chunk
costs exactly one ``GET`` and a missing one exactly one ``GET`` (404).
:meth:`LocalS3Server.storage_options` therefore sets ``max_concurrency=1``.
Ranged reads (``start``/``end`` given) never probe the size and always cost a
single ``GET`` (206, or 404 if missing). No option removes the probes of
``fs.exists``/``fs.info`` (``FsspecStore.exists``): ``HEAD`` for a present key,
``HEAD`` (404) + ``LIST`` for a missing one, unless s3fs' listings cache
already holds the parent "directory".

State sharing
-------------
moto keeps its S3 state in process-global backends, so two servers started in
the same process see the same buckets and objects (only their request logs
are separate). Tests should use unique bucket names rather than rely on a
fresh server being empty.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import s3fs
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

from xarray_zcache.testing.requestlog import METADATA_NAMES, RequestLog, RequestRecord

__all__ = [
    "METADATA_NAMES",
    "LocalS3Server",
    "RequestLog",
    "RequestRecord",
    "start_local_s3",
]


_TEST_CREDENTIALS = {"key": "testing", "secret": "testing"}


def _wsgi_str_to_text(value: str) -> str:
    """Undo PEP 3333's latin-1 "bytes in a str" encoding of environ values."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _parse_target(environ: WSGIEnvironment, server_host: str) -> tuple[str | None, str | None]:
    """Extract ``(bucket, key)`` from a request's environ.

    Path-style addressing (``/bucket/key``) is assumed, with a fallback for
    virtual-hosted style (``Host: bucket.<server host>``).
    """
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if isinstance(raw_uri, str) and raw_uri:
        path = urlsplit(_wsgi_str_to_text(raw_uri)).path
        path = unquote(path)
    else:
        path = _wsgi_str_to_text(str(environ.get("PATH_INFO", "")))

    host_header = str(environ.get("HTTP_HOST", "")).rsplit(":", 1)[0].lower()
    suffix = "." + server_host.lower()
    if host_header.endswith(suffix) and len(host_header) > len(suffix):
        bucket = host_header[: -len(suffix)]
        key = path[1:] if path.startswith("/") else path
        return bucket, key or None

    stripped = path[1:] if path.startswith("/") else path
    if not stripped:
        return None, None
    bucket_part, _, key_part = stripped.partition("/")
    return bucket_part or None, key_part or None


class _QuietRequestHandler(MotoRequestHandler):
    """moto's request handler without werkzeug's per-request access log lines."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Do not log successful requests (the :class:`RequestLog` records them)."""


class _RecordingMiddleware:
    """WSGI middleware: optional fixed delay, then delegate and record the request."""

    def __init__(self, app: WSGIApplication, server: LocalS3Server) -> None:
        self._app = app
        self._server = server

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        arrived = time.time()
        delay = self._server.latency
        if delay > 0:
            self._server._delay_started()
            try:
                time.sleep(delay)
            finally:
                self._server._delay_ended()

        bucket, key = _parse_target(environ, self._server.host)
        method = str(environ.get("REQUEST_METHOD", "")).upper()
        query = str(environ.get("QUERY_STRING", ""))
        range_header = environ.get("HTTP_RANGE")
        status: list[int] = []

        def recording_start_response(
            status_line: str,
            headers: list[tuple[str, str]],
            exc_info: Any = None,
        ) -> Any:
            status[:] = [int(status_line.split(" ", 1)[0])]
            return start_response(status_line, headers, exc_info)

        def record(default_status: int) -> None:
            self._server.requests.add(
                RequestRecord(
                    method=method,
                    bucket=bucket,
                    key=key,
                    query=query,
                    status=status[0] if status else default_status,
                    range=str(range_header) if range_header is not None else None,
                    arrived=arrived,
                )
            )

        try:
            result = self._app(environ, recording_start_response)
        except BaseException:
            record(500)
            raise
        if status:
            # Recorded before werkzeug writes the response, so a client that has
            # received its response always finds the request in the log.
            record(0)
            return result
        return self._record_lazily(result, record, status)

    @staticmethod
    def _record_lazily(
        result: Iterable[bytes], record: Callable[[int], None], status: list[int]
    ) -> Iterator[bytes]:
        """Record once the app has called ``start_response`` (checked per chunk / at close)."""
        recorded = False
        try:
            for chunk in result:
                if not recorded and status:
                    record(0)
                    recorded = True
                yield chunk
        finally:
            if not recorded:
                record(500)  # 500 unless start_response was called after all
            close = getattr(result, "close", None)
            if close is not None:
                close()


class LocalS3Server:
    """Moto's S3 server on a local port, with request recording and injected latency.

    Moto's S3 application runs on ``host`` (a free port by default) in a
    background daemon thread, wrapped in a WSGI middleware that records every
    request (method, bucket, key, query, status, ``Range`` header) in
    :attr:`requests` and optionally sleeps :attr:`latency` seconds per request
    (a fixed delay emulating S3 round trips; the server is threaded, so
    concurrent requests overlap like against real S3).

    Parameters
    ----------
    host : str, default "127.0.0.1"
        Interface to bind. Keep an IP address: botocore then always uses
        path-style addressing (``/bucket/key``).
    port : int, default 0
        Port to bind; 0 picks a free one.
    latency : float, default 0.0
        Seconds to sleep before handling each request. Can be changed at
        runtime by assigning :attr:`latency`.

    Notes
    -----
    moto's S3 state is process-global: all servers in one process share
    buckets and objects; only the request logs are per server. Use unique
    bucket names per test.

    Examples
    --------
    >>> with LocalS3Server() as server:  # doctest: +SKIP
    ...     server.create_bucket("demo")
    ...     fs = server.filesystem()
    ...     fs.pipe_file("demo/a/c/0", b"xyz")
    ...     server.requests.reset()
    ...     fs.cat_file("demo/a/c/0")
    ...     assert server.requests.count("GET", key_prefix="a/c/") == 1
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0) -> None:
        if latency < 0:
            raise ValueError(f"latency must be >= 0, got {latency!r}")
        self.host: str = host
        self._requested_port = port
        self.latency: float = float(latency)
        #: the most requests that were in their latency sleep at once (concurrency seen)
        self.most_delayed = 0
        self._delayed = 0
        self._delay_lock = threading.Lock()
        self.requests: RequestLog = RequestLog()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server is currently serving."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port (only valid while running)."""
        if self._server is None:
            raise RuntimeError("LocalS3Server is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def endpoint_url(self) -> str:
        """Base URL of the server, e.g. ``"http://127.0.0.1:54321"``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalS3Server:
        """Bind the socket and start serving in a daemon thread (no-op if running).

        Returns
        -------
        LocalS3Server
            ``self``, for chaining.
        """
        with self._lock:
            if self._server is not None:
                return self
            app = DomainDispatcherApplication(create_backend_app)
            server = make_server(
                self.host,
                self._requested_port,
                _RecordingMiddleware(app, self),
                threaded=True,
                request_handler=_QuietRequestHandler,
            )
            # The socket is listening once make_server returns: connections made before
            # serve_forever() starts just wait in the backlog.
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"LocalS3Server-{server.server_address[1]}",
                daemon=True,
            )
            thread.start()
            self._server = server
            self._thread = thread
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread (idempotent)."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = None
            self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _delay_started(self) -> None:
        with self._delay_lock:
            self._delayed += 1
            self.most_delayed = max(self.most_delayed, self._delayed)

    def _delay_ended(self) -> None:
        with self._delay_lock:
            self._delayed -= 1

    def __repr__(self) -> str:
        where = self.endpoint_url if self.running else "stopped"
        return f"<LocalS3Server {where} latency={self.latency}s requests={len(self.requests)}>"

    # -- clients -----------------------------------------------------------------------------

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """s3fs/fsspec storage options for talking to this server.

        The defaults make one whole-object read cost exactly one request:
        ``max_concurrency=1`` stops s3fs from sending a ``HEAD`` (size probe)
        before every un-ranged ``GET``. ``skip_instance_cache=True`` makes every
        ``url_to_fs``/``FsspecStore.from_url`` build a fresh filesystem: fsspec
        would otherwise hand back a cached *asynchronous* S3FileSystem whose
        aiohttp session is bound to an earlier (possibly closed) event loop,
        which fails with "Event loop is closed" under pytest-asyncio's
        per-test loops (it also keeps listing caches from leaking between
        tests). Path-style addressing is forced and dummy credentials are
        passed explicitly (no environment variables are read or set).

        Parameters
        ----------
        **extra
            Extra/overriding s3fs options (e.g. ``asynchronous=True``,
            ``use_listings_cache=False``).

        Returns
        -------
        dict
            ``{"endpoint_url": ..., "key": "testing", "secret": "testing",
            "max_concurrency": 1, "skip_instance_cache": True,
            "config_kwargs": {"s3": {"addressing_style": "path"}}, **extra}``.
            A fresh dict on every call.

        Notes
        -----
        No ``region_name`` is put in ``client_kwargs``: s3fs would then send
        ``LocationConstraint=us-east-1`` when creating buckets, which S3 (and
        moto) reject.
        """
        opts: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            **_TEST_CREDENTIALS,
            "max_concurrency": 1,
            "skip_instance_cache": True,
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }
        opts.update(extra)
        return opts

    def filesystem(self, **extra: Any) -> s3fs.S3FileSystem:
        """A fresh, non-cached s3fs filesystem bound to this server.

        Parameters
        ----------
        **extra
            Extra s3fs options merged into :meth:`storage_options`. Pass
            ``asynchronous=True`` to use the ``_``-prefixed coroutine methods
            from inside a running event loop; by default the filesystem is
            synchronous (its coroutines run on fsspec's IO thread).

        Returns
        -------
        s3fs.S3FileSystem
            Created with ``skip_instance_cache=True``, so it never shares
            clients, listing caches or event loops with other instances.
        """
        opts = self.storage_options(**extra)
        opts["skip_instance_cache"] = True
        return s3fs.S3FileSystem(**opts)

    @contextlib.contextmanager
    def closing_filesystem(self, **extra: Any) -> Iterator[s3fs.S3FileSystem]:
        """:meth:`filesystem` (synchronous), its aiohttp session closed when the ``with``
        block ends (`xarray_zcache.sessions.close_filesystem_session`), not left to s3fs's
        finalizer, which runs only when the garbage collector frees the filesystem.

        >>> with server.closing_filesystem() as fs:  # doctest: +SKIP
        ...     fs.pipe_file("bucket/key", b"data")
        """
        from xarray_zcache.sessions import close_filesystem_session

        fs = self.filesystem(**extra)
        try:
            yield fs
        finally:
            close_filesystem_session(fs)

    def create_bucket(self, name: str) -> None:
        """Create a bucket (raises if it already exists).

        Parameters
        ----------
        name : str
            Bucket name.

        Notes
        -----
        The ``CreateBucket`` request is recorded in :attr:`requests` like any
        other; call ``requests.reset()`` afterwards if needed.
        """
        with self.closing_filesystem() as fs:  # (its own: no aiohttp session left open)
            params: dict[str, Any] = {"Bucket": name}
            region = getattr(getattr(fs.s3, "meta", None), "region_name", None)
            if region and region not in ("us-east-1", "aws-global"):
                params["CreateBucketConfiguration"] = {"LocationConstraint": region}
            fs.call_s3("create_bucket", **params)


def start_local_s3(latency: float = 0.0) -> LocalS3Server:
    """Start a :class:`LocalS3Server` on a free local port.

    Parameters
    ----------
    latency : float, default 0.0
        Fixed per-request delay in seconds.

    Returns
    -------
    LocalS3Server
        The running server; call :meth:`LocalS3Server.stop` (or use it as a
        context manager) when done.
    """
    return LocalS3Server(latency=latency).start()
