"""The newc cpio writer: archives parse back to what was added, byte for byte and field by field,
with an independent reader written here from the format's description; GNU cpio extracts them."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.boot.cpio import CpioWriter, header

FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
          "rdevmajor", "rdevminor", "namesize", "check")


def parse(archive: bytes) -> list[dict]:
    """A strict newc reader: every header 4-aligned, every pad NUL, ends with TRAILER!!! exactly."""
    members = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"header at {pos} not 4-aligned"
        hdr = archive[pos:pos + 110]
        assert len(hdr) == 110, "truncated header"
        assert hdr[:6] == b"070701", f"bad magic {hdr[:6]!r} at {pos}"
        raw = hdr[6:]
        assert all(c in b"0123456789ABCDEF" for c in raw), f"non-hex header at {pos}: {raw!r}"
        m = {f: int(raw[i * 8:i * 8 + 8], 16) for i, f in enumerate(FIELDS)}
        pos += 110
        name = archive[pos:pos + m["namesize"]]
        assert name.endswith(b"\0") and b"\0" not in name[:-1], f"bad name {name!r}"
        m["name"] = name[:-1].decode()
        pos += m["namesize"]
        pad = -pos & 3
        assert archive[pos:pos + pad] == b"\0" * pad
        pos += pad
        m["data"] = archive[pos:pos + m["filesize"]]
        assert len(m["data"]) == m["filesize"], "truncated data"
        pos += m["filesize"]
        pad = -pos & 3
        assert archive[pos:pos + pad] == b"\0" * pad
        pos += pad
        if m["name"] == "TRAILER!!!":
            assert pos == len(archive), "bytes after the trailer"
            assert m["filesize"] == 0
            return members
        members.append(m)


def sample() -> CpioWriter:
    return (CpioWriter()
            .dir("/dev", 0o755)
            .node("/dev/console", 0o600, 5, 1)
            .node("/dev/ttyS0", 0o660, 4, 64)
            .dir("bin")
            .file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
            .symlink("bin/sh", "busybox")
            .file("/init", b"#!/bin/sh\necho hi\n", 0o755)
            .file("etc/empty", b"")
            .file("etc/odd", b"abc", 0o600)
            .node("dev/vda", 0o600, 254, 0, kind="b"))


def test_members_parse_back() -> None:
    members = {m["name"]: m for m in parse(sample().build())}
    assert list(members) == ["dev", "dev/console", "dev/ttyS0", "bin", "bin/busybox", "bin/sh", "init",
                             "etc", "etc/empty", "etc/odd", "dev/vda"]
    for m in members.values():
        assert (m["uid"], m["gid"], m["mtime"], m["check"]) == (0, 0, 0, 0)
        assert (m["devmajor"], m["devminor"]) == (0, 0)
    assert members["dev"]["mode"] == stat.S_IFDIR | 0o755 and members["dev"]["nlink"] == 2
    assert members["etc"]["mode"] == stat.S_IFDIR | 0o755      # added implicitly for etc/empty
    con = members["dev/console"]
    assert (con["mode"], con["rdevmajor"], con["rdevminor"], con["filesize"]) == (stat.S_IFCHR | 0o600, 5, 1, 0)
    tty = members["dev/ttyS0"]
    assert (tty["mode"], tty["rdevmajor"], tty["rdevminor"]) == (stat.S_IFCHR | 0o660, 4, 64)
    vda = members["dev/vda"]
    assert (vda["mode"], vda["rdevmajor"], vda["rdevminor"]) == (stat.S_IFBLK | 0o600, 254, 0)
    assert members["bin/busybox"]["data"] == b"\x7fELF" + bytes(range(256)) * 3
    assert members["bin/busybox"]["mode"] == stat.S_IFREG | 0o755
    assert members["bin/sh"]["mode"] == stat.S_IFLNK | 0o777 and members["bin/sh"]["data"] == b"busybox"
    assert members["init"]["data"] == b"#!/bin/sh\necho hi\n"
    assert members["etc/empty"]["filesize"] == 0 and members["etc/empty"]["mode"] == stat.S_IFREG | 0o644
    assert members["etc/odd"]["data"] == b"abc" and members["etc/odd"]["mode"] == stat.S_IFREG | 0o600
    inos = [m["ino"] for m in members.values()]
    assert inos == list(range(1, len(inos) + 1))


def test_exact_bytes_of_one_member() -> None:
    # Worked by hand from the format: header, "a\0" padded so 110 + 2 -> 112, data "xyz" + 1 NUL.
    got = CpioWriter().file("a", b"xyz", 0o644).build()
    first = (b"070701" + b"00000001" + b"000081A4" + b"00000000" * 2 + b"00000001" + b"00000000"
             + b"00000003" + b"00000000" * 4 + b"00000002" + b"00000000" + b"a\0" + b"xyz\0")
    trailer = (b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B" + b"00000000"
               + b"TRAILER!!!\0" + b"\0" * 3)
    assert got == first + trailer


def test_empty_archive_is_just_the_trailer() -> None:
    assert parse(CpioWriter().build()) == []


def test_reproducible() -> None:
    assert sample().build() == sample().build()


def test_dir_twice_and_explicit_after_implicit() -> None:
    w = CpioWriter().file("a/b/c", b"1").dir("a").dir("a/b")
    assert [m["name"] for m in parse(w.build())] == ["a", "a/b", "a/b/c"]


@pytest.mark.parametrize("path", ["", "/", "..", "a/../b", "./.", "x\0y"])
def test_bad_paths(path: str) -> None:
    with pytest.raises(ValueError):
        CpioWriter().file(path, b"")


def test_errors() -> None:
    with pytest.raises(ValueError, match="added twice"):
        CpioWriter().file("x", b"").file("/x", b"")
    with pytest.raises(ValueError, match="not a directory"):
        CpioWriter().file("x", b"").file("x/y", b"")
    with pytest.raises(ValueError, match="07777"):
        CpioWriter().file("x", b"", stat.S_IFREG | 0o644)
    with pytest.raises(ValueError, match="reserved"):
        CpioWriter().file("TRAILER!!!", b"")
    with pytest.raises(ValueError, match="kind"):
        CpioWriter().node("dev/x", 0o600, 1, 1, kind="p")
    with pytest.raises(ValueError, match="out of range"):
        CpioWriter().node("dev/x", 0o600, -1, 1)
    with pytest.raises(ValueError, match="target"):
        CpioWriter().symlink("x", "")
    with pytest.raises(TypeError):
        CpioWriter().file("x", "text")                                         # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 bits"):
        header(ino=1 << 32, mode=0, nlink=1, filesize=0, namesize=2)


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=20).filter(
    lambda s: s not in (".", ".."))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(names, st.binary(max_size=300), max_size=12))
def test_roundtrip_property(files: dict[str, bytes]) -> None:
    w = CpioWriter()
    for name, data in files.items():
        w.file("d/" + name, data, 0o640)
    got = {m["name"]: m["data"] for m in parse(w.build()) if m["name"] != "d"}
    assert got == {"d/" + k: v for k, v in files.items()}


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed (Debian package cpio)")
def test_gnu_cpio_extracts(tmp_path: Path) -> None:
    as_root = os.geteuid() == 0
    w = sample() if as_root else (CpioWriter().file("init", b"#!/bin/sh\n", 0o755).symlink("sh", "init")
                                  .file("etc/odd", b"abc", 0o600))
    out = tmp_path / "root"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=w.build(), cwd=out,
                   check=True, capture_output=True)
    init = out / "init"
    assert init.read_bytes().startswith(b"#!/bin/sh\n")
    assert stat.S_IMODE(init.stat().st_mode) == 0o755 and init.stat().st_mtime == 0
    assert (out / "etc/odd").read_bytes() == b"abc"
    assert stat.S_IMODE((out / "etc/odd").stat().st_mode) == 0o600
    if as_root:
        assert os.readlink(out / "bin/sh") == "busybox"
        assert (out / "bin/busybox").read_bytes() == b"\x7fELF" + bytes(range(256)) * 3
        tty = (out / "dev/ttyS0").lstat()
        assert stat.S_ISCHR(tty.st_mode) and (os.major(tty.st_rdev), os.minor(tty.st_rdev)) == (4, 64)
        con = (out / "dev/console").lstat()
        assert stat.S_ISCHR(con.st_mode) and (os.major(con.st_rdev), os.minor(con.st_rdev)) == (5, 1)
        vda = (out / "dev/vda").lstat()
        assert stat.S_ISBLK(vda.st_mode) and (os.major(vda.st_rdev), os.minor(vda.st_rdev)) == (254, 0)
        assert (out / "etc/empty").stat().st_size == 0
    else:
        assert os.readlink(out / "sh") == "init"


# --- guests/linux/mkinitramfs.py: the Linux guest's initramfs, built with this writer ---

def _mkinitramfs():
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "guests" / "linux" / "mkinitramfs.py"
    spec = importlib.util.spec_from_file_location("mkinitramfs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _elf64(interp: bool) -> bytes:
    """A minimal x86-64 ELF executable header with one program header (PT_INTERP or PT_LOAD)."""
    import struct
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x401000, 64, 0, 0,
                                                             64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 3 if interp else 1, 5, 0, 0x400000, 0x400000, 120, 120, 0x1000)
    return ehdr + phdr


def test_mkinitramfs_layout() -> None:
    mk = _mkinitramfs()
    init = _elf64(interp=False) + mk.MARKER.encode()          # build/init: a static program with the marker
    busybox = _elf64(interp=False)
    mk.check_static(Path("busybox"), busybox)
    members = {m["name"]: m for m in parse(mk.build(busybox, init))}
    assert members["init"]["data"] == init and members["init"]["mode"] == stat.S_IFREG | 0o755
    assert mk.MARKER.encode() in init
    assert members["bin/busybox"]["data"] == busybox
    assert stat.S_ISLNK(members["bin/sh"]["mode"]) and members["bin/sh"]["data"] == b"/bin/busybox"
    con = members["dev/console"]
    assert stat.S_ISCHR(con["mode"]) and (con["rdevmajor"], con["rdevminor"]) == (5, 1)
    tty = members["dev/ttyS0"]
    assert stat.S_ISCHR(tty["mode"]) and (tty["rdevmajor"], tty["rdevminor"]) == (4, 64)
    for d in ("proc", "sys", "dev", "tmp"):
        assert stat.S_ISDIR(members[d]["mode"])
    assert mk.build(busybox, init) == mk.build(busybox, init)


def test_mkinitramfs_refuses_a_dynamic_busybox() -> None:
    mk = _mkinitramfs()
    with pytest.raises(SystemExit, match="dynamically linked"):
        mk.check_static(Path("busybox"), _elf64(interp=True))
    with pytest.raises(SystemExit, match="not a 64-bit"):
        mk.check_static(Path("busybox"), b"#!/bin/sh\n")
