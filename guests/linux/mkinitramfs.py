#!/usr/bin/env python3
"""Build the busybox initramfs of pykvm's small Linux guest, as an uncompressed newc cpio.

    mkinitramfs.py [--busybox /bin/busybox] [--init build/init] -o build/initramfs.cpio

The archive holds a statically linked busybox (Debian's busybox-static), /init (build/init, made
from init.c beside this script: mounts proc, sysfs and devtmpfs, prints "pykvm-linux: init ready",
then a shell on ttyS0; a shell script works too, at ~0.2 s of emulated kernel time per process it
starts), the device nodes the kernel needs before devtmpfs is mounted, and a few applet links. It is
written with pykvm's own cpio writer and is uncompressed on purpose: on the kvm_pvm backend the
kernel's inflate runs emulated (~36 s for 1 MB of gzip). Output is reproducible: no timestamps,
owners 0:0.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))       # the repository root: pykvm without installing it

from pykvm.boot.cpio import CpioWriter  # noqa: E402

MARKER = "pykvm-linux: init ready"
PT_INTERP = 3

# Busybox's shell runs applets itself (Debian builds it with FEATURE_SH_STANDALONE), so only the
# names used before a shell exists, or by habit from other programs, need links. Each link costs
# the kernel emulated time at unpack, so there are few.
LINKS = {
    "bin": ["sh", "ash", "mount", "umount", "cat", "echo", "ls", "ps", "dmesg", "uname", "setsid", "cttyhack"],
    "sbin": ["poweroff", "reboot", "halt"],
}


def check_static(path: Path, data: bytes, hint: str = "install busybox-static (apt-get install "
                 "busybox-static) or pass a static busybox with --busybox") -> None:
    """Refuse anything but a static x86-64 ELF executable: the initramfs has no dynamic loader."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        sys.exit(f"mkinitramfs: {path} is not a 64-bit little-endian ELF file")
    e_machine = struct.unpack_from("<H", data, 18)[0]
    if e_machine != 62:
        sys.exit(f"mkinitramfs: {path} is not an x86-64 program (e_machine {e_machine})")
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phentsize < 4 or phoff + phnum * phentsize > len(data):
        sys.exit(f"mkinitramfs: {path}: its program headers lie outside the file")
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == PT_INTERP:
            sys.exit(f"mkinitramfs: {path} is dynamically linked; {hint}")


def build(busybox: bytes, init: bytes) -> bytes:
    w = CpioWriter()
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "root", "usr/bin", "usr/sbin"):
        w.dir(d, 0o755)
    w.dir("tmp", 0o1777)
    # /dev/console must exist in the archive: the kernel opens it for init before anything is mounted.
    w.node("dev/console", 0o600, 5, 1)
    w.node("dev/ttyS0", 0o660, 4, 64)
    w.node("dev/null", 0o666, 1, 3)
    w.file("bin/busybox", busybox, 0o755)
    for d, names in LINKS.items():
        for name in names:
            w.symlink(f"{d}/{name}", "/bin/busybox")
    w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    w.file("etc/group", b"root:x:0:\n", 0o644)
    w.file("init", init, 0o755)
    return w.build()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busybox", type=Path, default=Path("/bin/busybox"), help="a static busybox (default %(default)s)")
    ap.add_argument("--init", type=Path, default=HERE / "build" / "init",
                    help="the /init program, a static executable or a script (default: build/init, `make build/init`)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    try:
        busybox = args.busybox.read_bytes()
        init = args.init.read_bytes()
    except OSError as e:
        sys.exit(f"mkinitramfs: {e.filename}: {e.strerror}"
                 + ("; install busybox-static" if Path(e.filename or "") == args.busybox else "")
                 + ("; build it with `make -C guests/linux build/init`" if Path(e.filename or "") == args.init else ""))
    check_static(args.busybox, busybox)
    if not init.startswith(b"#!"):
        check_static(args.init, init, "build it with `make -C guests/linux build/init`")
    if MARKER.encode() not in init:
        sys.exit(f"mkinitramfs: {args.init} does not print the marker {MARKER!r}")
    archive = build(busybox, init)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_bytes(archive)
    os.replace(tmp, args.output)
    print(f"  CPIO    {args.output} ({len(archive)} bytes, uncompressed newc)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
