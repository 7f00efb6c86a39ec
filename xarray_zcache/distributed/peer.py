"""The peer tier: a worker's miss asks the key's owning cache host, over Dask's own comms.

Asking (`PeerTier.lookup`, a `SharedTier` of the worker's cache): the owner of the
object's key is chosen by `Membership.owner`; if it is another cache host, one of
its workers is asked through the worker's ``rpc`` (handler ``zcache_get``), with a
timeout, at most `MAX_ASKS` asks in flight per owner, and the answer checked end
to end (key, length, CRC-32C of the bytes, their version and confirmation time).
An answer's version is recorded with the replica, and the replica is served at
most until the owner's confirmation time + the validation interval. Anything
else — owner gone, slow, busy, an error, a bad answer — returns ``None``: the
cache then reads the source itself, and the fallback is counted. Never an error for the user.

Answering (`PeerServer.handle_get`): the owner reads the key through its own cache
(memory, disk, or the source once: single flight there makes N askers cost one
request cluster-wide), on zarr's event loop, with at most `MAX_SERVING` reads in
flight; a read for a peer never asks peers again (no loops between workers whose
views of the membership differ). The owner validates the key's unit first if its
last validation is older than the interval, and answers with the bytes, their
version (recorded before and after the bytes were taken: none if they differ) and
when that version was last confirmed at the source.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import zlib
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any

import google_crc32c  # (a dependency of zarr)
from distributed.core import send_recv
from distributed.protocol.serialize import to_serialize

from xarray_zcache.cache.logs import events
from xarray_zcache.cache.tiers import SharedAnswer
from xarray_zcache.distributed.membership import Membership
from xarray_zcache.keys import parse_entry_key
from xarray_zcache.registry import stores_of

if TYPE_CHECKING:
    from distributed import Worker

    from xarray_zcache.cache.hybrid import HybridCache
    from xarray_zcache.cache.request import Read
    from xarray_zcache.store import CachedStore

__all__ = [
    "CHECKSUMS",
    "FIRST_ASK_TIMEOUT",
    "MAX_ASKS",
    "MAX_SERVING",
    "PeerServer",
    "PeerTier",
    "answer_crc",
]

logger = logging.getLogger("xarray_zcache.distributed")
_events = events("xarray_zcache.distributed")

MAX_ASKS = 32  # asks in flight from one worker to one owner; beyond: read the source
MAX_SERVING = 64  # reads in flight for peers on one owner; beyond: "busy"
FIRST_ASK_TIMEOUT = 10.0  # seconds for an owner's first read of a dataset (client set-up)
#: the checksums of an answer, best first: CRC-32C (hardware, ~10x zlib's CRC-32 on 1 MiB),
#: CRC-32 (what askers and owners that do not name one use)
CHECKSUMS = ("crc32c", "crc32")


def _store_for(cache: HybridCache, namespace: str) -> CachedStore | None:
    for store in stores_of(cache):
        if getattr(store, "namespace", None) == namespace:
            return store  # type: ignore[no-any-return]
    return None


class PeerTier:
    """Ask the owner of a key before the source (see the module docstring)."""

    name = "peer"

    def __init__(self, worker: Worker, cache: HybridCache, host: str, timeout: float) -> None:
        self.worker = worker
        self.cache = cache
        self.host = host
        self.timeout = timeout
        self.membership = Membership()
        self._lock = threading.Lock()
        self._asking: dict[str, int] = {}
        # owners known to hold a store for a namespace (else the store travels along)
        self._told: set[tuple[str, str]] = set()
        self.fallback_reasons: Counter[str] = Counter()  # why asks fell back (diagnostics)
        self.asks_sent = 0  # requests sent to owners (statistics, for tests)
        self._stores: OrderedDict[str, CachedStore] = OrderedDict()

    def update(self, membership: Membership) -> None:
        """Take ``membership`` if it is newer than the one held."""
        if membership.version > self.membership.version:
            self.membership = membership

    def _pick(self, key: str) -> str | None:
        m = self.membership
        owner = m.owner(key)
        if owner is None or owner == self.host:
            return None
        workers = m.workers_of(owner)
        if not workers:
            return None
        return workers[zlib.crc32(key.encode()) % len(workers)]

    def _acquire(self, addr: str) -> bool:
        with self._lock:
            n = self._asking.get(addr, 0)
            if n >= MAX_ASKS:
                return False
            self._asking[addr] = n + 1
            return True

    def _release(self, addr: str) -> None:
        with self._lock:
            n = self._asking.get(addr, 1) - 1
            if n:
                self._asking[addr] = n
            else:
                self._asking.pop(addr, None)

    async def lookup(self, read: Read) -> SharedAnswer | None:
        if read.for_peer or read.prefetch:
            return None
        addr = self._pick(read.object_key)
        if addr is None:
            return None
        stats = self.cache._stats
        if not self._acquire(addr):
            stats.add("peer_fallbacks")  # the owner is busy with our asks: read the source
            self.fallback_reasons["too many asks"] += 1
            _events.debug(
                "peer fallback",
                "xarray-zcache: %r: owner %s is busy with our asks; reading the source",
                read.key,
                addr,
            )
            return None
        _events.debug(
            "peer ask",
            "xarray-zcache: asking %s (owner %s) for %r",
            addr,
            self.membership.owner(read.object_key),
            read.key,
        )
        t0 = time.perf_counter()
        sent = time.time()  # (this clock: the owner's answer is dated from it, `_check`)
        try:
            reply = await self._ask(addr, read)
        except Exception as exc:  # gone, slow, refused: the source answers instead
            logger.debug("xarray-zcache: asking %s for %r failed: %r", addr, read.key, exc)
            reply = {"status": type(exc).__name__}
        finally:
            self._release(addr)
            stats.peer_answer(time.perf_counter() - t0)
        answer = self._check(reply, read, sent)
        if answer is None:
            stats.add("peer_fallbacks")
            status = reply.get("status") if isinstance(reply, dict) else None
            self.fallback_reasons[str(status if status != "ok" else "damaged")] += 1
            _events.debug(
                "peer fallback",
                "xarray-zcache: %r: no answer from %s (%s); reading the source",
                read.key,
                addr,
                status,
            )
        else:
            _events.debug(
                "peer answer",
                "xarray-zcache: %s answered %r (%d bytes, %s)",
                addr,
                read.key,
                len(answer.value),
                "from its cache" if answer.saved else "read from the source",
            )
        return answer

    def _check(self, reply: Any, read: Read, sent: float | None = None) -> SharedAnswer | None:
        """The answer if it is whole and for this key, else ``None`` (a fallback).

        Its version, if any, is recorded with the replica (`_record`): a later
        validation here compares it instead of dropping the replica as unverified.

        Its confirmation time is dated on this worker's clock, not the owner's: the
        owner says how long before answering it confirmed (``age``, measured on its own
        clock), and the confirmation happened no earlier than ``sent`` (this clock, when
        the ask left) - ``age``. Worker clocks that disagree (no NTP, a VM paused) then
        cannot stretch a replica's life past the bound.
        """
        if not isinstance(reply, dict) or reply.get("status") != "ok":
            return None
        data = reply.get("data")
        if not isinstance(data, bytes | bytearray | memoryview) or reply.get("key") != read.key:
            return None
        data = bytes(data)
        version, confirmed = reply.get("version"), reply.get("confirmed")
        age = reply.get("age")
        kind = reply.get("sum", "crc32")
        if (
            not isinstance(version, str | None)
            or not isinstance(confirmed, float | int | None)
            or not isinstance(age, float | int | None)
            or kind not in CHECKSUMS
            or len(data) != reply.get("length")
            or answer_crc(data, version, confirmed, kind, age) != reply.get("crc")
        ):
            logger.warning("xarray-zcache: a peer answered damaged bytes for %r; ignored", read.key)
            return None
        if version is not None:
            self._record(read, version)
        if confirmed is not None and age is not None and sent is not None:
            confirmed = sent - max(0.0, float(age))  # (on this clock: see above)
        return SharedAnswer(
            data, bool(reply.get("saved")), None if confirmed is None else float(confirmed)
        )

    def _record(self, read: Read, version: str) -> None:
        """Record ``version`` as the version of the object ``read`` is part of, as a fill
        from the source does (`Freshness.filled`: older entries of another version go)."""
        store = self._store(read.namespace)
        parsed = parse_entry_key(read.namespace, read.key)
        if store is None or parsed is None or not store._source.supported:
            return
        key, spec = parsed
        unit = store._unit_of(key)[0]
        self.cache.freshness.filled(unit, read.object_key, version, part=spec is not None)

    async def _ask(self, addr: str, read: Read) -> Any:
        loop = self.worker.loop.asyncio_loop  # type: ignore[attr-defined]
        fut = asyncio.run_coroutine_threadsafe(self._send(addr, read), loop)
        # the first ask of a dataset makes the owner set up its client for the source
        # (a session, credentials): allow for that once, then hold the owner to the timeout
        first = (addr, read.namespace) not in self._told
        timeout = max(self.timeout, FIRST_ASK_TIMEOUT) if first else self.timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        finally:
            fut.cancel()

    def _store(self, namespace: str) -> CachedStore | None:
        """The store of ``namespace`` (held here once seen: tasks' stores come and go)."""
        store = self._stores.get(namespace) or _store_for(self.cache, namespace)
        if store is not None and namespace not in self._stores:
            self._stores[namespace] = store
            if len(self._stores) > 256:
                self._stores.popitem(last=False)
        return store

    async def _send(self, addr: str, read: Read) -> Any:
        msg: dict[str, Any] = {"key": read.key, "namespace": read.namespace, "sums": CHECKSUMS}
        if (addr, read.namespace) not in self._told:
            store = self._store(read.namespace)
            if store is not None:
                # its wrapped store and config, never data: serialized by Dask's comms
                msg["store"] = to_serialize(store)  # type: ignore[no-untyped-call]
        # connecting is held to the timeout, even on a first ask: an owner that is gone
        # (a stale membership) costs one timeout, not Dask's retries up to its own
        # connect timeout (30 s)
        pool = self.worker.rpc
        self.asks_sent += 1
        comm = await pool.connect(addr, timeout=self.timeout)
        try:
            reply = await send_recv(comm=comm, op="zcache_get", **msg)
        finally:
            pool.reuse(addr, comm)
        if isinstance(reply, dict) and reply.get("status") == "unknown-store":
            self._told.discard((addr, read.namespace))
            if "store" not in msg and self._store(read.namespace) is not None:
                return await self._send(addr, read)  # once more, with the store
        elif isinstance(reply, dict):
            self._told.add((addr, read.namespace))
        return reply


class PeerServer:
    """Answer other workers' asks from this worker's cache (see the module docstring)."""

    def __init__(self, cache: HybridCache) -> None:
        self.cache = cache
        self.serving = 0
        self.asks = 0  # asks received (statistics, for tests)
        self.hops = 0  # of which read on zarr's loop (not answered from memory at once)
        self._stores: OrderedDict[str, CachedStore] = OrderedDict()  # received from askers

    def _store(self, namespace: str, sent: Any) -> CachedStore | None:
        from xarray_zcache.store import CachedStore

        store = self._stores.get(namespace) or _store_for(self.cache, namespace)
        if store is None and isinstance(sent, CachedStore):  # from a worker of this cluster
            store = sent if sent.namespace == namespace else None
        if store is not None and namespace not in self._stores:
            # held here: a store bound by a task is only weakly known to the cache, and
            # askers that were answered once do not send it again
            self._stores[namespace] = store
            if len(self._stores) > 256:
                self._stores.popitem(last=False)
        return store

    async def handle_get(
        self,
        key: str = "",
        namespace: str = "",
        store: Any = None,
        sums: Any = (),
        **_: Any,
    ) -> dict[str, Any]:
        self.asks += 1
        if self.serving >= MAX_SERVING:
            _events.debug("peer serve", "xarray-zcache: busy: refused a peer's ask for %r", key)
            return {"status": "busy"}
        s = self._store(namespace, store)
        if s is None:
            _events.debug(
                "peer serve", "xarray-zcache: no store for namespace %r of %r", namespace, key
            )
            return {"status": "unknown-store"}
        from zarr.core.sync import _get_loop

        self.serving += 1
        try:
            # in memory, its unit fresh: answered here, on the comm's loop; else the read
            # (gate, disk, source) runs on zarr's loop
            served = s.serve_peer_cached(self.cache, key)
            if served is None:
                self.hops += 1
                fut = asyncio.run_coroutine_threadsafe(s.serve_peer(self.cache, key), _get_loop())
                served = await asyncio.wrap_future(fut)
        except Exception as exc:
            _events.debug("peer serve", "xarray-zcache: reading %r for a peer failed: %r", key, exc)
            return {"status": "error", "error": repr(exc)[:500]}
        finally:
            self.serving -= 1
        data, saved, version, confirmed = served
        _events.debug(
            "peer serve",
            "xarray-zcache: answered a peer's ask for %r: %s",
            key,
            "missing"
            if data is None
            else f"{len(data)} bytes{'' if saved else ' from the source'}",
        )
        if data is None:
            return {"status": "missing"}
        kind = next((k for k in CHECKSUMS if k in sums), "crc32")  # an old asker: CRC-32
        # how long ago it was confirmed, on this clock alone: the asker dates it on its own
        age = None if confirmed is None else max(0.0, time.time() - confirmed)
        return {
            "status": "ok",
            "key": key,
            # a frame of its own, not packed into (and copied through) the msgpack header
            "data": to_serialize(data),  # type: ignore[no-untyped-call]
            "length": len(data),
            "crc": answer_crc(data, version, confirmed, kind, age),
            "sum": kind,
            "saved": saved,
            "version": version,
            "confirmed": confirmed,
            "age": age,
        }


def answer_crc(
    data: bytes,
    version: str | None,
    confirmed: float | None,
    kind: str = "crc32",
    age: float | None = None,
) -> int:
    """The checksum of an answer (``kind``: one of `CHECKSUMS`): its bytes, their version,
    its confirmation time and that time's age (if the owner sent one)."""
    meta = f"{version}\x00{confirmed!r}".encode()
    if age is not None:
        meta += f"\x00{age!r}".encode()
    if kind == "crc32c":
        return int(google_crc32c.extend(google_crc32c.value(data), meta))
    return zlib.crc32(meta, zlib.crc32(data))
