"""The log of what reached a `~xarray_zcache.testing.s3server.LocalS3Server` (`RequestLog`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

__all__ = ["METADATA_NAMES", "RequestLog", "RequestRecord"]

#: Basenames of Zarr (v2 and v3) metadata documents; GETs on any other object key
#: are counted as chunk reads by :meth:`RequestLog.chunk_gets`.
METADATA_NAMES: frozenset[str] = frozenset(
    {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}
)

#: Query parameters that may appear on a bucket-level object listing (ListObjects v1/v2 and
#: ListObjectVersions). A bucket-level GET carrying any other parameter (``?location``,
#: ``?acl``, ``?versioning`` ...) is a bucket sub-resource call, not a listing.
_LIST_PARAMS: frozenset[str] = frozenset(
    {
        "list-type",
        "prefix",
        "delimiter",
        "marker",
        "max-keys",
        "encoding-type",
        "continuation-token",
        "start-after",
        "fetch-owner",
        "versions",
        "key-marker",
        "version-id-marker",
    }
)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One HTTP request that reached the server.

    Attributes
    ----------
    method : str
        Upper-case HTTP method (``"GET"``, ``"HEAD"``, ``"PUT"`` ...).
    bucket : str or None
        Bucket addressed by the request, ``None`` for service-level requests
        (``GET /``, i.e. ListBuckets).
    key : str or None
        URL-unquoted object key, ``None`` for bucket-level requests (listings,
        bucket creation, ``HEAD bucket`` ...).
    query : str
        Raw (still URL-encoded) query string, ``""`` if none.
    status : int
        HTTP status code of the response (500 if the application raised).
    range : str or None
        Value of the ``Range`` request header, if any.
    arrived : float
        ``time.time()`` when the request reached the server, before its injected latency
        (for timelines; not compared: two records of the same request are equal).
    """

    method: str
    bucket: str | None
    key: str | None
    query: str
    status: int
    range: str | None
    arrived: float = field(default=0.0, compare=False)

    @property
    def basename(self) -> str | None:
        """Last ``/``-separated component of :attr:`key` (``None`` without a key)."""
        if self.key is None:
            return None
        return self.key.rsplit("/", 1)[-1]

    @property
    def is_metadata(self) -> bool:
        """Whether the key's basename is a Zarr metadata document name."""
        return self.basename in METADATA_NAMES

    @property
    def is_list(self) -> bool:
        """Whether this is a bucket-level object listing (``GET /bucket?list-type=2...``)."""
        if self.method != "GET" or self.bucket is None or self.key is not None:
            return False
        params = {name for name, _ in parse_qsl(self.query, keep_blank_values=True)}
        return params <= _LIST_PARAMS


class RequestLog:
    """Thread-safe log of the requests that reached a :class:`LocalS3Server`.

    Records are appended by the server's request threads; all accessors take a
    lock and work on a snapshot.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def add(self, record: RequestRecord) -> None:
        """Append a record (called by the server middleware).

        Parameters
        ----------
        record : RequestRecord
            The request to log.
        """
        with self._lock:
            self._records.append(record)

    def reset(self) -> None:
        """Forget all recorded requests (the server's S3 state is untouched)."""
        with self._lock:
            self._records.clear()

    def records(self) -> list[RequestRecord]:
        """Return a snapshot of all records, oldest first.

        Returns
        -------
        list of RequestRecord
            A copy; later requests do not modify it.
        """
        with self._lock:
            return list(self._records)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def count(
        self,
        method: str | None = None,
        *,
        key_prefix: str | None = None,
        key_suffix: str | None = None,
        bucket: str | None = None,
        status: int | None = None,
    ) -> int:
        """Count recorded requests matching all the given filters.

        Parameters
        ----------
        method : str, optional
            HTTP method (case-insensitive); any method if ``None``.
        key_prefix : str, optional
            Only requests on an object key starting with this string. Requests
            without a key (bucket/service level) never match a key filter.
        key_suffix : str, optional
            Only requests on an object key ending with this string.
        bucket : str, optional
            Only requests addressed to this bucket.
        status : int, optional
            Only requests answered with this HTTP status.

        Returns
        -------
        int
            Number of matching requests.
        """
        wanted_method = method.upper() if method is not None else None
        n = 0
        for rec in self.records():
            if wanted_method is not None and rec.method != wanted_method:
                continue
            if bucket is not None and rec.bucket != bucket:
                continue
            if status is not None and rec.status != status:
                continue
            if key_prefix is not None and (rec.key is None or not rec.key.startswith(key_prefix)):
                continue
            if key_suffix is not None and (rec.key is None or not rec.key.endswith(key_suffix)):
                continue
            n += 1
        return n

    def chunk_gets(self, bucket: str | None = None) -> int:
        """Count GETs on object keys that are not Zarr metadata documents.

        Parameters
        ----------
        bucket : str, optional
            Restrict to this bucket.

        Returns
        -------
        int
            Number of GET requests on keys whose basename is not in
            :data:`METADATA_NAMES` (whatever their status: a GET on a missing
            chunk is still a round trip).
        """
        return sum(
            1
            for rec in self.records()
            if rec.method == "GET"
            and rec.key is not None
            and not rec.is_metadata
            and (bucket is None or rec.bucket == bucket)
        )

    def heads(self, bucket: str | None = None) -> int:
        """Count HEAD requests (object or bucket level).

        Parameters
        ----------
        bucket : str, optional
            Restrict to this bucket.

        Returns
        -------
        int
            Number of HEAD requests.
        """
        return self.count("HEAD", bucket=bucket)

    def lists(self, bucket: str | None = None) -> int:
        """Count object listings (bucket-level GETs such as ``?list-type=2&prefix=...``).

        Parameters
        ----------
        bucket : str, optional
            Restrict to this bucket.

        Returns
        -------
        int
            Number of listing requests (see :attr:`RequestRecord.is_list`).
        """
        return sum(
            1 for rec in self.records() if rec.is_list and (bucket is None or rec.bucket == bucket)
        )
