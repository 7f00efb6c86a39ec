"""One configuration object for the cache, read from dask config ``zcache.*``.

The defaults live in ``zcache.yaml`` beside this module and are registered with
``dask.config.update_defaults`` on import (by `xarray_zcache.config_dask`), so
``DASK_ZCACHE__MEMORY_SIZE=2GiB`` and ``dask.config.set({"zcache.memory-size": "2GiB"})``
work as for any dask setting.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Literal, Self

from dask.utils import format_bytes

from xarray_zcache.config_checks import (
    _FIELD_OF,  # noqa: F401 - docs/_ext/zcache_docs.py reads config._FIELD_OF
    _check_disk_folder,
    _duration,
    _index_cache,
    _origin,
    _pack_below,
    _size,
    _validation,
    default_disk_path,
)
from xarray_zcache.config_dask import _cfg, _default_disk_path_cfg, kwargs_from_dask_config

__all__ = ["CLIENTS", "EVICTION_POLICIES", "CacheConfig", "default_disk_path"]

EVICTION_POLICIES = ("lru", "slru", "tinylfu")
#: what reads s3:// (gs://, az://) URLs: obstore, or fsspec's s3fs (gcsfs, adlfs)
CLIENTS = ("obstore", "s3fs")


@dataclasses.dataclass(frozen=True, slots=True)
class CacheConfig:
    """Settings of one cache (a memory tier over an optional disk tier).

    Frozen and hashable, so it can key the process registry and travel inside a
    pickled store. Every field is validated at construction: a bad value raises
    ``ValueError`` naming the field and the allowed values. Build it from dask
    config with ``CacheConfig.from_dask_config()`` (what ``CacheConfig()`` with
    no arguments gives you) and refine it with the ``with_*`` builder methods,
    which return new objects.

    Parameters
    ----------
    name
        Name of the cache. Stores whose configs share a name *and* settings share
        one cache per process; on a Dask worker with the zcache plugin, the
        plugin's cache of that name serves every store that names it.
    memory_size
        Byte budget of the memory tier (payloads plus measured bookkeeping).
    decoded_memory_size
        Byte budget of the decoded tier (xarray backend, zarr's array API): decoded
        chunks (read-only NumPy arrays) served without decoding again, each counted with
        the encoded bytes it was decoded from. ``None``: half of ``memory_size``; ``0``: off.
    disk_path
        Folder of the disk tier, or ``None`` for a memory-only cache.
    disk_size
        Byte budget of the disk tier (payloads).
    disk_pack_below
        Disk entries of at most this many bytes are appended as records to segment files
        instead of a file each (fills of small entries about 25x faster, see
        ``docs/benchmarks.md``); default 64 KiB; ``0``: off (every entry a file).
        At most 64 KiB.
    disk_index_cache
        Bound of the SQLite page cache of each connection to the disk tier's index
        (``index.db``), bytes; default 16 MiB. Pages are allocated as they are read, so a
        small index holds less; at least 1 KiB.
    disk_location_map
        Hold where every disk entry is in memory (25 bytes an entry: 25 MB at a million),
        so that a disk hit is one read of the device, also right after a restart, and a
        disk miss reads none; default True. False: each disk read looks its entry up in
        the index (a B-tree descent, device reads of its own when the page cache is cold).
    max_object_size
        Objects larger than this are never cached.
    metadata_ttl, chunk_ttl
        Seconds a metadata / chunk entry stays valid; ``None``: forever.
    listing_ttl
        Seconds a listing (``list``, ``list_dir``, ``list_prefix``) stays valid.
    negative_ttl
        Seconds a "metadata key is missing" answer stays valid.
    validation
        Seconds after which cached entries are validated against the source's
        versions (ETags, file times) before they are served again, one listing per
        array; ``None`` (``"never"``): entries live by their TTL only. See
        `with_validation`.
    eviction_policy
        ``"lru"``, ``"slru"`` (segmented LRU, scan resistant) or ``"tinylfu"``
        (segmented LRU with frequency-based admission: best under skewed access).
    promotion_threshold
        Accesses per second at which a disk hit is promoted to memory
        (0: always).
    cache_on_write
        Store written values in the cache (``True``) or only invalidate.
    maintenance_interval
        Seconds between maintenance passes.
    write_queue_size
        Bytes of pending background disk writes; beyond it, disk writes are
        dropped (the memory tier still holds the values).
    prefetch_depth
        Chunks read ahead of a detected sequential scan (0: off).
    top_n
        Number of hot keys tracked in stats.
    per_worker
        On a Dask cluster, give each worker its own subfolder of ``disk_path``.
    report_interval
        Seconds between worker stats reports to the scheduler.
    peer_reads
        On a Dask cluster with the zcache plugin, a miss asks the key's owning cache
        host before the source (the cluster acts as one cache).
    placement
        On a Dask cluster with peer reads, the scheduler sends the tasks that read
        zarr chunks through zcache towards the workers of the chunks' owning cache
        host (loose restrictions: the scheduler may still run them elsewhere).
    peer_timeout
        Seconds a worker waits for a peer's answer before reading the source itself.
    memory_fraction
        On a Dask worker with the zcache plugin, the memory tier holds at most this
        fraction of the worker's ``memory_limit`` (``min(memory_size, fraction x
        memory_limit)``); ``None``: ``memory_size`` as is.
    client
        What reads ``s3://``, ``gs://`` and ``az://`` URLs opened by zcache (`open_store`,
        ``engine="zcache"``): ``"obstore"`` (zarr's `ObjectStore` over obstore, with the
        s3fs-style ``storage_options`` mapped; an option it cannot map falls back to
        s3fs with one INFO line) or ``"s3fs"`` (fsspec). Chained URLs and
        ``reference://`` always use fsspec. Not part of the cache's identity: configs
        differing only here share one cache (both clients name the same objects alike).

    Examples
    --------
    >>> cfg = CacheConfig().with_memory_size("100MB").with_disk_cache("/tmp/zc", "1GB")
    >>> cfg.memory_size, cfg.disk_size
    (100000000, 1000000000)
    """

    name: str = dataclasses.field(default_factory=lambda: _cfg("name"))
    memory_size: int = dataclasses.field(default_factory=lambda: _cfg("memory-size"))
    decoded_memory_size: int | None = dataclasses.field(
        default_factory=lambda: _cfg("decoded-memory-size")
    )
    disk_path: str | None = dataclasses.field(default_factory=lambda: _default_disk_path_cfg())
    disk_size: int = dataclasses.field(default_factory=lambda: _cfg("disk.size"))
    disk_pack_below: int = dataclasses.field(default_factory=lambda: _cfg("disk.pack-below"))
    disk_index_cache: int = dataclasses.field(default_factory=lambda: _cfg("disk.index-cache"))
    max_object_size: int = dataclasses.field(default_factory=lambda: _cfg("max-object-size"))
    metadata_ttl: float | None = dataclasses.field(default_factory=lambda: _cfg("ttl.metadata"))
    chunk_ttl: float | None = dataclasses.field(default_factory=lambda: _cfg("ttl.chunks"))
    listing_ttl: float = dataclasses.field(default_factory=lambda: _cfg("ttl.listing"))
    negative_ttl: float = dataclasses.field(default_factory=lambda: _cfg("ttl.negative"))
    validation: float | None = dataclasses.field(default_factory=lambda: _cfg("validation"))
    eviction_policy: Literal["lru", "slru", "tinylfu"] = dataclasses.field(
        default_factory=lambda: _cfg("eviction-policy")
    )
    promotion_threshold: float = dataclasses.field(
        default_factory=lambda: _cfg("promotion-threshold")
    )
    cache_on_write: bool = dataclasses.field(default_factory=lambda: _cfg("cache-on-write"))
    maintenance_interval: float = dataclasses.field(
        default_factory=lambda: _cfg("maintenance-interval")
    )
    write_queue_size: int = dataclasses.field(default_factory=lambda: _cfg("write-queue-size"))
    prefetch_depth: int = dataclasses.field(default_factory=lambda: _cfg("prefetch-depth"))
    top_n: int = dataclasses.field(default_factory=lambda: _cfg("top-n"))
    per_worker: bool = dataclasses.field(default_factory=lambda: _cfg("distributed.per-worker"))
    report_interval: float = dataclasses.field(
        default_factory=lambda: _cfg("distributed.report-interval")
    )
    peer_reads: bool = dataclasses.field(default_factory=lambda: _cfg("distributed.peer-reads"))
    peer_timeout: float = dataclasses.field(
        default_factory=lambda: _cfg("distributed.peer-timeout")
    )
    placement: bool = dataclasses.field(default_factory=lambda: _cfg("distributed.placement"))
    memory_fraction: float | None = dataclasses.field(
        default_factory=lambda: _cfg("distributed.memory-fraction")
    )
    client: Literal["obstore", "s3fs"] = dataclasses.field(
        default_factory=lambda: _cfg("client"), compare=False
    )
    # (new fields go last: a config travels to workers pickled, its fields by position)
    disk_location_map: bool = dataclasses.field(default_factory=lambda: _cfg("disk.location-map"))

    def __post_init__(self) -> None:
        try:
            self._validate()
        except ValueError as exc:
            field = str(exc).split(":", 1)[0]
            origin = _origin(field, getattr(self, field, None), self.name)
            if origin is None:
                raise
            raise ValueError(f"{origin}: {exc}") from None

    def _validate(self) -> None:
        s = object.__setattr__
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: invalid cache name {self.name!r}; expected a non-empty str")
        s(self, "memory_size", _size("memory_size", self.memory_size))
        s(
            self,
            "decoded_memory_size",
            _size("decoded_memory_size", self.decoded_memory_size, allow_none=True),
        )
        if self.disk_path is not None:
            if not isinstance(self.disk_path, str | os.PathLike) or not str(self.disk_path):
                raise ValueError(
                    f"disk_path: invalid path {self.disk_path!r}; expected a folder path "
                    "(str or os.PathLike) or None for a memory-only cache"
                )
            folder = os.path.abspath(os.path.expanduser(os.fspath(self.disk_path)))
            _check_disk_folder(folder)
            s(self, "disk_path", folder)
        s(self, "disk_size", _size("disk_size", self.disk_size))
        s(self, "disk_pack_below", _pack_below(self.disk_pack_below))
        s(self, "disk_index_cache", _index_cache(self.disk_index_cache))
        s(self, "max_object_size", _size("max_object_size", self.max_object_size))
        s(self, "metadata_ttl", _duration("metadata_ttl", self.metadata_ttl, allow_none=True))
        s(self, "chunk_ttl", _duration("chunk_ttl", self.chunk_ttl, allow_none=True))
        s(self, "listing_ttl", _duration("listing_ttl", self.listing_ttl, allow_none=False))
        s(self, "negative_ttl", _duration("negative_ttl", self.negative_ttl, allow_none=False))
        s(self, "validation", _validation(self.validation))
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(
                f"eviction_policy: invalid policy {self.eviction_policy!r}; "
                f"expected one of {', '.join(map(repr, EVICTION_POLICIES))}"
            )
        thr = self.promotion_threshold
        if isinstance(thr, bool) or not isinstance(thr, int | float) or not thr >= 0:
            raise ValueError(
                f"promotion_threshold: invalid value {thr!r}; expected a number of "
                "accesses per second >= 0 (0 promotes every disk hit)"
            )
        s(self, "promotion_threshold", float(thr))
        for flag in (
            "cache_on_write",
            "per_worker",
            "peer_reads",
            "placement",
            "disk_location_map",
        ):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: invalid value {getattr(self, flag)!r}; expected a bool")
        interval = _duration("maintenance_interval", self.maintenance_interval, allow_none=False)
        if not interval:
            raise ValueError("maintenance_interval: must be > 0 seconds")
        s(self, "maintenance_interval", interval)
        s(self, "write_queue_size", _size("write_queue_size", self.write_queue_size))
        depth = self.prefetch_depth
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= 1024:
            raise ValueError(
                f"prefetch_depth: invalid value {depth!r}; expected an int from 0 (off) to 1024"
            )
        if isinstance(self.top_n, bool) or not isinstance(self.top_n, int) or self.top_n < 0:
            raise ValueError(f"top_n: invalid value {self.top_n!r}; expected an int >= 0")
        report = _duration("report_interval", self.report_interval, allow_none=False)
        if not report:
            raise ValueError("report_interval: must be > 0 seconds")
        s(self, "report_interval", report)
        peer = _duration("peer_timeout", self.peer_timeout, allow_none=False)
        if not peer:
            raise ValueError("peer_timeout: must be > 0 seconds")
        s(self, "peer_timeout", peer)
        frac = self.memory_fraction
        if frac is not None:
            if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac <= 1:
                raise ValueError(
                    f"memory_fraction: invalid value {frac!r}; expected a fraction of the "
                    "Dask worker's memory_limit in (0, 1], or None to use memory_size as is"
                )
            s(self, "memory_fraction", float(frac))
        if self.client not in CLIENTS:
            raise ValueError(
                f"client: invalid client {self.client!r}; expected one of "
                f"{', '.join(map(repr, CLIENTS))}"
            )

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dask_config(cls, name: str | None = None) -> CacheConfig:
        """Build the config from dask config ``zcache.*``.

        Parameters
        ----------
        name
            A named configuration under ``zcache.caches``; its keys override the
            top-level ``zcache.*`` keys. ``None`` gives the top-level settings.

        Raises
        ------
        ValueError
            If ``name`` is not configured, or a configured value is invalid.
        """
        return cls(**kwargs_from_dask_config(name))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheConfig:
        """Inverse of `to_dict` (used to ship configs over msgpack)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(
                f"unknown CacheConfig field(s) {sorted(unknown)}; expected some of {sorted(fields)}"
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the settings (msgpack- and JSON-friendly)."""
        return dataclasses.asdict(self)

    # -- builders -----------------------------------------------------------------------------

    def _replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def with_name(self, name: str) -> Self:
        """Return a copy with another cache ``name``."""
        return self._replace(name=name)

    def with_memory_size(self, size: int | str) -> Self:
        """Return a copy whose memory tier holds ``size`` bytes (e.g. ``"512MB"``)."""
        return self._replace(memory_size=size)

    def with_decoded_memory_size(self, size: int | str | None) -> Self:
        """Return a copy whose decoded tier holds ``size`` bytes (``"128MB"``; ``0``: off;
        ``None``: half of the memory tier)."""
        return self._replace(decoded_memory_size=size)

    def with_disk_cache(self, path: str | os.PathLike[str], size: int | str | None = None) -> Self:
        """Return a copy with a disk tier in folder ``path`` of ``size`` bytes."""
        changes: dict[str, Any] = {"disk_path": os.fspath(path)}
        if size is not None:
            changes["disk_size"] = size
        return self._replace(**changes)

    def with_disk_packing(self, below: int | str = "64KiB") -> Self:
        """Return a copy whose disk tier packs entries of at most ``below`` bytes into
        segment files (``0``: off; at most 64 KiB).

        Examples
        --------
        >>> CacheConfig().with_disk_packing().disk_pack_below
        65536
        """
        return self._replace(disk_pack_below=below)

    def without_disk_cache(self) -> Self:
        """Return a memory-only copy."""
        return self._replace(disk_path=None)

    def with_ttl(
        self,
        ttl: float | str | Literal[False] | None = False,
        *,
        metadata: float | str | Literal[False] | None = False,
        chunks: float | str | Literal[False] | None = False,
        listing: float | str | Literal[False] = False,
        negative: float | str | Literal[False] = False,
    ) -> Self:
        """Return a copy with new time-to-live values (seconds or strings; ``None``: forever).

        ``with_ttl(3600)`` sets every kind at once (metadata, chunks, listings and
        negative entries); keywords set one kind each and win over ``ttl``. Only the
        given arguments change. ``None`` (forever) is refused for listings and
        negative entries, which always expire.

        Examples
        --------
        >>> cfg = CacheConfig().with_ttl(5)
        >>> cfg.metadata_ttl, cfg.chunk_ttl, cfg.listing_ttl, cfg.negative_ttl
        (5.0, 5.0, 5.0, 5.0)
        """
        if ttl is not False:
            metadata = ttl if metadata is False else metadata
            chunks = ttl if chunks is False else chunks
            if ttl is not None:
                listing = ttl if listing is False else listing
                negative = ttl if negative is False else negative
        changes: dict[str, Any] = {}
        for field, value in (
            ("metadata_ttl", metadata),
            ("chunk_ttl", chunks),
            ("listing_ttl", listing),
            ("negative_ttl", negative),
        ):
            if value is not False:
                changes[field] = value
        return self._replace(**changes)

    def with_validation(self, interval: float | str | None) -> Self:
        """Return a copy validating cached entries every ``interval`` (seconds, a string
        such as ``"10 minutes"``, or ``"never"``/``None``).

        Past the interval, a cached entry is checked against its object's version at
        the source before it is served: one listing request per 1,000 objects of
        the array (or folder) it belongs to, shared by every process of the cache
        folder. Changed, deleted or new objects are dropped and read again;
        unchanged ones are not. The interval counts from the end of the last
        validation. ``0`` validates once per open: each array (unit) at most once per
        store object, by its first read there (see docs/freshness.md). ``"never"``
        leaves only the TTLs.

        Examples
        --------
        >>> CacheConfig().with_validation("10 minutes").validation
        600.0
        >>> CacheConfig().with_validation("never").validation is None
        True
        """
        return self._replace(validation=interval)

    def with_max_object_size(self, size: int | str) -> Self:
        """Return a copy that never caches objects over ``size`` bytes."""
        return self._replace(max_object_size=size)

    def with_eviction_policy(self, policy: Literal["lru", "slru", "tinylfu"]) -> Self:
        """Return a copy with memory-tier ``policy``: ``"lru"``, ``"slru"`` or ``"tinylfu"``."""
        return self._replace(eviction_policy=policy)

    def with_promotion_threshold(self, accesses_per_second: float) -> Self:
        """Return a copy promoting disk hits at ``accesses_per_second`` (0: always)."""
        return self._replace(promotion_threshold=accesses_per_second)

    def with_prefetch(self, depth: int) -> Self:
        """Return a copy reading ``depth`` chunks ahead of sequential scans (0: off)."""
        return self._replace(prefetch_depth=depth)

    def with_peer_reads(self, enabled: bool, timeout: float | str | None = None) -> Self:
        """Return a copy with peer reads between the workers on (or off), and their timeout."""
        if timeout is None:
            return self._replace(peer_reads=enabled)
        return self._replace(peer_reads=enabled, peer_timeout=timeout)

    def with_placement(self, enabled: bool) -> Self:
        """Return a copy that sends chunk-reading tasks to the workers of their chunk's
        owning cache host (loose restrictions; needs peer reads; see docs/cluster-cache)."""
        return self._replace(placement=enabled)

    def with_client(self, client: Literal["obstore", "s3fs"]) -> Self:
        """Return a copy reading ``s3://``/``gs://``/``az://`` URLs with ``client``:
        ``"obstore"`` or ``"s3fs"``."""
        return self._replace(client=client)

    def with_cache_on_write(self, enabled: bool) -> Self:
        """Return a copy that stores (``True``) or only invalidates (``False``) on writes."""
        return self._replace(cache_on_write=enabled)

    def __str__(self) -> str:
        disk = (
            f"disk={self.disk_path!r} ({format_bytes(self.disk_size)})"
            if self.disk_path
            else "disk=off"
        )
        return (
            f"CacheConfig(name={self.name!r}, memory={format_bytes(self.memory_size)}, {disk}, "
            f"policy={self.eviction_policy})"
        )
