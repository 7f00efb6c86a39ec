"""Reference stores: kerchunk ``reference://`` sets and VirtualiZarr `ManifestStore`.

A reference store holds no chunk bytes of its own: each chunk key names a byte range of
a *target* object (a NetCDF/HDF5 file on S3 or on disk), or carries its bytes inline.
The cache keys a referenced chunk by what it is, not by the reference key: the read goes
to a `CachedStore` of the target's folder (`CachedStore.for_targets`), so

* two reference sets into one file share the cached bytes, and two into different files
  can never collide (their targets' namespaces differ);
* the target's version (ETag, file ``stat``) is recorded, and validated by listing the
  target object alone (one request per target file, `Unit.starts`);
* inline data and metadata documents (in memory already) are served as they are.

The reference store's own namespace is a digest of its references: equal reference
sets get equal dask tokens; nothing is cached under it.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest

from xarray_zcache.names import digest

if TYPE_CHECKING:
    from zarr.abc.store import Store

__all__ = [
    "DIRECT",
    "References",
    "Target",
    "manifest_namespace",
    "reference_namespace",
    "references_of",
]


class _Direct:
    """Ask the reference store itself (its answer is in memory: metadata documents)."""


DIRECT: Final = _Direct()


class Target:
    """Bytes of ``key`` in ``store`` (``byte_range`` of it; None: the whole object)."""

    __slots__ = ("byte_range", "key", "memo", "store")

    def __init__(self, memo: object, store: Store, key: str, byte_range: ByteRequest | None):
        self.memo = memo  # the folder the store opens (one CachedStore per folder)
        self.store = store
        self.key = key
        self.byte_range = byte_range


#: what a reference resolves to: a target, inline bytes, missing, or ask the store
Resolved = Target | bytes | None | _Direct


def _bounds(byte_range: ByteRequest | None) -> tuple[int | None, int | None]:
    if isinstance(byte_range, RangeByteRequest):
        return byte_range.start, byte_range.end
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, None
    if isinstance(byte_range, SuffixByteRequest):
        return -byte_range.suffix, None
    return None, None


def _request(start: int | None, end: int | None) -> ByteRequest | None:
    if start is None and end is None:
        return None
    if end is None:
        assert start is not None
        return OffsetByteRequest(start) if start >= 0 else SuffixByteRequest(-start)
    return RangeByteRequest(start or 0, end)


class References:
    """How one reference store resolves its keys (one subclass per kind)."""

    def resolve(self, key: str, byte_range: ByteRequest | None) -> Resolved:
        raise NotImplementedError

    def target_urls(self) -> Iterator[str]:
        """Every target object's URL (for `CachedStore.revalidate`)."""
        raise NotImplementedError

    def target_of(self, url: str) -> Target | None:
        raise NotImplementedError


# -- kerchunk: fsspec ReferenceFileSystem ---------------------------------------------------------


class KerchunkReferences(References):
    def __init__(self, store: Any) -> None:
        self.fs = store.fs
        self.path = str(store.path).strip("/")

    def _target_store(self, url: str) -> tuple[object, Store, str]:
        from fsspec.core import split_protocol
        from zarr.storage import FsspecStore, LocalStore

        protocol, _ = split_protocol(url)
        fs = self.fs.fss.get(protocol) or self.fs.fss[None]
        plain = getattr(fs, "sync_fs", fs)  # (AsyncFileSystemWrapper around a sync fs)
        path = plain._strip_protocol(url)
        folder, name = posixpath.split(path)
        if type(plain).__name__ == "LocalFileSystem":
            return ("file", folder), LocalStore(folder or "/", read_only=True), name
        memo = (protocol, folder)
        return memo, FsspecStore(fs, path=folder, read_only=True), name

    def resolve(self, key: str, byte_range: ByteRequest | None) -> Resolved:
        path = f"{self.path}/{key}" if self.path else key
        start, end = _bounds(byte_range)
        try:
            part, start1, end1 = self.fs._cat_common(path, start, end)
        except FileNotFoundError:
            return None
        if isinstance(part, bytes):
            return part[start:end]
        if start1 is not None and end1 is not None and end1 <= start1:
            return b""
        memo, store, name = self._target_store(str(part))
        return Target(memo, store, name, _request(start1, end1))

    def target_urls(self) -> Iterator[str]:
        refs = self.fs.references
        if not isinstance(refs, dict):
            return
        seen: set[str] = set()
        for value in refs.values():
            if isinstance(value, list) and value and value[0] and value[0] not in seen:
                seen.add(value[0])
                yield str(value[0])

    def target_of(self, url: str) -> Target | None:
        memo, store, name = self._target_store(url)
        return Target(memo, store, name, None)


