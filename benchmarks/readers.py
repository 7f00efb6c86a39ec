"""The readers compared: how each one opens the same dataset.

A reader is described by a JSON-able *spec* so that a child process (the "after a
restart" column) can rebuild it; `opener(spec)` returns a function opening the
dataset. Readers holding state across opens (zarr's `CacheStore`, whose
bookkeeping lives in the store object) keep it in the opener's closure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from common import quiet

CACHE_SIZE = 256 << 20  # every cache is big enough to hold the whole dataset


@dataclasses.dataclass
class Reader:
    key: str
    label: str
    spec: dict[str, Any]
    restartable: bool = False  # has a persistent tier: measured again in a fresh process
    bound: bool = False  # an upper bound (data already local): no S3 requests at all
    reopen: bool = True  # measure the re-opens (skipped for pass-through readers)
    open: Callable[[], Any] | None = dataclasses.field(default=None, repr=False)


def opener(spec: dict[str, Any]) -> Callable[[], Any]:
    """A function opening the dataset as ``spec`` says (lazily, one dask chunk per zarr chunk)."""
    import xarray as xr

    kind = spec["type"]
    if kind == "zarr":

        def open_() -> Any:
            return xr.open_dataset(
                spec["url"], engine="zarr", chunks={}, storage_options=spec["so"]
            )

        return open_
    if kind == "fsspec_cache":
        proto = spec["protocol"]
        options = {"s3": spec["so"], proto: {"cache_storage": spec["cache_dir"]}}

        def open_() -> Any:
            return xr.open_dataset(
                f"{proto}::{spec['url']}", engine="zarr", chunks={}, storage_options=options
            )

        return open_
    if kind == "cachestore":
        from zarr.experimental.cache_store import CacheStore
        from zarr.storage import FsspecStore, LocalStore, MemoryStore

        source = FsspecStore.from_url(spec["url"], storage_options=spec["so"], read_only=True)
        cache = MemoryStore() if spec["cache"] == "memory" else LocalStore(spec["cache_dir"])
        store = CacheStore(source, cache_store=cache, max_size=spec.get("max_size", CACHE_SIZE))

        def open_() -> Any:
            return xr.open_dataset(store, engine="zarr", chunks={})

        open_.store = store  # type: ignore[attr-defined]
        return open_
    if kind == "zcache":
        from xarray_zcache import CacheConfig

        config = CacheConfig.from_dict(spec["config"])

        def open_() -> Any:
            return xr.open_dataset(
                spec["url"],
                engine="zcache",
                chunks={},
                storage_options=spec["so"],
                cache_config=config,
            )

        open_.config = config  # type: ignore[attr-defined]
        return open_
    if kind == "localstore":
        from zarr.storage import LocalStore

        def open_() -> Any:
            return xr.open_dataset(
                LocalStore(spec["path"], read_only=True), engine="zarr", chunks={}
            )

        return open_
    if kind == "memorystore":
        store = spec["store"]  # not JSON-able: in-process only

        def open_() -> Any:
            return xr.open_dataset(store, engine="zarr", chunks={})

        return open_
    raise ValueError(f"unknown reader type {kind!r}")


def zcache_config(name: str, disk_dir: str | None, **changes: Any) -> dict[str, Any]:
    from xarray_zcache import CacheConfig

    cfg = CacheConfig().with_name(name).with_memory_size(CACHE_SIZE)
    cfg = cfg.with_disk_cache(disk_dir, "4GiB") if disk_dir else cfg.without_disk_cache()
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
    return cfg.to_dict()


def copy_to_local(fs: Any, prefix: str, path: str) -> None:
    """Copy every object under ``prefix`` (bucket/path) into the folder ``path``."""
    import os

    for obj in fs.find(prefix):
        rel = obj[len(prefix) :].lstrip("/")
        dest = os.path.join(path, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(fs.cat_file(obj))


def memory_store_from(path: str) -> Any:
    """A zarr `MemoryStore` holding the objects of the local copy at ``path``."""
    import os

    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    proto = default_buffer_prototype()
    d: dict[str, Any] = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            key = os.path.relpath(full, path).replace(os.sep, "/")
            with open(full, "rb") as f:
                d[key] = proto.buffer.from_bytes(f.read())
    return MemoryStore(store_dict=d)


def build_readers(
    s: Any, server: Any, workdir: str, *, include_fsspec_extra: bool = True
) -> list[Reader]:
    """The rows of the main table, in order."""
    import os

    url = s.url()
    so_default = server.default_storage_options
    so_mc1 = server.storage_options
    d = lambda name: os.path.join(workdir, name)  # noqa: E731
    readers = [
        Reader(
            "nocache_default",
            'engine="zarr" over s3fs, no cache',
            {"type": "zarr", "url": url, "so": so_default("nocache_default")},
        ),
        Reader(
            "nocache_mc1",
            "same, s3fs max_concurrency=1",
            {"type": "zarr", "url": url, "so": so_mc1("nocache_mc1")},
        ),
        Reader(
            "simplecache",
            "fsspec simplecache::s3://",
            {
                "type": "fsspec_cache",
                "protocol": "simplecache",
                "url": url,
                "so": so_default("simplecache"),
                "cache_dir": d("simplecache"),
            },
            restartable=True,
        ),
    ]
    if include_fsspec_extra:
        for proto in ("filecache", "blockcache"):
            readers.append(
                Reader(
                    proto,
                    f"fsspec {proto}::s3://",
                    {
                        "type": "fsspec_cache",
                        "protocol": proto,
                        "url": url,
                        "so": so_default(proto),
                        "cache_dir": d(proto),
                    },
                    reopen=False,  # never hits with zarr 3: re-opens as without a cache
                )
            )
    readers += [
        Reader(
            "cachestore_mem",
            "zarr CacheStore (MemoryStore cache)",
            {
                "type": "cachestore",
                "cache": "memory",
                "url": url,
                "so": so_default("cachestore_mem"),
            },
        ),
        Reader(
            "cachestore_local",
            "zarr CacheStore (LocalStore cache)",
            {
                "type": "cachestore",
                "cache": "local",
                "url": url,
                "so": so_default("cachestore_local"),
                "cache_dir": d("cachestore"),
            },
            restartable=True,
        ),
        Reader(
            "zcache_mem",
            "xarray-zcache, memory only",
            {
                "type": "zcache",
                "url": url,
                "so": so_default(),  # no user_agent_extra tag: obstore would fall back to s3fs
                "config": zcache_config("bench-mem", None),
            },
        ),
        Reader(
            "zcache_disk",
            "xarray-zcache, memory + disk",
            {
                "type": "zcache",
                "url": url,
                "so": so_default(),
                "config": zcache_config("bench-disk", d("zcache")),
            },
            restartable=True,
        ),
        Reader(
            "memorystore",
            "zarr MemoryStore (upper bound)",
            {"type": "memorystore"},
            bound=True,
        ),
        Reader(
            "localstore",
            "zarr LocalStore (upper bound)",
            {"type": "localstore", "path": d("local-copy")},
            restartable=True,
            bound=True,
        ),
    ]
    return readers


def open_quietly(open_: Callable[[], Any]) -> Any:
    with quiet():
        return open_()
