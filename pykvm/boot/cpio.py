"""A writer for the "newc" cpio format, the format Linux unpacks as an initramfs.

Each member is a 110-byte header of ASCII text -- the magic ``070701`` and thirteen 8-digit
hexadecimal fields -- followed by the member's name (NUL-terminated, padded with NULs so that
header + name is a multiple of 4 bytes) and its data (padded to 4 bytes). The archive ends with a
member named ``TRAILER!!!``. Linux's ``usr/gen_init_cpio`` and GNU ``cpio -H newc`` write the same.

The output is reproducible: owners are 0:0, every mtime is 0, inode numbers count up from 1 in the
order members were added, and nothing comes from the host's file system unless the caller reads it.

    archive = (CpioWriter()
               .dir("dev")
               .node("dev/console", 0o600, 5, 1)
               .file("init", script, 0o755)
               .symlink("bin/sh", "busybox")
               .build())

Paths are relative to the archive's root; a leading ``/`` is accepted and dropped. A directory that
a member needs but was not added yet is added first (mode 0755), because the kernel's unpacker
does not create parent directories.
"""

from __future__ import annotations

import stat

MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
_U32 = 0xFFFFFFFF


def _pad4(n: int) -> int:
    return -n & 3


def header(*, ino: int, mode: int, nlink: int, filesize: int, namesize: int, uid: int = 0, gid: int = 0,
           mtime: int = 0, devmajor: int = 0, devminor: int = 0, rdevmajor: int = 0, rdevminor: int = 0,
           check: int = 0) -> bytes:
    """One newc header: the magic and thirteen fields, each 8 upper-case hex digits."""
    fields = (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
              namesize, check)
    for value in fields:
        if not 0 <= value <= _U32:
            raise ValueError(f"cpio header field {value:#x} does not fit in 32 bits")
    out = MAGIC + b"".join(b"%08X" % v for v in fields)
    assert len(out) == HEADER_SIZE
    return out


def normalize(path: str) -> str:
    """``path`` as a member name: relative, no empty, ``.`` or ``..`` components."""
    if not isinstance(path, str):
        raise TypeError(f"cpio member path must be a str, not {type(path).__name__}")
    if "\0" in path:
        raise ValueError(f"cpio member path {path!r} contains a NUL character")
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"cpio member path {path!r} names the archive's root")
    if ".." in parts:
        raise ValueError(f"cpio member path {path!r} contains '..'")
    return "/".join(parts)


class CpioWriter:
    """Collects members, then :meth:`build` returns the archive. Every adder returns ``self``."""

    def __init__(self) -> None:
        self._members: list[tuple[str, int, int, int, bytes]] = []   # (name, mode, rdevmajor, rdevminor, data)
        self._kinds: dict[str, int] = {}                              # name -> S_IFMT bits

    # --- members ---

    def dir(self, path: str, mode: int = 0o755) -> CpioWriter:
        """Add directory ``path`` (mode bits ``mode``); adding one already there is a no-op. Returns self."""
        name = normalize(path)
        if self._kinds.get(name) == stat.S_IFDIR:
            return self             # already there (perhaps implicitly): adding it again is harmless
        return self._add(name, stat.S_IFDIR, mode, b"")

    def file(self, path: str, data: bytes, mode: int = 0o644) -> CpioWriter:
        """Add regular file ``path`` with ``data`` (bytes; TypeError otherwise). Returns self."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"cpio file {path!r}: data must be bytes, not {type(data).__name__}")
        return self._add(normalize(path), stat.S_IFREG, mode, bytes(data))

    def symlink(self, path: str, target: str) -> CpioWriter:
        """Add symlink ``path`` -> ``target`` (ValueError for an empty target or one with NUL). Returns self."""
        if not target or "\0" in target:
            raise ValueError(f"cpio symlink {path!r}: bad target {target!r}")
        return self._add(normalize(path), stat.S_IFLNK, 0o777, target.encode())

    def node(self, path: str, mode: int, major: int, minor: int, kind: str = "c") -> CpioWriter:
        """A device node: ``kind`` "c" (character, the default) or "b" (block)."""
        kinds = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}
        if kind not in kinds:
            raise ValueError(f"cpio node {path!r}: kind must be 'c' or 'b', not {kind!r}")
        for what, v in (("major", major), ("minor", minor)):
            if not 0 <= v <= _U32:
                raise ValueError(f"cpio node {path!r}: {what} number {v} out of range")
        return self._add(normalize(path), kinds[kind], mode, b"", major, minor)

    # --- output ---

    def build(self) -> bytes:
        """The archive in the newc format ("070701" headers, 4-byte aligned), ending with TRAILER!!!."""
        out = bytearray()
        for ino, (name, mode, rmajor, rminor, data) in enumerate(self._members, start=1):
            _append(out, name, data, ino=ino, mode=mode, nlink=2 if stat.S_ISDIR(mode) else 1,
                    rdevmajor=rmajor, rdevminor=rminor)
        _append(out, TRAILER, b"", ino=0, mode=0, nlink=1)
        return bytes(out)

    def names(self) -> list[str]:
        """The member names, in the order they were added."""
        return [m[0] for m in self._members]

    # --- internals ---

    def _add(self, name: str, kind: int, mode: int, data: bytes, major: int = 0, minor: int = 0) -> CpioWriter:
        if mode & ~0o7777:
            raise ValueError(f"cpio member {name!r}: mode {mode:#o} has bits beyond the permissions (07777)")
        if name in self._kinds:
            raise ValueError(f"cpio member {name!r} added twice")
        if name == TRAILER:
            raise ValueError(f"cpio member name {TRAILER!r} is reserved for the end marker")
        if len(data) > _U32:
            raise ValueError(f"cpio member {name!r}: {len(data)} bytes is over newc's 4 GiB limit")
        parent = name.rpartition("/")[0]
        if parent:
            pkind = self._kinds.get(parent)
            if pkind is None:
                self.dir(parent)
            elif pkind != stat.S_IFDIR:
                raise ValueError(f"cpio member {name!r}: its parent {parent!r} is not a directory")
        self._kinds[name] = kind
        self._members.append((name, kind | mode, major, minor, data))
        return self


def _append(out: bytearray, name: str, data: bytes, **fields: int) -> None:
    encoded = name.encode() + b"\0"
    out += header(filesize=len(data), namesize=len(encoded), **fields)
    out += encoded
    out += b"\0" * _pad4(HEADER_SIZE + len(encoded))
    out += data
    out += b"\0" * _pad4(len(data))
