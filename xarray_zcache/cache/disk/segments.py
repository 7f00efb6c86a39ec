"""Segment files: small entries appended as records to per-writer files.

Layout::

    <path>/segments/<pid>-<random>.seg

An entry of at most :data:`SEGMENT_THRESHOLD` bytes is not a file of its own: its *record*
(exactly the bytes a payload file would hold, :mod:`.format`: the 72-byte header with key,
namespace, length, payload CRC-32, header CRC-32 and expiry, then key, namespace, payload) is
appended to the current segment of its writer, and its index row records ``segment`` (the
file name) and ``offset``. A hit is one primary-key lookup and one ``pread`` of the record
from an open descriptor (:class:`FdCache`); the header then proves the bytes belong to the
key and are intact, exactly as for a file.

**Rows are the authority.** A record is appended first, outside any transaction, then its row
is committed; so a row only ever points to a fully written record. A crash between the two
leaves an unreferenced record: dead bytes. Deleting, overwriting, evicting or expiring an
entry only removes or changes its row: the record becomes dead bytes too.

**One writer per segment.** Each tier instance appends only to its own segment, created with
``O_EXCL`` and held under an exclusive ``flock`` for as long as it may be appended to. A
segment is *sealed* when its writer moves on (it reached :func:`seal_size`) or is gone (the
lock is released with the descriptor, also when the process dies): whoever can take the lock
may compact it (:mod:`.compact`). Compaction unlinks a segment inside a write transaction; a
writer commits rows into a segment only if the file still exists (checked in its commit
transaction), so no row can point into a segment that compaction removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Final

from xarray_zcache.cache.disk import hooks
from xarray_zcache.cache.disk.format import (
    HEADER_SIZE,
    MAX_NAMESPACE,
    Header,
    check_payload,
    pread_exact,
    read_header,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

#: Entries up to this many payload bytes go to segment files; larger ones to files of their own
#: (``DiskTier(..., segment_threshold=SEGMENT_THRESHOLD)``).
SEGMENT_THRESHOLD: Final = 64 * 1024
#: What a tier does unless told: entries up to ``SEGMENT_THRESHOLD`` bytes are records
#: (-1: none are; every entry a file of its own).
DEFAULT_SEGMENT_THRESHOLD: Final = SEGMENT_THRESHOLD
SEGMENT_DIR: Final = "segments"
SEGMENT_EXT: Final = ".seg"
#: A segment is sealed once it holds this many bytes (or ``capacity / 8``, if smaller).
MAX_SEGMENT_BYTES: Final = 64 * 1024 * 1024
MIN_SEGMENT_BYTES: Final = 256 * 1024
#: Written over the magic of a record whose row is deleted or changed (:func:`kill_records`).
DEAD_MAGIC: Final = b"ZCDX"
#: The problem :func:`check_record` reports for such a record: a miss, not damage.
DELETED: Final = "deleted record"
#: Open segment descriptors kept per tier for reads.
FD_CACHE_SIZE: Final = 64
#: Seconds between two checks that an open segment still has a link (per descriptor on use,
#: and of all idle ones on release): a descriptor of an unlinked segment holds its bytes.
FD_CHECK_S: Final = 0.1
#: ``writev`` takes at most ``IOV_MAX`` (1,024 on Linux) buffers: two per record.
_WRITEV_RECORDS: Final = 500


def seal_size(capacity: int) -> int:
    """Size at which a writer leaves its segment for a new one."""
    return max(MIN_SEGMENT_BYTES, min(MAX_SEGMENT_BYTES, capacity // 8))


def segment_dir(root: str) -> str:
    return os.path.join(root, SEGMENT_DIR)


def has_segments(root: str) -> bool:
    """Whether the folder holds any segment file."""
    try:
        with os.scandir(segment_dir(root)) as it:
            return any(is_segment_name(e.name) for e in it)
    except OSError:
        return False


def segment_path(root: str, name: str) -> str:
    sep = "" if root.endswith(os.sep) else os.sep
    return f"{root}{sep}{SEGMENT_DIR}{os.sep}{name}"


def is_segment_name(name: str) -> bool:
    """Whether ``name`` is a segment file name as :class:`SegmentWriter` makes them."""
    stem = name[: -len(SEGMENT_EXT)]
    pid, _, rand = stem.partition("-")
    return (
        name.endswith(SEGMENT_EXT)
        and pid.isdigit()
        and len(rand) == 16
        and all(c in "0123456789abcdef" for c in rand)
    )


def record_length(key: bytes, namespace: bytes, size: int) -> int:
    """Bytes of the record of an entry (header, key, namespace, payload)."""
    ns = len(namespace) if len(namespace) <= MAX_NAMESPACE else 0
    return HEADER_SIZE + len(key) + ns + size


def try_lock(fd: int) -> bool:
    """Take the exclusive writer lock of a segment without waiting; whether it was taken."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class SegmentWriter:
    """The current segment of one tier: appends records, moves on at :func:`seal_size`.

    Thread-safe. The segment folder is created if missing (the cache folder must exist).
    """

    def __init__(self, root: str, seal_bytes: int) -> None:
        self.root = root
        self.seal_bytes = seal_bytes
        self.lock = threading.Lock()
        self._fd: int | None = None
        self.name: str | None = None
        self._size = 0
        #: the process that opened ``_fd``: after fork() the child never appends to it
        self._pid = os.getpid()
        #: segments this writer left (sealed) since the last :meth:`take_sealed`
        self._sealed = 0

    def append(self, records: Sequence[tuple[bytes, bytes | memoryview]]) -> list[tuple[str, int]]:
        """Append ``(header, payload)`` records; ``(segment, offset)`` of each, in order.

        Raises OSError (disk full...): records before the failing write are appended (their
        locations are lost with the exception: they are dead bytes).
        """
        out: list[tuple[str, int]] = []
        with self.lock:
            i = 0
            while i < len(records):
                fd, name = self._current(len(records[i][0]) + len(records[i][1]))
                start = self._size
                group: list[bytes | memoryview] = []
                offsets: list[int] = []
                size = start
                while i < len(records) and len(offsets) < _WRITEV_RECORDS:
                    header, value = records[i]
                    n = len(header) + memoryview(value).nbytes
                    if offsets and size + n > self.seal_bytes:
                        break
                    offsets.append(size)
                    group += (header, value)
                    size += n
                    i += 1
                try:
                    hooks.fire("before-append", segment_path(self.root, name))
                    _writev_all(fd, group, size - start)
                except OSError:
                    if start == 0:  # (a full disk) no row can point into it: never leave it
                        with contextlib.suppress(OSError):
                            os.unlink(segment_path(self.root, name))
                    self._leave()  # the file's end is uncertain now: a fresh segment next time
                    raise
                self._size = size
                out += [(name, off) for off in offsets]
        return out

    def _current(self, need: int) -> tuple[int, str]:
        """The open segment (a new one if there is none or ``need`` bytes would overfill it)."""
        if self._pid != os.getpid():
            # a forked child: the descriptor (and its O_APPEND end) is shared with the parent,
            # whose appends this writer's ``_size`` does not see. Close the child's copy only
            # (the parent keeps its descriptor and lock) and start a segment of its own.
            fd, self._fd, self.name, self._pid = self._fd, None, None, os.getpid()
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._fd is not None and self.name is not None:
            fits = self._size == 0 or self._size + need <= self.seal_bytes
            st = os.fstat(self._fd)
            # (unlinked: compaction took an empty segment before its lock; rows cannot go there;
            # a size other than ours: someone else appended, our offsets would be wrong)
            if fits and st.st_nlink > 0 and st.st_size == self._size:
                return self._fd, self.name
            self._leave()
        name = f"{os.getpid()}-{os.urandom(8).hex()}{SEGMENT_EXT}"
        path = segment_path(self.root, name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            if not os.path.isdir(self.root):
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(segment_dir(self.root), 0o700)
            fd = os.open(path, flags, 0o600)
        try_lock(fd)  # a new name: nobody else holds it
        self._fd, self.name, self._size = fd, name, 0
        return fd, name

    def _leave(self) -> None:
        """Stop appending to the current segment (it becomes sealed)."""
        fd, self._fd, self.name = self._fd, None, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # releases the writer lock
            self._sealed += 1

    def take_sealed(self) -> int:
        with self.lock:
            n, self._sealed = self._sealed, 0
        return n

    @property
    def current(self) -> str | None:
        return self.name

    def close(self) -> None:
        with self.lock:
            self._leave()


def _writev_all(fd: int, buffers: list[bytes | memoryview], total: int) -> None:
    written = os.writev(fd, buffers)
    if written == total:
        return
    # a short write (rare: a signal, a full disk): write the rest plainly
    rest = memoryview(b"".join(bytes(b) for b in buffers))[written:]
    while rest:
        n = os.write(fd, rest)
        rest = rest[n:]


class FdCache:
    """Open read descriptors of segments, at most :data:`FD_CACHE_SIZE` idle ones (LRU).

    A descriptor in use by a reader is never closed under it (reference counts): a closed
    number could be reused by another file meanwhile. Descriptors of segments unlinked by
    compaction (of any process) keep their bytes on disk while open: a descriptor is checked
    on use (at most every :data:`FD_CHECK_S`) and dropped if its file has no link left (the
    read then finds the segment gone); idle ones are swept on release (at most every
    :data:`FD_CHECK_S`), when a segment is opened, and by :meth:`sweep` (periodic maintenance).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._users: dict[int, int] = {}
        self._doomed: set[int] = set()
        #: descriptor -> ``time.monotonic()`` of its last link check
        self._checked: dict[int, float] = {}
        self._last_sweep = 0.0
        #: the process the descriptors belong to (a forked child opens its own)
        self._pid = os.getpid()

    def _check_pid_locked(self) -> None:
        """In a forked child, forget the inherited descriptors (closing only its copies)."""
        if self._pid == os.getpid():
            return
        for fd in {*self._fds.values(), *self._doomed}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._users.clear()
        self._doomed.clear()
        self._checked.clear()
        self._pid = os.getpid()

    def acquire(self, name: str) -> int:
        """An open descriptor of segment ``name`` (FileNotFoundError if it is gone)."""
        with self._lock:
            self._check_pid_locked()
            fd = self._fds.get(name)
            if fd is not None and self._linked_locked(fd, time.monotonic()):
                self._fds.move_to_end(name)
                self._users[fd] = self._users.get(fd, 0) + 1
                return fd
            if fd is not None:  # unlinked: drop it; the segment is gone (names are not reused)
                del self._fds[name]
                self._drop_locked(fd)
        fd = os.open(segment_path(self.root, name), os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            # records are read at random: no readahead (a hit reads its record's pages only)
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        with self._lock:
            old = self._fds.get(name)
            if old is not None:  # opened by another thread meanwhile
                os.close(fd)
                fd = old
            else:
                self._sweep_locked()
                self._fds[name] = fd
                self._checked[fd] = time.monotonic()
                while len(self._fds) > FD_CACHE_SIZE:
                    _name, victim = self._fds.popitem(last=False)
                    self._drop_locked(victim)
            self._users[fd] = self._users.get(fd, 0) + 1
            return fd

    def release(self, fd: int) -> None:
        with self._lock:
            if self._pid != os.getpid():
                return
            n = self._users.get(fd, 1) - 1
            if n > 0:
                self._users[fd] = n
                return
            self._users.pop(fd, None)
            if fd in self._doomed:
                self._doomed.discard(fd)
                os.close(fd)
            now = time.monotonic()
            if now - self._last_sweep >= FD_CHECK_S:
                self._sweep_locked()

    def sweep(self) -> None:
        """Close the idle descriptors of segments unlinked since (periodic maintenance)."""
        with self._lock:
            self._check_pid_locked()
            self._sweep_locked()

    def _linked_locked(self, fd: int, now: float) -> bool:
        """Whether ``fd``'s file still has a link (checked at most every FD_CHECK_S)."""
        if now - self._checked.get(fd, 0.0) < FD_CHECK_S:
            return True
        try:
            linked = os.fstat(fd).st_nlink > 0
        except OSError:
            linked = False
        if linked:
            self._checked[fd] = now
        return linked

    def forget(self, name: str) -> None:
        """Close the descriptor of ``name`` (its segment was unlinked)."""
        with self._lock:
            fd = self._fds.pop(name, None)
            if fd is not None:
                self._drop_locked(fd)

    def _drop_locked(self, fd: int) -> None:
        self._checked.pop(fd, None)
        if self._users.get(fd):
            self._doomed.add(fd)
        else:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _sweep_locked(self) -> None:
        self._last_sweep = time.monotonic()
        for name, fd in list(self._fds.items()):
            try:
                gone = os.fstat(fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                del self._fds[name]
                self._drop_locked(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                self._drop_locked(fd)
            self._fds.clear()


def kill_records(root: str, locations: Iterable[tuple[str, int]]) -> set[str]:
    """Mark the records at ``(segment, offset)`` dead (:data:`DEAD_MAGIC` over their magic).

    Called, under the write lock, before the rows that point to them are deleted or changed:
    should the index ever go back to an older state (lost WAL frames, a damaged WAL), a row
    of that state then finds a dead record, a miss, and never the value that was deleted or
    replaced since (payload files are unlinked for the same reason). A segment that is gone
    needs nothing. Returns the segments that could not be written (keep their rows).
    """
    by_segment: dict[str, list[int]] = {}
    for segment, offset in locations:
        by_segment.setdefault(segment, []).append(offset)
    failed: set[str] = set()
    for segment, offsets in by_segment.items():
        try:
            fd = os.open(segment_path(root, segment), os.O_WRONLY)
        except FileNotFoundError:
            continue
        except OSError:
            failed.add(segment)
            continue
        try:
            for offset in offsets:
                os.pwrite(fd, DEAD_MAGIC, offset)
        except OSError:
            failed.add(segment)
        finally:
            os.close(fd)
    return failed


def read_record(
    fd: int, offset: int, length: int, key_digest: bytes, key: bytes
) -> tuple[str | None, Header | None, bytes]:
    """Read and check the record of ``key`` at ``offset`` (one ``pread``); see
    :func:`check_record`."""
    return check_record(pread_exact(fd, length, offset), length, key_digest, key)


def check_record(
    data: bytes, length: int, key_digest: bytes, key: bytes
) -> tuple[str | None, Header | None, bytes]:
    """Check the record ``data`` of ``key``, expected to be ``length`` bytes long.

    Returns ``(problem, header, payload)``; ``problem`` is None when the record is intact
    (header and payload checksums) and belongs to ``key``; ``header`` is None when the
    header itself is unusable. Expiry is the caller's to judge.
    """
    if len(data) != length:
        return "truncated record", None, b""
    if data[:4] == DEAD_MAGIC:
        return DELETED, None, b""
    problem, header = read_header(-1, length, key_digest, key, head=data)
    if header is None:
        return problem or "unreadable header", None, b""
    problem, payload = check_payload(data[header.offset :], header)
    return problem, header, payload
