"""Persistent on-disk (L2) tier of the cache: payload files plus a SQLite index.

Layout under the cache folder (created with mode 0700)::

    <path>/chunks/<hh>/<sha256hex>.cache     payloads of kind "chunk"
    <path>/metadata/<hh>/<sha256hex>.meta    payloads of kind "metadata"
    <path>/segments/<pid>-<random>.seg       records of small entries (``segment_threshold``)
    <path>/index.db                          SQLite index (WAL mode)

One module per job: :mod:`.format` (the payload file format), :mod:`.folder` (the folder),
:mod:`.schema` and :mod:`.index` (the SQLite index and its recovery), :mod:`.rows` (row
operations), :mod:`.writes` (the two transactions of ``put``), :mod:`.access` (hit
statistics), :mod:`.scan` and :mod:`.check` (``verify``, ``rebuild_index``), :mod:`.core`
(the tier's state, setup and eviction), :mod:`.reads` (the read path), :mod:`.tier`
(:class:`DiskTier`), :mod:`.fills` (``put``, ``put_many``), :mod:`.segments`
and :mod:`.compact` (segment files and their compaction), :mod:`.hooks` (named points for
fault tests). Only the
standard library is imported.
"""

from xarray_zcache.cache.disk import hooks
from xarray_zcache.cache.disk.entry import DiskEntry, Fill, PutRequest
from xarray_zcache.cache.disk.folder import FolderGone
from xarray_zcache.cache.disk.format import FORMAT_VERSION, HEADER, MAGIC
from xarray_zcache.cache.disk.schema import NewerIndex
from xarray_zcache.cache.disk.tier import DiskTier

__all__ = [
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "DiskEntry",
    "DiskTier",
    "Fill",
    "FolderGone",
    "NewerIndex",
    "PutRequest",
    "hooks",
]
