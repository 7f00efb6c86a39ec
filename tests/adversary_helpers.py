"""Helpers of the adversarial read-path tests: a gated store, an S3 server in a child process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

__all__ = ["GatedStore", "S3ServerProcess"]


class GatedStore(WrapperStore[Store]):
    """A store whose next ``arm()``-ed `get` reads the wrapped store, then waits for ``release``.

    The value is read *before* waiting, so the held `get` answers with the state the
    store had when the request was served (like an S3 GET whose response is slow to
    arrive). ``served`` is set once that read happened. Other gets pass straight through.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self._armed = 0
        self.served = asyncio.Event()
        self.release = asyncio.Event()
        self.gets: list[str] = []

    def arm(self) -> None:
        """Hold the next `get` (of any key) until ``release`` is set."""
        self._armed += 1

    async def get(
        self,
        key: str,
        prototype: BufferPrototype,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        self.gets.append(key)
        value = await self._store.get(key, prototype, byte_range)
        if self._armed:
            self._armed -= 1
            self.served.set()
            await self.release.wait()
        return value


class S3ServerProcess:
    """A `LocalS3Server` in a child process: its own moto state (in-process servers share it)."""

    _CODE = (
        "import sys\n"
        "from xarray_zcache.testing.s3server import LocalS3Server\n"
        "s = LocalS3Server().start()\n"
        "print(s.endpoint_url, flush=True)\n"
        "sys.stdin.read()\n"
        "s.stop()\n"
    )

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", self._CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.stop()
            raise RuntimeError(f"S3 server child process did not start (said {line!r})")
        self.endpoint_url = line

    def options(self, *, with_endpoint: bool = True) -> dict[str, Any]:
        """s3fs options for this server (without ``endpoint_url`` if ``with_endpoint=False``)."""
        opts: dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            "max_concurrency": 1,
            "skip_instance_cache": True,
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }
        if with_endpoint:
            opts["endpoint_url"] = self.endpoint_url
        return opts

    def stop(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
