"""zarr's `ObjectStore` (obstore): its identity and its reads with versions.

* Identity: the same canonical namespace as the fsspec path for the same objects
  (`names.canonical`): S3 ``s3[+endpoint]/bucket/prefix`` with the endpoint from the
  store's config or, as obstore itself does, from ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT``;
  GCS ``gs://bucket/prefix``; Azure with its account; HTTP its URL; a local folder
  like zarr's `LocalStore`. Never credentials. An obstore `MemoryStore` (or any store
  without a location) is private.
* Versions: the ETag (or version) of the GET response itself (one request), listings
  through obstore's own ``list``. obstore pages internally: the requests counted are
  the pages S3 sends for that many keys (1,000 per page). A local folder uses the same
  ``stat`` versions as zarr's `LocalStore`, so both kinds agree on one folder.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest

from xarray_zcache.names import Identity, canonical, local_namespace
from xarray_zcache.store_versions import (
    PAGE,
    Fetched,
    LocalVersions,
    SourceVersions,
    _etag,
    pages_sent,
)

if TYPE_CHECKING:
    from zarr.abc.store import Store

__all__ = ["ObjectStoreVersions", "obstore_identity", "obstore_versions"]


def _kind(obs: Any) -> str:
    return type(obs).__name__


def _s3_endpoint(config: dict[str, Any]) -> str:
    return str(
        config.get("endpoint")
        or os.environ.get("AWS_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT")
        or ""
    )


def obstore_identity(obs: Any) -> Identity | None:
    """The identity of obstore store ``obs`` (None: it has no location to name)."""
    kind = _kind(obs)
    prefix = str(getattr(obs, "prefix", None) or "")
    if kind == "LocalStore":
        ns = local_namespace(prefix or "/")
        return None if ns is None else Identity(ns, files=True, freshness="versions")
    if kind == "HTTPStore":
        return Identity(canonical("http", "", str(obs.url)))
    config = dict(getattr(obs, "config", None) or {})
    if kind == "S3Store":
        path = f"{config.get('bucket', '')}/{prefix}"
        return Identity(canonical("s3", _s3_endpoint(config), path), freshness="versions")
    if kind == "GCSStore":
        endpoint = str(config.get("base_url") or config.get("url") or "")
        return Identity(canonical("gs", endpoint, f"{config.get('bucket', '')}/{prefix}"))
    if kind == "AzureStore":
        account = str(config.get("account_name") or "")
        endpoint = str(config.get("endpoint") or "")
        endpoint = (
            f"{endpoint}/{account}" if endpoint else f"https://{account}.blob.core.windows.net"
        )
        path = f"{config.get('container_name', '')}/{prefix}"
        return Identity(canonical("abfs", endpoint, path))
    return None


def _options(byte_range: ByteRequest | None) -> dict[str, Any]:
    if isinstance(byte_range, RangeByteRequest):
        return {"range": (byte_range.start, byte_range.end)}
    if isinstance(byte_range, OffsetByteRequest):
        return {"range": {"offset": byte_range.offset}}
    if isinstance(byte_range, SuffixByteRequest):
        return {"range": {"suffix": byte_range.suffix}}
    return {}


class ObjectStoreVersions(SourceVersions):
    """ETags of a zarr `ObjectStore` over an obstore S3/GCS/Azure store."""

    supported = True

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.obs: Any = store.store  # type: ignore[attr-defined]

    async def get(self, key: str, byte_range: ByteRequest | None) -> Fetched:
        import obstore
        from zarr.storage._obstore import _ALLOWED_EXCEPTIONS

        try:
            result = await obstore.get_async(self.obs, key, options=_options(byte_range))  # type: ignore[arg-type]
            data = await result.bytes_async()
        except _ALLOWED_EXCEPTIONS:
            return None, None
        meta = result.meta
        return bytes(data), _etag(meta.get("e_tag") or meta.get("version"))

    async def listing(
        self, folder: str, recursive: bool, starts: str = ""
    ) -> tuple[dict[str, str], int]:
        import obstore

        top = folder.strip("/")
        base = f"{top}/" if top else ""
        found: dict[str, str] = {}
        seen = 0
        if recursive:
            try:
                async for batch in obstore.list(self.obs, prefix=top or None, chunk_size=PAGE):
                    for meta in batch:
                        seen += 1
                        self._add(found, meta, base, starts)
            except BaseException as exc:  # (the pages it had, and the one that failed)
                pages_sent(exc, seen // PAGE + 1)
                raise
        else:
            result = await obstore.list_with_delimiter_async(self.obs, prefix=top or None)
            seen = len(result["objects"]) + len(result["common_prefixes"])
            for meta in result["objects"]:
                self._add(found, meta, base, starts)
        return found, max(1, math.ceil(seen / PAGE))

    @staticmethod
    def _add(found: dict[str, str], meta: Any, base: str, starts: str) -> None:
        path = str(meta["path"])
        if not path.startswith(base) or not path[len(base) :].startswith(starts):
            return
        version = _etag(meta.get("e_tag") or meta.get("version"))
        if version is not None:
            found[path] = version


class _LocalRoot:
    """What `LocalVersions` needs of a store: its root folder."""

    def __init__(self, store: Store, root: str) -> None:
        self.root = root
        self._store = store

    async def get(self, key: str, prototype: Any, byte_range: ByteRequest | None) -> Any:
        return await self._store.get(key, prototype, byte_range)


def obstore_versions(store: Store) -> SourceVersions:
    """How to read a zarr `ObjectStore` with versions."""
    obs: Any = store.store  # type: ignore[attr-defined]
    kind = _kind(obs)
    if kind == "LocalStore":
        return LocalVersions(_LocalRoot(store, str(obs.prefix or "/")))  # type: ignore[arg-type]
    if kind in ("S3Store", "GCSStore", "AzureStore"):
        return ObjectStoreVersions(store)
    return SourceVersions(store)
