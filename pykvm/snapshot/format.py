"""The snapshot state file: a fixed header, then a JSON body.

Layout (little-endian)::

    offset  size  field
    0       8     magic "PYKVMSNP"
    8       4     format version (FORMAT_VERSION)
    12      4     reserved, 0
    16      8     body length in bytes
    24      32    SHA-256 of the body
    56      ...   body: an 8-byte length n, n bytes of UTF-8 JSON (an object), then the binary blobs

Binary values (KVM structures, fw_cfg items) are not encoded in the JSON: each ``bytes`` in the state becomes
``{"$blob": [offset, length]}`` pointing into the blob area that follows the JSON, so a state holding a kernel
image stays about its size and loads without decoding. :func:`read_state` gives binary values back as read-only
memoryviews into the file's bytes (no copy).

A file that is too short, has another magic, another version, a body of another length or checksum, or a body
that is not a JSON object is refused with :class:`SnapshotError` before anything is restored. The file is
written to a temporary name and renamed, so a crash never leaves half a state file under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct

from ..errors import UsageError

MAGIC = b"PYKVMSNP"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQ32s")
MAX_BODY = 256 << 20    # fw_cfg carries the kernel and initrd: generous, but bounded


class SnapshotError(UsageError):
    """A snapshot that cannot be written or restored (CLI status 2, HTTP 400)."""


_LEN = struct.Struct("<Q")


def _pack(value, blobs: list[bytes], at: list[int]):
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        blobs.append(data)
        at[0] += len(data)
        return {"$blob": [at[0] - len(data), len(data)]}
    if isinstance(value, dict):
        return {k: _pack(v, blobs, at) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_pack(v, blobs, at) for v in value]
    return value


def _unpack(value, area: memoryview, path: str):
    if isinstance(value, dict):
        ref = value.get("$blob")
        if ref is not None and len(value) == 1:
            if (not isinstance(ref, list) or len(ref) != 2 or not all(type(x) is int and x >= 0 for x in ref)
                    or ref[0] + ref[1] > len(area)):
                raise SnapshotError(f"{path} is corrupt: a binary reference points outside the file")
            return area[ref[0]:ref[0] + ref[1]]   # a read-only view: megabytes are not copied again
        return {k: _unpack(v, area, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, area, path) for v in value]
    return value


def write_state(path: str, state: dict) -> int:
    """Write ``state`` (JSON-able values and ``bytes``) as a state file at ``path``; returns its size in bytes."""
    blobs: list[bytes] = []
    text = json.dumps(_pack(state, blobs, [0]), separators=(",", ":"), sort_keys=True).encode()
    body = b"".join([_LEN.pack(len(text)), text, *blobs])
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), hashlib.sha256(body).digest())
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(body)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SnapshotError(f"cannot write the snapshot state file {path}: {e.strerror}") from None
    return len(header) + len(body)


def read_state(path: str) -> dict:
    """Read and check a state file; returns its body. Raises SnapshotError naming what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not wait here for a writer
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SnapshotError(f"{path} is not a regular file (a directory, device or pipe): a snapshot state file "
                                "is one")
        with os.fdopen(fd, "rb") as f:
            header = f.read(HEADER.size)
            if len(header) < HEADER.size:
                raise SnapshotError(f"{path} is not a pykvm snapshot state file: it is truncated "
                                    f"({len(header)} bytes, shorter than the {HEADER.size}-byte header)")
            magic, version, _, length, digest = HEADER.unpack(header)
            if magic != MAGIC:
                raise SnapshotError(f"{path} is not a pykvm snapshot state file (its first bytes are "
                                    f"{magic!r}, not {MAGIC!r})")
            if version != FORMAT_VERSION:
                raise SnapshotError(f"{path} is a snapshot of format version {version}; this pykvm reads version "
                                    f"{FORMAT_VERSION} only: create the snapshot again with this pykvm")
            if length > MAX_BODY:
                raise SnapshotError(f"{path} claims a {length}-byte body, more than pykvm accepts ({MAX_BODY})")
            body = f.read(length + 1)
    except OSError as e:
        raise SnapshotError(f"cannot read the snapshot state file {path}: {e.strerror}") from None
    if len(body) != length:
        raise SnapshotError(f"{path} is truncated or has bytes appended: its header says {length} bytes of state, "
                            f"the file holds {len(body) if len(body) <= length else 'more'}")
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError(f"{path} is corrupt: the checksum of its state does not match (SHA-256)")
    (n,) = _LEN.unpack_from(body) if len(body) >= _LEN.size else (len(body),)
    try:
        state = json.loads(body[_LEN.size:_LEN.size + n]) if _LEN.size + n <= len(body) else None
    except ValueError:
        state = None
    if not isinstance(state, dict):
        raise SnapshotError(f"{path} is corrupt: its checksummed body is not a JSON object")
    return _unpack(state, memoryview(body)[_LEN.size + n:], path)
