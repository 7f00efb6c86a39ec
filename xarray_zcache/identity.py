"""Identity: which data a store reads, and what may be done with its cache entries.

One owner for the rule every cache key depends on: **two stores share a namespace if
and only if they read the same objects.** A namespace never holds an ``id()``, a repr
with a memory address, or credentials. One adapter per store kind, found by type along
the store's class hierarchy (`adapter`), so that libraries we do not import (obstore,
Icechunk, VirtualiZarr) are recognised without importing them:

============================  ==============================================================
store kind                    namespace
============================  ==============================================================
`LocalStore`                  ``file://`` + real path of the root + ``@device:inode`` of it
`FsspecStore` (s3fs, gcsfs,   protocol + endpoint (from options, environment, profile) +
adlfs, http, local)           account (adlfs) + path
fsspec ``reference://``       the reference set's digest; chunks are cached under their
(kerchunk)                    *targets* (`xarray_zcache.references`)
zarr `ObjectStore` (obstore)  the same canonical form as fsspec's for S3/GCS/Azure/HTTP/
                              local, from the obstore store's own config
Icechunk, read-only session   ``icechunk:`` + repository location + ``@`` + snapshot id
VirtualiZarr `ManifestStore`  the manifests' digest; chunks cached under their targets
anything else, and Icechunk   ``private:`` + a random name: memory only, never on disk or
writable sessions             sent to peers (`xarray_zcache.cache.request.PRIVATE_PREFIX`)
============================  ==============================================================

A private namespace belongs to the store *object*: a copy unpickled elsewhere gets a
new one (`fresh_private`). A user who knows better names the data:
``CachedStore(store, cfg, namespace="...")``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xarray_zcache.cache.request import PRIVATE_PREFIX, is_private
from xarray_zcache.names import (
    PROTOCOLS,
    Identity,
    canonical,
    configured_s3_endpoint,
    digest,
    fresh_private,
    local_namespace,
    strip_userinfo,
)

if TYPE_CHECKING:
    from zarr.abc.store import Store

__all__ = [
    "PRIVATE_PREFIX",
    "Identity",
    "adapter",
    "canonical",
    "digest",
    "fresh_private",
    "identify",
    "is_private",
    "local_namespace",
    "store_namespace",
    "strip_userinfo",
]

logger = logging.getLogger("xarray_zcache.store")


Adapter = Callable[["Store"], Identity]
_ADAPTERS: dict[str, Adapter] = {}


def adapter(*qualnames: str) -> Callable[[Adapter], Adapter]:
    """Register an adapter for the store classes named ``module.QualName``."""

    def register(fn: Adapter) -> Adapter:
        for name in qualnames:
            _ADAPTERS[name] = fn
        return fn

    return register


def identify(store: Store) -> Identity:
    """The `Identity` of ``store`` (by the first adapter along its class hierarchy)."""
    for cls in type(store).__mro__:
        fn = _ADAPTERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            return fn(store)
    return _private(store, log=True)


def store_namespace(store: Store) -> str:
    """The namespace of ``store`` (see `identify`)."""
    return identify(store).namespace


def _private(store: Store, *, log: bool = False, why: str = "") -> Identity:
    kind = type(store).__name__
    if log:
        logger.info(
            "xarray-zcache: %s has no location the cache can name%s: cached in memory only, "
            "for this store object. To cache it on disk and share it, name the data it "
            'holds: CachedStore(store, cfg, namespace="...")',
            kind,
            f" ({why})" if why else "",
        )
    return Identity(fresh_private(kind))


# -- URLs and endpoints --------------------------------------------------------------------------


def _fsspec_endpoint(fs: Any) -> str:
    explicit = (
        getattr(fs, "endpoint_url", None)
        or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
        or ""
    )
    if not explicit and type(fs).__module__.startswith("s3fs"):
        explicit = configured_s3_endpoint(getattr(fs, "profile", None) or None)
    if not explicit and type(fs).__module__.startswith("adlfs"):
        account = getattr(fs, "account_name", None) or ""
        explicit = f"https://{account}.blob.core.windows.net" if account else ""
    return str(explicit)


def fsspec_namespace(fs: Any, path: str) -> str:
    """The namespace of ``path`` on fsspec file system ``fs``."""
    protocol = str(fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol)
    return canonical(PROTOCOLS.get(protocol, protocol), _fsspec_endpoint(fs), path)


# -- adapters --------------------------------------------------------------------------------------


@adapter("zarr.storage._local.LocalStore")
def _local(store: Any) -> Identity:
    root = os.fspath(store.root)
    if not os.path.exists(root) and not store.read_only:
        os.makedirs(root, exist_ok=True)  # as LocalStore._open would: the folder is named now
    ns = local_namespace(root)
    if ns is None:
        return _private(store, why=f"{root} does not exist")
    return Identity(ns, files=True, freshness="versions")


@adapter("zarr.storage._fsspec.FsspecStore")
def _fsspec(store: Any) -> Identity:
    fs = store.fs
    if type(fs).__name__ == "ReferenceFileSystem":
        from xarray_zcache.references import reference_namespace

        return Identity(reference_namespace(fs, store.path), referenced=True, freshness="versions")
    if type(fs).__name__ == "AsyncFileSystemWrapper":
        fs = fs.sync_fs
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if type(fs).__name__ in ("MemoryFileSystem",):
        # one per process, shared by every store of it: named, but never on disk or peers
        return Identity(f"{PRIVATE_PREFIX}fsspec-memory:{os.getpid()}:/{store.path.strip('/')}")
    if "file" in protocols or "local" in protocols:
        ns = local_namespace("/" + store.path.lstrip("/"))
        return Identity(ns or fsspec_namespace(fs, store.path), files=True)
    versioned = "s3" in protocols and hasattr(fs, "_call_s3")
    return Identity(fsspec_namespace(fs, store.path), freshness="versions" if versioned else "ttl")


@adapter("zarr.storage._memory.MemoryStore", "zarr.storage._memory.GpuMemoryStore")
def _memory(store: Any) -> Identity:
    # a MemoryStore has no location: named once, for the object's lifetime (no log: the
    # user holds the data in memory already)
    ns: str | None = getattr(store, "_zcache_namespace", None)
    if ns is None:
        ns = fresh_private("memory")
        store._zcache_namespace = ns
    return Identity(ns)


@adapter("zarr.storage._wrapper.WrapperStore")
def _wrapper(store: Any) -> Identity:
    return identify(store._store)  # the data is the wrapped store's


@adapter("xarray_zcache.store.CachedStore")
def _cached(store: Any) -> Identity:
    return Identity(store.namespace, files=store._files)


@adapter("zarr.storage._obstore.ObjectStore")
def _object_store(store: Any) -> Identity:
    from xarray_zcache.store_obstore import obstore_identity

    found = obstore_identity(store.store)
    return found if found is not None else _private(store.store, log=True)


@adapter("icechunk.store.IcechunkStore")
def _icechunk(store: Any) -> Identity:
    session = store.session
    if not session.read_only:
        # uncommitted writes belong to this session alone
        return Identity(fresh_private("icechunk-writable"))
    location = icechunk_location(session)
    if location is None:
        return _private(store, log=True, why="its repository location is not readable")
    return Identity(f"icechunk:{location}@{session.snapshot_id}", freshness="immutable")


_LOCATION_KEYS = frozenset(
    {
        "object_store_provider_type",
        "type",
        "path",
        "bucket",
        "prefix",
        "endpoint_url",
        "endpoint",
        "url",
        "container",
        "account",
        "account_name",
        "storage_account",
        "root",
    }
)


def icechunk_location(session: Any) -> str | None:
    """The repository's storage location, from the session's own serialized form.

    Icechunk sessions do not expose their repository; `Session.as_bytes` (what they
    pickle as) holds the storage: ``{"type": "S3Storage", "bucket", "prefix", "config":
    [region, endpoint, ...], "credentials": ...}`` or ``{"type": "ObjectStorage",
    "backend": {..., "path"}}``. Only location fields are kept, never credentials.
    None if the format is not understood.
    """
    try:
        import msgpack

        doc = msgpack.unpackb(session._session.as_bytes(), raw=False, strict_map_key=False)
    except Exception:
        return None
    storage = _storage_of(doc)
    if storage is None:
        return None
    location: dict[str, str] = {"type": str(storage["type"])}
    for part in (storage, storage.get("backend")):
        if isinstance(part, dict):
            for k, v in part.items():
                if (
                    str(k) in _LOCATION_KEYS
                    and isinstance(v, str | int)
                    and not isinstance(v, bool)
                ):
                    location[str(k)] = str(v)
    config = storage.get("config")
    if isinstance(config, list | tuple):
        urls = [x for x in config if isinstance(x, str) and "://" in x]
        if urls:
            location["endpoint"] = strip_userinfo(urls[0]).rstrip("/")
    if not set(location) - {"type", "object_store_provider_type"}:
        return None
    if "path" in location:
        location["path"] = os.path.realpath(location["path"])
    return ",".join(f"{k}={location[k]}" for k in sorted(location))


def _storage_of(node: object) -> dict[str, Any] | None:
    """The first ``{"type": "...Storage", ...}`` mapping in ``node``."""
    if isinstance(node, dict):
        kind = node.get("type")
        if isinstance(kind, str) and kind.endswith("Storage"):
            return node
        children: Any = node.values()
    elif isinstance(node, list | tuple):
        children = node
    else:
        return None
    for child in children:
        found = _storage_of(child)
        if found is not None:
            return found
    return None


@adapter("virtualizarr.manifests.store.ManifestStore")
def _manifest(store: Any) -> Identity:
    from xarray_zcache.references import manifest_namespace

    ns = manifest_namespace(store)
    if ns is None:
        return _private(store, log=True, why="its manifests are not readable")
    return Identity(ns, referenced=True, freshness="versions")
