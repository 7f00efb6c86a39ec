"""Which client reads ``s3://``, ``gs://`` and ``az://`` URLs: obstore or fsspec (s3fs).

``zcache.client`` (`CacheConfig.client`) chooses. With ``"obstore"``, a plain URL is
read through zarr's `zarr.storage.ObjectStore` over an obstore store built from the
fsspec-style ``storage_options`` (`obstore_store`), mapped exactly:

==========================================  =============================================
s3fs option                                 obstore `S3Store`
==========================================  =============================================
``anon=True``                               ``skip_signature=True`` (keys ignored, as s3fs)
``key`` / ``username``                      ``access_key_id``
``secret`` / ``password``                   ``secret_access_key``
``token``                                   ``session_token``
``endpoint_url``,                           ``endpoint``; an ``http://`` endpoint also sets
``client_kwargs.endpoint_url``              the client option ``allow_http=True``
``region``, ``client_kwargs.region_name``   ``region``
``config_kwargs.s3.addressing_style``       ``"path"``/``"auto"``: path style (obstore's
                                            default); ``"virtual"`` without an endpoint:
                                            ``virtual_hosted_style_request=True``
``use_ssl=False`` with an ``http://``       ``allow_http=True``
endpoint
``requester_pays=True``                     ``request_payer=True``
``config_kwargs.user_agent_extra``          the client option ``user_agent``
                                            (``xarray-zcache <extra>``)
==========================================  =============================================

s3fs's own tuning (``max_concurrency``, ``skip_instance_cache``, listings caches, block
sizes, ``asynchronous``, ``config_kwargs.max_pool_connections``, ...) does not change
what is read: it is ignored. Anything else, and the few cases where obstore would not
reach the same objects as s3fs (credentials or a region only an AWS profile holds, no
region for AWS itself: botocore follows the bucket's region, obstore does not; a
virtual-hosted custom endpoint; an endpoint with ``user:password@``), falls back to
s3fs with one INFO line naming the option (never its value).

The endpoint s3fs would use without one given (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, the profile's ``endpoint_url``) is passed to obstore explicitly, so
both clients read the same service and share one namespace (`names.canonical`).
Chained URLs (``simplecache::s3://...``) and ``reference://`` stay on fsspec.

Building an obstore store costs 10-20 ms (its HTTP client, TLS setup): `obstore_store`
keeps the last `MAX_BUILT_STORES` built (`built_store`), keyed by the process, the
service, bucket and prefix, the mapped options and the obstore settings of the
environment, so that opening the same dataset again reuses its store (and its
connections). Credentials enter the key as a digest only, and no key is logged. A
child process never uses a store its parent built (the key holds the process id, and
the cache empties in a forked child). The zarr `ObjectStore` around it is new on each
open; pickled (Dask sends stores to its workers), a store is rebuilt on the other side
as before.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from zarr.abc.store import Store

__all__ = [
    "MAX_BUILT_STORES",
    "SCHEMES",
    "Unmapped",
    "available",
    "built_store",
    "clear_built_stores",
    "map_s3_options",
    "obstore_store",
]

logger = logging.getLogger("xarray_zcache.backend")

#: s3fs/fsspec options that tune s3fs itself and do not change what is read
_S3FS_TUNING = frozenset(
    {
        "max_concurrency",
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "asynchronous",
        "loop",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "fixed_upload_size",
        "local_expiry_check",
        "cache_regions",
    }
)
_CONFIG_KWARGS_TUNING = frozenset({"max_pool_connections"})
#: the s3fs options mapped (besides client_kwargs and config_kwargs)
_S3_OPTIONS = frozenset(
    {
        "anon",
        "key",
        "username",
        "secret",
        "password",
        "token",
        "endpoint_url",
        "use_ssl",
        "region",
        "requester_pays",
    }
)

#: URL scheme -> obstore service
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az"}


class Unmapped(Exception):
    """An option obstore cannot take as s3fs does: ``option`` names it (never its value)."""

    def __init__(self, option: str, why: str = "") -> None:
        super().__init__(option)
        self.option = option
        self.why = why


def available() -> bool:
    """obstore is installed."""
    return importlib.util.find_spec("obstore") is not None


def _has_userinfo(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.username or parts.password)


def _profile_may_hold_credentials() -> bool:
    """botocore would find credentials in a profile (obstore reads no profile files)."""
    if os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE"):
        return True
    home = os.path.expanduser("~")
    files = (
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials"),
        os.environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config"),
    )
    return any(os.path.isfile(f) for f in files)


def map_s3_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """obstore ``(config, client_options)`` of `S3Store` for s3fs ``options``.

    Raises `Unmapped` naming the first option that cannot be mapped exactly.
    """
    opts = dict(options)
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    config_kwargs = dict(opts.pop("config_kwargs", None) or {})
    s3_config = _check_names(opts, client_kwargs, config_kwargs)
    anon = opts.pop("anon", False)
    if not isinstance(anon, bool):
        raise Unmapped("anon", "not a bool")
    key = opts.pop("key", None) or opts.pop("username", None)
    secret = opts.pop("secret", None) or opts.pop("password", None)
    token = opts.pop("token", None)
    if anon:
        config["skip_signature"] = True
    else:
        if key:
            config["access_key_id"] = str(key)
        if secret:
            config["secret_access_key"] = str(secret)
        if token:
            config["session_token"] = str(token)
        if (
            key
            and not token
            and (os.environ.get("AWS_SESSION_TOKEN") or os.environ.get("AWS_TOKEN"))
        ):
            # obstore would add the environment's token to the given keys, botocore not
            raise Unmapped("key", "given without token while AWS_SESSION_TOKEN is set")
        if not key and not os.environ.get("AWS_ACCESS_KEY_ID") and _profile_may_hold_credentials():
            raise Unmapped("credentials", "only an AWS profile holds them (obstore reads none)")
    # endpoint: s3fs lets client_kwargs win over endpoint_url
    top = opts.pop("endpoint_url", None)
    inner = client_kwargs.pop("endpoint_url", None)
    if top and inner and top != inner:
        raise Unmapped("client_kwargs.endpoint_url", "differs from endpoint_url")
    endpoint = str(inner or top or "")
    if not endpoint:
        from xarray_zcache.names import configured_s3_endpoint

        endpoint = configured_s3_endpoint(None)  # where s3fs (botocore) would go
    if endpoint:
        if _has_userinfo(endpoint):
            raise Unmapped("endpoint_url", "holds user:password@")
        scheme = urlsplit(endpoint).scheme
        if scheme not in ("http", "https"):
            raise Unmapped("endpoint_url", "not an http(s) URL")
        config["endpoint"] = endpoint.rstrip("/")
        if scheme == "http":
            client["allow_http"] = True
    use_ssl = opts.pop("use_ssl", True)
    if use_ssl is False and not (endpoint and urlsplit(endpoint).scheme == "http"):
        raise Unmapped("use_ssl", "plain HTTP without an http:// endpoint")
    region = client_kwargs.pop("region_name", None) or opts.pop("region", None)
    opts.pop("region", None)
    if region:
        config["region"] = str(region)
    elif not endpoint and not (
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    ):
        # botocore follows the bucket's region; obstore would send it to us-east-1
        raise Unmapped("region", "none given for AWS (s3fs finds the bucket's region)")
    if opts.pop("requester_pays", False):
        config["request_payer"] = True
    extra = config_kwargs.get("user_agent_extra")
    if extra:  # a header only: what is read does not change
        client["user_agent"] = f"xarray-zcache {extra}"
    style = s3_config.get("addressing_style", "auto")
    if style == "virtual":
        if endpoint:
            raise Unmapped("config_kwargs.s3.addressing_style", "virtual with a custom endpoint")
        config["virtual_hosted_style_request"] = True
    elif style not in ("path", "auto"):
        raise Unmapped("config_kwargs.s3.addressing_style", f"unknown style {style!r}")
    return config, client


def _check_names(
    opts: Mapping[str, Any], client_kwargs: Mapping[str, Any], config_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Raise `Unmapped` for the first option with no obstore equivalent; the ``s3`` part
    of ``config_kwargs``."""
    for name in opts:
        if name not in _S3_OPTIONS and name not in _S3FS_TUNING:
            raise Unmapped(name)
    for name in client_kwargs:
        if name not in ("endpoint_url", "region_name"):
            raise Unmapped(f"client_kwargs.{name}")
    for name in config_kwargs:
        if name not in ("s3", "user_agent_extra") and name not in _CONFIG_KWARGS_TUNING:
            raise Unmapped(f"config_kwargs.{name}")
    s3_config = dict(config_kwargs.get("s3") or {})
    for name in s3_config:
        if name != "addressing_style":
            raise Unmapped(f"config_kwargs.s3.{name}")
    return s3_config