def reference_namespace(fs: Any, path: str) -> str:
    refs = fs.references
    if isinstance(refs, dict):
        return "reference:" + digest("kerchunk", path, refs)
    where = getattr(refs, "url", None) or getattr(refs, "root", None) or ""
    return "reference:" + digest("kerchunk-lazy", path, str(where))


# -- VirtualiZarr ManifestStore -------------------------------------------------------------------


def _arrays(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, arr in sorted(group.arrays.items()):
        yield prefix + name, arr
    for name, sub in sorted(group.groups.items()):
        yield from _arrays(sub, f"{prefix}{name}/")


def manifest_namespace(store: Any) -> str | None:
    """A digest of the store's arrays: metadata and every chunk's path, offset, length."""
    try:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(sorted(store._group.metadata.to_dict().items())).encode())
        for path, arr in _arrays(store._group):
            manifest = arr.manifest
            h.update(f"\x00{path}\x00{arr.metadata.to_dict()}".encode())
            h.update("\x01".join(map(str, manifest._paths.ravel().tolist())).encode())
            h.update(manifest._offsets.tobytes())
            h.update(manifest._lengths.tobytes())
            h.update(repr(sorted(manifest._inlined.items())).encode())
        return "manifest:" + h.hexdigest()
    except Exception:  # another VirtualiZarr's internals: the store is then private
        return None


class ManifestReferences(References):
    def __init__(self, store: Any) -> None:
        self.store = store

    def resolve(self, key: str, byte_range: ByteRequest | None) -> Resolved:
        from virtualizarr.manifests.array import ManifestArray
        from virtualizarr.manifests.store import _get_deepest_group_or_array
        from virtualizarr.manifests.utils import parse_manifest_index

        node, suffix = _get_deepest_group_or_array(self.store._group, key)
        if suffix.rpartition("/")[2] in (
            "zarr.json",
            ".zattrs",
            ".zgroup",
            ".zarray",
            ".zmetadata",
        ):
            return DIRECT
        if not isinstance(node, ManifestArray):
            return DIRECT
        manifest = node.manifest
        separator = getattr(node.metadata.chunk_key_encoding, "separator", ".")
        index = parse_manifest_index(key, separator, expand_pattern=True)  # type: ignore[arg-type]
        if index in manifest._inlined:
            start, end = _bounds(byte_range)
            return bytes(manifest._inlined[index])[start:end]
        entry = manifest.get_entry(index)
        if entry is None:
            return None
        offset, length = int(entry["offset"]), int(entry["length"])
        start, end = _bounds(byte_range)
        lo = (
            offset if start is None else (offset + start if start >= 0 else offset + length + start)
        )
        hi = offset + length if end is None else offset + end
        lo, hi = max(lo, offset), min(hi, offset + length)
        if hi <= lo:
            return b""
        target = self.target_of(str(entry["path"]))
        if target is None:
            return DIRECT
        target.byte_range = RangeByteRequest(lo, hi)
        return target

    def target_of(self, url: str) -> Target | None:
        from urllib.parse import urlparse

        from zarr.storage import ObjectStore

        obs, _ = self.store._registry.resolve(url)
        if obs is None or type(obs).__module__.split(".")[0] != "obstore":
            return None
        path = urlparse(url).path
        if getattr(obs, "prefix", None):
            prefix = str(obs.prefix).lstrip("/")
        elif hasattr(obs, "url"):
            prefix = urlparse(obs.url).path.lstrip("/")
        else:
            prefix = ""
        key = path.lstrip("/").removeprefix(prefix).lstrip("/")
        # (the registry holds ``obs`` for the store's lifetime: its id names it meanwhile)
        return Target(("obstore", id(obs)), ObjectStore(obs, read_only=True), key, None)

    def target_urls(self) -> Iterator[str]:
        seen: set[str] = set()
        for _, arr in _arrays(self.store._group):
            for url in arr.manifest._paths.ravel().tolist():
                if url and url not in seen:
                    seen.add(url)
                    yield str(url)


def references_of(store: Store) -> References | None:
    """The references of a reference store (None for other stores)."""
    kind = type(store).__name__
    if kind == "FsspecStore" and type(store.fs).__name__ == "ReferenceFileSystem":  # type: ignore[attr-defined]
        return KerchunkReferences(store)
    if kind == "ManifestStore":
        return ManifestReferences(store)
    return None
