"""The ``zcache`` xarray backend: xarray's zarr backend reading through `CachedStore`."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from xarray.backends import BackendEntrypoint
from xarray.backends.zarr import ZarrBackendEntrypoint
from zarr.abc.store import Store

from xarray_zcache.backend_array import _retrying
from xarray_zcache.config import CacheConfig
from xarray_zcache.open_ahead import read_index_coordinates
from xarray_zcache.sessions import close_store_session
from xarray_zcache.sessions import track as track_session
from xarray_zcache.store import RECHECK_MISSING, CachedStore

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["PREFIX", "ZCacheBackendEntrypoint", "open_store", "strip_prefix"]

logger = logging.getLogger("xarray_zcache.backend")

PREFIX = "zcache::"

#: s3fs protocols whose options get the read tuning of `_tune_s3`
_S3_PROTOCOLS = ("s3", "s3a")


def strip_prefix(url: str) -> str:
    """``url`` without the ``zcache::`` prefix (not an fsspec protocol: fsspec must not see it)."""
    return url[len(PREFIX) :] if url.startswith(PREFIX) else url


def _tune_s3(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """s3fs options with the read tuning of the cache (the user's own values win)."""
    opts = dict(options or {})
    # s3fs sends a HEAD before each whole-object GET unless max_concurrency=1:
    # one request per chunk instead of two
    opts.setdefault("max_concurrency", 1)
    # botocore's pool (10 by default) would cap reads in flight, read-ahead included
    config_kwargs = dict(opts.get("config_kwargs") or {})
    config_kwargs.setdefault("max_pool_connections", 64)
    opts["config_kwargs"] = config_kwargs
    return opts


def _reference_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options of a kerchunk ``reference://`` URL: zarr opens it asynchronously, and
    fsspec wants the targets' file system asynchronous too (tuned like any S3 read)."""
    opts = dict(options)
    remote = dict(opts.get("remote_options") or {})
    if opts.get("remote_protocol") in _S3_PROTOCOLS:
        remote = _tune_s3(remote)
    remote.setdefault("asynchronous", True)
    opts["remote_options"] = remote
    return opts


def _chain_protocols(text: str) -> list[str]:
    """The fsspec protocol of each link of ``text`` (``a::b::c://...``), outermost first.

    As `fsspec.core.url_to_fs` splits a chained URL: a bare word is a protocol
    (``simplecache``), anything else a URL or path (``s3://b/x``, ``/data/x.zip``).
    """
    from fsspec.core import split_protocol

    protocols = []
    for bit in text.split("::"):
        if "://" in bit:
            protocols.append(split_protocol(bit)[0] or "file")
        elif bit and bit.isidentifier() and bit.lower() == bit:
            protocols.append(bit)
        else:
            protocols.append("file")
    return protocols


def _inner_store(
    url: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None,
    read_only: bool,
    client: str | None = None,
) -> Store:
    """The store reading ``url``; ``client``: what reads s3://, gs://, az:// URLs
    (``"obstore"`` or ``"s3fs"``; ``None``: dask config ``zcache.client``)."""
    from zarr.storage import FsspecStore, LocalStore

    text = strip_prefix(os.fspath(url))
    if not text:
        raise ValueError("filename_or_obj: empty path or URL")
    chained = "::" in text
    if client is None:
        import dask.config

        client = str(dask.config.get("zcache.client"))
    if client == "obstore" and not chained:
        from xarray_zcache import clients

        if text.partition("://")[0].lower() in clients.SCHEMES:
            if clients.available():
                found = clients.obstore_store(text, storage_options, read_only)
                if found is not None:
                    return found
            else:
                logger.info(
                    "xarray-zcache: zcache.client is 'obstore' but obstore is not installed; "
                    "reading %s through fsspec",
                    text.partition("://")[0] + "://",
                )
    if not chained and ("://" not in text or text.startswith("file://")):
        path = text.removeprefix("file://")
        if storage_options:
            raise ValueError(
                "storage_options: only allowed with remote or chained URLs (s3://, gs://, "
                f"simplecache::s3://, ...), not with the local path {path!r}"
            )
        return LocalStore(os.path.expanduser(path), read_only=read_only)
    import fsspec

    protocols = _chain_protocols(text)
    for scheme in protocols:
        try:
            fsspec.get_filesystem_class(scheme)
        except (ValueError, ImportError) as exc:
            raise ValueError(
                f"filename_or_obj: unknown or unavailable URL scheme {scheme!r} in {text!r}; "
                "expected a local path, file://, s3://, gs://, az://, http(s)://, another "
                "installed fsspec protocol, or a chain of them such as simplecache::s3://... "
                f"({exc})"
            ) from exc
    opts = dict(storage_options or {})
    if not chained:
        if protocols[0] in _S3_PROTOCOLS:
            opts = _tune_s3(opts)
        elif protocols[0] == "reference":
            opts = _reference_options(opts)
    else:
        # fsspec takes the options of each link of a chain under its protocol name
        for scheme in protocols:
            if scheme in _S3_PROTOCOLS:
                given = opts.get(scheme)
                if given is not None and not isinstance(given, Mapping):
                    raise ValueError(
                        f"storage_options[{scheme!r}]: expected a mapping of options for the "
                        f"{scheme!r} link of {text!r}, got {type(given).__name__}"
                    )
                opts[scheme] = _tune_s3(given)
    return FsspecStore.from_url(text, storage_options=opts, read_only=read_only)


def open_store(
    url_or_store: str | os.PathLike[str] | Store,
    *,
    storage_options: Mapping[str, Any] | None = None,
    cache_config: CacheConfig | str | None = None,
    read_only: bool = True,
) -> CachedStore:
    """Open a `CachedStore` over a URL, a local path, or an existing zarr store.

    Parameters
    ----------
    url_or_store
        ``s3://bucket/data.zarr``, ``gs://...``, any fsspec URL including chained
        ones (``simplecache::s3://bucket/data.zarr``), a local path, ``file://...``,
        any of these prefixed with ``zcache::`` (stripped before fsspec sees the URL),
        or a `zarr.abc.store.Store`.
    storage_options
        fsspec options for remote URLs (credentials, ``endpoint_url``, ...), as
        `fsspec.url_to_fs` takes them: for a chained URL, nested per protocol
        (``{"s3": {...}, "simplecache": {...}}``). For ``s3`` (plain or in a chain),
        ``max_concurrency=1`` and a pool of 64 connections are set unless given. Not
        allowed with a Store object (pass them when building the store instead).
    cache_config
        A `CacheConfig`, the name of a configured cache, or ``None`` for defaults.
    read_only
        Open the wrapped store read-only (the default).

    Examples
    --------
    >>> opts = {"anon": True}
    >>> store = open_store("s3://bucket/era5.zarr", storage_options=opts)  # doctest: +SKIP
    >>> group = zarr.open_group(store, mode="r")  # doctest: +SKIP
    """
    if isinstance(url_or_store, CachedStore):
        if storage_options:
            raise ValueError("storage_options: not allowed with a Store object")
        return url_or_store
    if isinstance(url_or_store, Store):
        if storage_options:
            raise ValueError(
                "storage_options: not allowed with a Store object; pass them when you "
                "build the store"
            )
        return CachedStore(url_or_store, cache_config)
    if not isinstance(url_or_store, str | os.PathLike):
        raise TypeError(
            "filename_or_obj: expected a URL or path (str or os.PathLike) or a zarr Store, "
            f"got {type(url_or_store).__name__}"
        )
    # resolve the config first: a bad config fails before any I/O
    from xarray_zcache.registry import resolve_config

    config = resolve_config(cache_config)
    shown = re.sub(r"//[^/@]*@", "//", os.fspath(url_or_store))  # no user:password@ in logs
    logging.getLogger("xarray_zcache.store").debug(
        "xarray-zcache: opening %s with %s", shown, config
    )
    inner = _inner_store(url_or_store, storage_options, read_only, config.client)
    if not isinstance(url_or_store, Store):
        track_session(inner, owned=True)  # built here: `CachedStore.close` closes it
    return CachedStore(inner, config)


def _delegate(
    method: str,
    filename_or_obj: Any,
    storage_options: Mapping[str, Any] | None,
    cache_config: CacheConfig | str | None,
    **kwargs: Any,
) -> Any:
    """Open the cached store, then let xarray's own zarr backend do the rest."""
    store = open_store(
        filename_or_obj,
        storage_options=storage_options,
        cache_config=cache_config,
        read_only=kwargs.get("mode", "r") == "r",
    )
    try:
        return _open_cached(method, filename_or_obj, store, **kwargs)
    except BaseException:
        if not isinstance(filename_or_obj, Store):  # built here from a URL: no one else has it
            close_store_session(store.inner)
        raise


def _open_cached(method: str, filename_or_obj: Any, store: CachedStore, **kwargs: Any) -> Any:
    """`_delegate`'s open of ``store`` (its session closed by the result's ``close``)."""
    if kwargs.get("consolidated") is None and kwargs.get("mode", "r") == "r":
        kwargs["consolidated"] = _probe_consolidated(store, kwargs.get("zarr_format"))
    if method == "open_dataset" and kwargs.get("mode", "r") == "r":
        _read_index_coordinates(store, kwargs.get("group"), kwargs.get("drop_variables"))
    cache = store.cache
    remembered = cache.stats().negative_hits
    try:
        result = _retrying(getattr(ZarrBackendEntrypoint(), method)(store, **kwargs))
        return _closing_session(result, store)
    except Exception as exc:
        if cache.stats().negative_hits == remembered:
            raise  # no remembered miss was involved
        # the open failed on a key remembered missing: it may exist now (created by
        # another writer since): ask the store once more before raising
        token = RECHECK_MISSING.set(True)
        try:
            result = getattr(ZarrBackendEntrypoint(), method)(store, **kwargs)
        except Exception:
            raise exc from None
        finally:
            RECHECK_MISSING.reset(token)
        logger.info(
            "xarray-zcache: %s was remembered as missing in the cache (%s) but exists now; "
            "re-checked and opened",
            filename_or_obj,
            store.namespace,
        )
        return _closing_session(_retrying(result), store)


def _read_index_coordinates(store: CachedStore, group: str | None, drop: Any) -> None:
    """Read the index coordinates' chunks all at once before xarray reads them one
    after the other (`xarray_zcache.open_ahead`); not when read-ahead is off."""
    if store.config.prefetch_depth <= 0:
        return
    from zarr.core.sync import sync

    dropped = [drop] if isinstance(drop, str) else list(drop or ())
    sync(read_index_coordinates(store, group, dropped))


def _closing_session(result: Any, store: CachedStore) -> Any:
    """Make ``result.close()`` (a Dataset's, a DataTree's) close the s3fs session of a
    store built here from a URL too (the cache itself stays open for the next reader)."""
    previous = getattr(result, "_close", None)
    if not hasattr(result, "set_close"):
        return result

    def close() -> None:
        try:
            if previous is not None:
                previous()
        finally:
            close_store_session(store.inner)

    result.set_close(close)
    return result


_NOT_CONSOLIDATED = (
    "Failed to open Zarr store with consolidated metadata, but successfully read with "
    "non-consolidated metadata. This is typically much slower for opening a dataset. "
    "To silence this warning, consider:\n"
    "1. Consolidating metadata in this existing store with zarr.consolidate_metadata().\n"
    "2. Explicitly setting consolidated=False, to avoid trying to read consolidate "
    "metadata, or\n"
    "3. Explicitly setting consolidated=True, to raise an error in this case instead of "
    "falling back to try reading non-consolidated metadata."
)


def _probe_consolidated(store: CachedStore, zarr_format: Literal[2, 3] | None) -> bool | None:
    """``consolidated=None`` done here, so that its warning points at the user's line.

    xarray's zarr backend tries consolidated metadata, falls back to the plain
    metadata and warns at the first frame outside xarray: here, inside this package.
    So try the same first (the metadata read lands in the cache: xarray's read that
    follows is a hit), warn at the caller's line, and tell xarray the answer:
    ``False`` (no consolidated metadata), or ``None`` to let xarray do as usual
    (consolidated metadata found, or the group cannot be opened: xarray's error).
    """
    import xarray
    import zarr

    if not getattr(store, "supports_consolidated_metadata", True):
        return None
    try:
        zarr.open_consolidated(store, mode="r", zarr_format=zarr_format)
        return None
    except ValueError:
        pass
    except Exception:
        return None
    try:
        zarr.open_group(store, mode="r", zarr_format=zarr_format, use_consolidated=False)
    except Exception:
        return None
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    theirs = os.path.dirname(os.path.abspath(xarray.__file__)) + os.sep
    warnings.warn(
        _NOT_CONSOLIDATED, RuntimeWarning, stacklevel=2, skip_file_prefixes=(here, theirs)
    )
    return False


class ZCacheBackendEntrypoint(BackendEntrypoint):
    """Open Zarr data through a persistent, cluster-aware cache.

    Use ``xr.open_dataset(url, engine="zcache", ...)``. Everything zarr-specific
    (``group``, ``consolidated``, ``zarr_format``, decoders, ``chunks``) works as
    with ``engine="zarr"``; the store underneath is a `CachedStore` bound to the
    cache of the process (or Dask worker). Pass the cache settings as
    ``cache_config=`` (a `CacheConfig` or the name of a configured cache): xarray
    keeps ``cache=`` for itself.

    The first argument is what ``engine="zarr"`` takes: a local path, ``file://``,
    any fsspec URL (``s3://``, ``gs://``, ``memory://``, ...), chained URLs included
    (``simplecache::s3://bucket/x.zarr``, with ``storage_options`` nested per
    protocol as fsspec expects: ``{"s3": {...}, "simplecache": {...}}``), or a zarr
    Store. A leading ``zcache::`` is accepted for compatibility and stripped before
    fsspec sees the URL (it is no fsspec protocol); it is the only form xarray's
    engine guessing can attribute to this engine.

    Examples
    --------
    >>> ds = xr.open_dataset("s3://bucket/era5.zarr", engine="zcache", chunks={},
    ...                      cache_config=CacheConfig().with_memory_size("2GB"))  # doctest: +SKIP
    """

    description = "Open Zarr stores through the xarray-zcache persistent cache"
    url = "https://github.com/xarray-zcache/xarray-zcache"
    supports_groups = True

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """Claim only ``zcache::...`` strings (any other URL: pass ``engine="zcache"``)."""
        return isinstance(filename_or_obj, str) and filename_or_obj.startswith(PREFIX)

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        mask_and_scale: bool = True,
        decode_times: Any = True,
        concat_characters: bool = True,
        decode_coords: Any = True,
        drop_variables: str | Iterable[str] | None = None,
        use_cftime: bool | None = None,
        decode_timedelta: Any = None,
        group: str | None = None,
        mode: str = "r",
        consolidated: bool | None = None,
        storage_options: Mapping[str, Any] | None = None,
        zarr_format: int | None = None,
        use_zarr_fill_value_as_mask: bool | None = None,
        cache_members: bool = True,
        cache_config: CacheConfig | str | None = None,
    ) -> xr.Dataset:
        result: xr.Dataset = _delegate(
            "open_dataset",
            filename_or_obj,
            storage_options,
            cache_config,
            mask_and_scale=mask_and_scale,
            decode_times=decode_times,
            concat_characters=concat_characters,
            decode_coords=decode_coords,
            drop_variables=drop_variables,
            use_cftime=use_cftime,
            decode_timedelta=decode_timedelta,
            group=group,
            mode=mode,
            consolidated=consolidated,
            zarr_format=zarr_format,
            use_zarr_fill_value_as_mask=use_zarr_fill_value_as_mask,
            cache_members=cache_members,
        )
        return result

    def open_datatree(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        mask_and_scale: bool = True,
        decode_times: Any = True,
        concat_characters: bool = True,
        decode_coords: Any = True,
        drop_variables: str | Iterable[str] | None = None,
        use_cftime: bool | None = None,
        decode_timedelta: Any = None,
        group: str | None = None,
        mode: str = "r",
        consolidated: bool | None = None,
        storage_options: Mapping[str, Any] | None = None,
        zarr_format: int | None = None,
        cache_config: CacheConfig | str | None = None,
    ) -> xr.DataTree:
        result: xr.DataTree = _delegate(
            "open_datatree",
            filename_or_obj,
            storage_options,
            cache_config,
            mask_and_scale=mask_and_scale,
            decode_times=decode_times,
            concat_characters=concat_characters,
            decode_coords=decode_coords,
            drop_variables=drop_variables,
            use_cftime=use_cftime,
            decode_timedelta=decode_timedelta,
            group=group,
            mode=mode,
            consolidated=consolidated,
            zarr_format=zarr_format,
        )
        return result

    def open_groups_as_dict(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        mask_and_scale: bool = True,
        decode_times: Any = True,
        concat_characters: bool = True,
        decode_coords: Any = True,
        drop_variables: str | Iterable[str] | None = None,
        use_cftime: bool | None = None,
        decode_timedelta: Any = None,
        group: str | None = None,
        mode: str = "r",
        consolidated: bool | None = None,
        storage_options: Mapping[str, Any] | None = None,
        zarr_format: int | None = None,
        cache_config: CacheConfig | str | None = None,
    ) -> dict[str, xr.Dataset]:
        result: dict[str, xr.Dataset] = _delegate(
            "open_groups_as_dict",
            filename_or_obj,
            storage_options,
            cache_config,
            mask_and_scale=mask_and_scale,
            decode_times=decode_times,
            concat_characters=concat_characters,
            decode_coords=decode_coords,
            drop_variables=drop_variables,
            use_cftime=use_cftime,
            decode_timedelta=decode_timedelta,
            group=group,
            mode=mode,
            consolidated=consolidated,
            zarr_format=zarr_format,
        )
        return result
