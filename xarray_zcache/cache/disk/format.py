"""The payload file format (format 2) and where payload files live.

Layout under the cache folder::

    <path>/chunks/<hh>/<sha256hex>.cache     payloads of kind "chunk"
    <path>/metadata/<hh>/<sha256hex>.meta    payloads of kind "metadata"

``hh`` is the first two hex digits of the SHA-256 of the key (UTF-8, ``surrogatepass``). File
names are only ever the hash, so no key, however hostile, can name a path outside the folder.

Every payload file starts with a fixed 72-byte header (:data:`HEADER`), followed by the key,
the namespace and the payload::

    magic b"ZCCH" | version u8 | flags u8 | namespace length u16 | payload length u64
    | payload crc32 u32 | key length u32 | expires f64 | header crc32 u32 | 4 pad | sha256(key)
    | key (UTF-8) | namespace (UTF-8) | payload

``expires`` is ``inf`` when the entry never expires. The header CRC-32 covers the fixed part
(with the header CRC field zeroed), the key and the namespace, so a damaged length, expiry or key
is detected like a damaged payload. Because the header carries the key, the length, the checksum
and the expiry, a cache hit is served from the file alone, and a lost index can be rebuilt from
the payload files. Format version 1 (no key, no header CRC) is not read: such files are treated
as damaged and dropped. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import struct
import zlib
from typing import Final

from xarray_zcache.cache.disk import hooks

MAGIC: Final = b"ZCCH"
FORMAT_VERSION: Final = 2
#: Fixed part of a payload header: magic, version, flags, namespace length, payload length,
#: payload crc32, key length, expires, header crc32, (4 pad), sha256(key): 72 bytes. The key and
#: the namespace follow it, then the payload.
HEADER: Final = struct.Struct("<4sBBHQIIdI4x32s")
HEADER_SIZE: Final = HEADER.size
#: Bytes read with the fixed header, so that a typical key and namespace come in the same call.
HEAD_READ: Final = HEADER_SIZE + 440
#: Payload files up to this size are read whole, header and payload with one ``pread``: one
#: system call (and, page cache cold, one device read) per hit of a small entry.
WHOLE_READ: Final = 64 * 1024
MAX_NAMESPACE: Final = 0xFFFF

#: kind -> (subfolder, file extension)
LAYOUT: Final[dict[str, tuple[str, str]]] = {
    "chunk": ("chunks", ".cache"),
    "metadata": ("metadata", ".meta"),
}
KINDS: Final = ("chunk", "metadata")
TEMP_SUFFIX: Final = ".tmp"


def digest(key: str) -> bytes:
    """SHA-256 of ``key`` as stored (UTF-8, lone surrogates passed through)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def payload_path(root: str, hexdigest: str, kind: str) -> str:
    """Where the payload file of kind ``kind`` for the key hashing to ``hexdigest`` lives."""
    sub, ext = LAYOUT[kind]
    # os.path.join(root, sub, hexdigest[:2], hexdigest + ext), without its cost on the hit path
    sep = "" if root.endswith(os.sep) else os.sep
    return f"{root}{sep}{sub}{os.sep}{hexdigest[:2]}{os.sep}{hexdigest}{ext}"


def temp_path(final: str, hexdigest: str) -> str:
    """A fresh temp file name beside ``final``: ``.<hash>.<pid>.<uuid>.tmp``.

    The pid lets ``verify(repair=True)`` tell a crashed writer's leftovers from a live write.
    """
    folder = os.path.dirname(final)
    unique = os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID
    return os.path.join(folder, f".{hexdigest}.{os.getpid()}.{unique}{TEMP_SUFFIX}")