def _map_gs_options(options: Mapping[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    config: dict[str, Any] = {}
    token = opts.pop("token", None)
    if token == "anon":
        config["skip_signature"] = True
    elif token is not None:
        raise Unmapped("token")
    for name in opts:
        raise Unmapped(name)
    return config


def _map_az_options(options: Mapping[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    config: dict[str, Any] = {}
    account = opts.pop("account_name", None)
    if not account:
        # adlfs and obstore both read the environment, but the namespace needs it named
        raise Unmapped("account_name", "not given")
    config["account_name"] = str(account)
    if opts.pop("anon", False):
        config["skip_signature"] = True
    account_key = opts.pop("account_key", None)
    if account_key:
        config["account_key"] = str(account_key)
    for name in opts:
        raise Unmapped(name)
    return config


def obstore_store(
    url: str, storage_options: Mapping[str, Any] | None, read_only: bool
) -> Store | None:
    """zarr `ObjectStore` reading ``url`` as fsspec with ``storage_options`` would, or
    ``None`` (fsspec must read it): not an ``s3://``/``gs://``/``az://`` URL, or an
    option obstore cannot take exactly (one INFO line names it)."""
    scheme, sep, rest = url.partition("://")
    service = SCHEMES.get(scheme.lower()) if sep else None
    if service is None or "::" in url:
        return None
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        return None
    try:
        if service == "s3":
            config, client = map_s3_options(storage_options or {})
        elif service == "gs":
            config, client = _map_gs_options(storage_options or {}), {}
        else:
            config, client = _map_az_options(storage_options or {}), {}
    except Unmapped as exc:
        logger.info(
            "xarray-zcache: storage option %r cannot be given to obstore as s3fs takes it%s; "
            "reading %s:// through fsspec",
            exc.option,
            f" ({exc.why})" if exc.why else "",
            scheme,
        )
        return None
    from zarr.storage import ObjectStore

    def build() -> Any:
        from obstore.store import AzureStore, GCSStore, S3Store

        if service == "s3":
            opts: Any = client or None
            return S3Store(bucket, prefix=prefix or None, config=config, client_options=opts)  # type: ignore[arg-type]
        if service == "gs":
            return GCSStore(bucket, prefix=prefix or None, config=config)  # type: ignore[arg-type]
        return AzureStore(bucket, prefix=prefix or None, config=config)  # type: ignore[arg-type]

    obs = built_store((service, bucket, prefix), config, client, build)
    return ObjectStore(obs, read_only=read_only)


# -- built stores, reused ----------------------------------------------------------------------

#: how many built obstore stores `built_store` keeps (least recently used dropped first)
MAX_BUILT_STORES = 32
#: the options that are credentials: in a key by their digest only
_SECRETS = frozenset({"access_key_id", "secret_access_key", "session_token", "account_key"})
#: the environment variables obstore's stores read their settings from
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "OBJECT_STORE_")

_built_lock = threading.Lock()
_built: OrderedDict[tuple[Any, ...], Any] = OrderedDict()


def _digest(items: Mapping[str, Any]) -> str:
    text = json.dumps(sorted((str(k), str(v)) for k, v in items.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _store_key(
    where: tuple[str, str, str], config: Mapping[str, Any], client: Mapping[str, Any]
) -> tuple[Any, ...]:
    """The key of a built store: no credential in it, only their digest."""
    plain = {k: v for k, v in config.items() if k not in _SECRETS}
    secrets = {k: v for k, v in config.items() if k in _SECRETS}
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
    return (
        os.getpid(),
        *where,
        json.dumps(sorted((str(k), str(v)) for k, v in plain.items())),
        json.dumps(sorted((str(k), str(v)) for k, v in client.items())),
        _digest(secrets) if secrets else "",
        _digest(env) if env else "",
    )


def built_store(
    where: tuple[str, str, str],
    config: Mapping[str, Any],
    client: Mapping[str, Any],
    build: Callable[[], Any],
) -> Any:
    """The obstore store ``build()`` makes for ``where`` (service, bucket, prefix) with
    ``config`` and ``client`` options, built once and reused while it is among the
    last `MAX_BUILT_STORES` used in this process. Thread-safe: two threads asking at
    once may both build, and both get the one kept."""
    key = _store_key(where, config, client)
    with _built_lock:
        obs = _built.get(key)
        if obs is not None:
            _built.move_to_end(key)
            return obs
    obs = build()  # outside the lock: 10-20 ms
    with _built_lock:
        kept = _built.setdefault(key, obs)
        _built.move_to_end(key)
        while len(_built) > MAX_BUILT_STORES:
            _built.popitem(last=False)
    return kept


def clear_built_stores() -> None:
    """Forget the stores `built_store` kept (the ones in use stay usable)."""
    with _built_lock:
        _built.clear()


def _after_fork_in_child() -> None:
    # the parent's stores (and their connection pools) are not the child's; a lock
    # another thread held at the fork would never be released in the child
    global _built_lock, _built
    _built_lock = threading.Lock()
    _built = OrderedDict()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
