"""Names of data: the `Identity` of a store and the parts namespaces are built from
(canonical URLs of services, local folders, digests). Shared by `xarray_zcache.identity`
(which store kind holds which data) and the modules of store kinds (obstore, references),
which import these and nothing of `identity`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from urllib.parse import urlsplit

from xarray_zcache.cache.request import PRIVATE_PREFIX, is_private

__all__ = [
    "PROTOCOLS",
    "Identity",
    "canonical",
    "configured_s3_endpoint",
    "digest",
    "fresh_private",
    "local_namespace",
    "strip_userinfo",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """What a store reads, as the cache sees it."""

    #: the cache-key prefix of the store's objects
    namespace: str
    #: keys name files of a file system (``a/../b`` is ``b``: `keys.file_key`)
    files: bool = False
    #: how its entries stay fresh, for people: "versions", "immutable", "ttl"
    freshness: str = "ttl"
    #: its chunks are read through other stores (kerchunk, VirtualiZarr): see references.py
    referenced: bool = False

    @property
    def private(self) -> bool:
        """Memory only, for this store object: never on disk, never to or from peers."""
        return is_private(self.namespace)


def fresh_private(kind: str) -> str:
    """A new private namespace (memory only, this store object only)."""
    return f"{PRIVATE_PREFIX}{kind}:{uuid.uuid4().hex}"


def digest(*parts: object) -> str:
    """A short stable digest of JSON-able ``parts`` (namespaces of reference sets)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# -- URLs and endpoints ---------------------------------------------------------------------------


def strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return parts._replace(netloc=host).geturl()
    return url


def configured_s3_endpoint(profile: str | None) -> str:
    """The endpoint botocore would use when none is given in a store's options.

    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and the profile's ``endpoint_url``
    (also under ``services``) redirect S3 clients to another service: two such
    services must never share cache entries, so their endpoint is part of the
    namespace. Returns ``""`` for AWS itself (bucket names are global there).
    """
    try:
        import botocore.session
        from botocore.configprovider import ConfiguredEndpointProvider
    except ImportError:  # pragma: no cover - botocore moved its private provider
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    try:
        session = botocore.session.Session(profile=profile)
        if session.get_config_variable("ignore_configured_endpoint_urls"):
            return ""
        provider = ConfiguredEndpointProvider(
            full_config=session.full_config,
            scoped_config=session.get_scoped_config(),
            client_name="s3",
        )
        return str(provider.provide() or "")
    except Exception as exc:  # a broken profile: refuse to guess
        raise ValueError(
            f"cannot tell which S3 endpoint profile {profile!r} points at ({exc}); pass "
            "storage_options={'endpoint_url': ...} or a namespace= to CachedStore"
        ) from exc


def canonical(protocol: str, endpoint: str, path: str) -> str:
    """The namespace of objects under ``path`` at ``endpoint`` ("" for the provider's own).

    The endpoint comes before the path: a store opened at a sub-path of another gets
    the same cache keys for the same objects. fsspec and obstore stores over the same
    objects get the same namespace (the same ETags, too).
    """
    endpoint = strip_userinfo(endpoint).rstrip("/")
    path = path.strip("/")
    return f"{protocol}+{endpoint}/{path}" if endpoint else f"{protocol}://{path}"


#: fsspec / obstore protocol names → one name per service
PROTOCOLS = {"s3a": "s3", "gcs": "gs", "az": "abfs", "abfss": "abfs", "adl": "abfs"}


def local_namespace(root: str | os.PathLike[str]) -> str | None:
    """``file://`` + real path + ``@device:inode`` of the folder (None if it does not exist):
    a folder replaced by another at the same path is other data."""
    real = os.path.realpath(os.fspath(root))
    try:
        st = os.stat(real)
    except OSError:
        return None
    return f"file://{real}@{st.st_dev}:{st.st_ino}"