def pack_header(
    key: bytes, namespace: bytes, length: int, crc: int, expires: float, key_digest: bytes
) -> bytes:
    """The header of a payload file: fixed part, key and namespace (see the module docstring)."""
    if len(namespace) > MAX_NAMESPACE:
        namespace = b""  # only a label: not worth refusing the entry for
    fields = [MAGIC, FORMAT_VERSION, 0, len(namespace), length, crc, len(key), expires, 0]
    fields.append(key_digest)
    fields[8] = zlib.crc32(namespace, zlib.crc32(key, zlib.crc32(HEADER.pack(*fields))))
    return HEADER.pack(*fields) + key + namespace


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """A checked payload header."""

    key: bytes
    namespace: bytes
    offset: int  # of the payload
    length: int
    crc: int
    expires: float


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Read ``size`` bytes at ``offset`` (fewer only at end of file)."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_header(
    fd: int,
    file_size: int,
    key_digest: bytes | None,
    key: bytes | None = None,
    *,
    head: bytes | None = None,
) -> tuple[str | None, Header | None]:
    """Read and check a payload header.

    ``key_digest`` (and ``key``, if given) must match what the header records; with
    ``key_digest=None`` the key hash is checked against the key stored in the header instead.
    ``head``: the first bytes of the file, already read (the whole file, for a small one).
    Returns ``(problem, header)``; ``problem`` is None when the header is intact, belongs to
    the expected key and is consistent with the file size.
    """
    if head is None:
        head = os.pread(fd, min(file_size, HEAD_READ), 0) if file_size > 0 else b""
    if len(head) < HEADER_SIZE:
        return "truncated header", None
    magic, version, flags, ns_len, length, crc, key_len, expires, hcrc, key_hash = (
        HEADER.unpack_from(head)
    )
    if magic != MAGIC:
        return "bad magic", None
    if version != FORMAT_VERSION:
        return f"unsupported format version {version}", None
    if key_digest is not None and key_hash != key_digest:
        return "key hash mismatch", None
    offset = HEADER_SIZE + key_len + ns_len
    if file_size != offset + length:
        return "length mismatch", None
    if len(head) < offset:
        head += pread_exact(fd, offset - len(head), len(head))
        if len(head) < offset:
            return "truncated header", None
    stored_key = head[HEADER_SIZE : HEADER_SIZE + key_len]
    namespace = head[HEADER_SIZE + key_len : offset]
    fixed = HEADER.pack(magic, version, flags, ns_len, length, crc, key_len, expires, 0, key_hash)
    if zlib.crc32(namespace, zlib.crc32(stored_key, zlib.crc32(fixed))) != hcrc:
        return "header checksum mismatch", None
    if key is not None:
        if stored_key != key:
            return "key mismatch", None
    elif hashlib.sha256(stored_key).digest() != key_hash:
        return "key hash mismatch", None
    if math.isnan(expires):
        return "invalid expiry", None
    return None, Header(stored_key, namespace, offset, int(length), int(crc), float(expires))


def read_payload(fd: int, header: Header) -> tuple[str | None, bytes]:
    """Read the payload after ``header``; ``(problem, data)``, problem None if it verifies."""
    return check_payload(pread_exact(fd, header.length, header.offset), header)


def check_payload(data: bytes, header: Header) -> tuple[str | None, bytes]:
    """Check a payload read after ``header``; ``(problem, data)``, problem None if it verifies."""
    if len(data) != header.length:
        return "truncated payload", data
    if zlib.crc32(data) != header.crc:
        return "checksum mismatch", data
    return None, data


def check_file(
    path: str, hexdigest: str, *, payload: bool = True
) -> tuple[str | None, Header | None]:
    """Verify a payload file: header always, payload checksum if ``payload``.

    Returns ``(problem, header)``; ``header`` is None when the header itself is unusable.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"unreadable: {exc.strerror}", None
    try:
        problem, header = read_header(fd, os.fstat(fd).st_size, bytes.fromhex(hexdigest))
        if header is not None and payload:
            problem = read_payload(fd, header)[0]
    except OSError as exc:
        return f"unreadable: {exc.strerror}", None
    finally:
        os.close(fd)
    return problem, header


def write_temp(temp: str, header: bytes, value: bytes | memoryview) -> None:
    """Write header then payload to the new file ``temp`` (mode 0600; never an existing file).

    Two writes, header first: a crash between them leaves a temp file only, which no reader
    opens (readers open final names only; the rename in ``os.replace`` is atomic).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(temp, flags, 0o600)
    except FileNotFoundError:
        # the <hh> folder only: never re-create a cache folder that is being removed
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.dirname(temp), 0o700)
        fd = os.open(temp, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, header)
        hooks.fire("after-header-write", temp)
        write_all(fd, value)
    finally:
        os.close(fd)
    hooks.fire("after-temp-write", temp)
