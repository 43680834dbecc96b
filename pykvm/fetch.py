"""`pykvm fetch linux`: Debian's stock kernel, for booting a real distribution kernel.

The kernel package is downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into
a cache (``$PYKVM_CACHE`` or ``~/.cache/pykvm``) — never installed on the host. Besides the
``vmlinuz`` (a bzImage), pykvm extracts the uncompressed ``vmlinux`` from it: an ELF with a PVH
entry note, which boots without running the decompressor (on kvm_pvm, where the decompressor is
emulated, that saves minutes).
"""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import PykvmError

META_PACKAGE = "linux-image-amd64"
XZ_MAGIC = b"\xfd7zXZ\x00"


class FetchError(PykvmError):
    exit_status = 2


def cache_dir() -> Path:
    """Where fetched files are kept: $PYKVM_CACHE, else ~/.cache/pykvm."""
    return Path(os.environ.get("PYKVM_CACHE") or Path.home() / ".cache" / "pykvm")


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]} is not installed: `pykvm fetch` needs Debian's apt-get and dpkg-deb") from None
    if proc.returncode:
        raise FetchError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned kernel package the distribution's meta-package points at."""
    out = _run(["apt-cache", "depends", META_PACKAGE])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split()[1]
    raise FetchError(f"apt-cache does not know {META_PACKAGE}: run `apt-get update` first")


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage whose payload is xz-compressed (Debian's choice)."""
    start = vmlinuz.find(XZ_MAGIC)
    while start >= 0:
        try:
            elf = lzma.LZMADecompressor().decompress(vmlinuz[start:])
        except lzma.LZMAError:
            elf = b""
        if elf[:4] == b"\x7fELF":
            return elf
        start = vmlinuz.find(XZ_MAGIC, start + 1)
    raise FetchError("no xz-compressed ELF kernel found inside the vmlinuz")


def fetch_linux() -> tuple[Path, Path]:
    """Download (once) and unpack Debian's kernel; return (vmlinuz, vmlinux) paths."""
    package = kernel_package()
    root = cache_dir() / "debian" / package
    vmlinux = root / "vmlinux"
    found = sorted((root / "boot").glob("vmlinuz-*")) if root.exists() else []
    if not found:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            if out.returncode and os.geteuid() == 0:
                _run(["apt-get", "update", "-qq"])
                out = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            if out.returncode:
                raise FetchError(f"apt-get download {package} failed: {out.stderr.strip()[-300:]}")
            (deb,) = Path(tmp).glob("*.deb")
            staging = root.parent / f"{root.name}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            _run(["dpkg-deb", "-x", str(deb), str(staging)])
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)
        found = sorted((root / "boot").glob("vmlinuz-*"))
        if not found:
            raise FetchError(f"{package} holds no boot/vmlinuz-*")
    vmlinuz = found[0]
    if not vmlinux.exists():
        tmp_path = root / "vmlinux.tmp"
        tmp_path.write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        tmp_path.rename(vmlinux)
    return vmlinuz, vmlinux
