"""Faults from S3 (through :class:`~.proxy.FaultProxy`) while a cached store reads and writes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import random
import time
from collections.abc import Iterator
from typing import Any, Literal

import s3fs
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from xarray_zcache.backend import open_store
from xarray_zcache.store import CachedStore
from xarray_zcache.testing.faults.proxy import FAULT_KINDS, Fault, FaultKind, FaultProxy
from xarray_zcache.testing.faults.report import ScenarioResult, timed
from xarray_zcache.testing.faults.stores import config, unique
from xarray_zcache.testing.faults.values import buf, make_value
from xarray_zcache.testing.s3server import LocalS3Server

__all__ = [
    "S3Case",
    "cached_entries",
    "few_s3fs_retries",
    "run_s3_faults",
    "s3_cases_all",
    "s3_cases_random",
    "s3_client_options",
]


@dataclasses.dataclass(frozen=True)
class S3Case:
    """One fault from S3: ``kind`` on ``op`` requests, ``times`` times (None: until cleared)."""

    kind: FaultKind
    op: Literal["get", "get-meta", "get-range", "set"] = "get"
    times: int | None = None
    after: bool = False  # the request reaches S3 (a write is applied), the answer is faulty


def s3_client_options(server: LocalS3Server, endpoint_url: str) -> dict[str, Any]:
    """s3fs options with short timeouts and few retries (faults end quickly)."""
    return server.storage_options(
        endpoint_url=endpoint_url,
        config_kwargs={
            "s3": {"addressing_style": "path"},
            "read_timeout": 0.3,  # a stall ends the request quickly
            # no fault acts on connecting: a short bound here only made the read after a
            # stall fail on a loaded machine (ConnectTimeoutError, the proxy slow to accept)
            "connect_timeout": 5,
            "retries": {"total_max_attempts": 1},  # s3fs retries (SlowDown, timeouts...)
        },
    )


@contextlib.contextmanager
def few_s3fs_retries(n: int = 2) -> Iterator[None]:
    """s3fs retries timeouts and truncated bodies 5 times by default: make it ``n``."""
    saved = s3fs.S3FileSystem.retries
    s3fs.S3FileSystem.retries = n
    try:
        yield
    finally:
        s3fs.S3FileSystem.retries = saved


def cached_entries(store: CachedStore, key: str) -> list[str]:
    """Where anything about ``key`` is held by the store's cache: memory, disk (after a flush
    of the pending disk writes), a negative entry. Empty if nothing."""
    cache = store.cache
    ck = f"{store.namespace}/{key}"

    def mine(k: str) -> bool:
        return k == ck or k.startswith(ck + "\0")

    in_memory = cache.memory_tier.keys()  # a snapshot
    found = [f"memory:{k!r}" for k in in_memory if mine(k)]
    if cache.known_missing(ck):
        found.append("negative entry")
    disk = cache.disk_tier
    if disk is not None:
        cache.flush()  # values still queued for the disk tier land there
        on_disk = disk.keys()  # a snapshot
        found += [f"disk:{k!r}" for k in on_disk if mine(k)]
    return found


def run_s3_faults(
    server: LocalS3Server,
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
    with server.closing_filesystem() as direct:  # (its session closed after)
        return _run_s3_faults(server, direct, cases, workdir, seed)


def _run_s3_faults(
    server: LocalS3Server,
    direct: s3fs.S3FileSystem,
    cases: list[S3Case],
    workdir: str | os.PathLike[str],
    seed: int,
) -> ScenarioResult:
    """`run_s3_faults` (``direct``: the server's filesystem, without the proxy)."""
    proto = default_buffer_prototype()
    result = ScenarioResult("faults from S3 (500, 503, reset, stall, truncate)")
    rng = random.Random(seed)
    bucket = f"faults-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    server.create_bucket(bucket)
    keys = ["zarr.json", "v/zarr.json", *[f"v/c/{i}" for i in range(len(cases) + 4)]]
    for key in keys:
        direct.pipe_file(f"{bucket}/ds/{key}", make_value(key, 1, 600))
    with timed(result), FaultProxy(server.endpoint_url) as proxy, few_s3fs_retries(2):
        opts = s3_client_options(server, proxy.url)
        cfg = config(pathlib.Path(workdir) / "cache", unique("s3"), memory="8MB")
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
                held = cached_entries(store, key)
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
