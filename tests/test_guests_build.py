"""The committed guest images in guests/ are exactly what their sources build to.

The .bin files (flat guests) and .elf files (Multiboot test kernels) are committed
so an installed pykvm runs them without a toolchain; these tests rebuild them from
source with GNU as/ld into a temporary directory and require byte-identical output,
check the exitloop parameter block that the exit-latency benchmark patches, and
check that the kernels are ELF32 images with a valid Multiboot v1 header.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

GUESTS = Path(__file__).resolve().parent.parent / "guests"
TOOLS = ("as", "ld", "objcopy", "make", "gcc")   # gcc: the freestanding C kernels (virtio-*)

EXPECTED = {
    "hello-real.bin",
    "hello-prot32.bin",
    "hello-paged32.bin",
    "hello-pae.bin",
    "hello-long64.bin",
    "mmio.bin",
    "spin.bin",
    "exitloop.bin",
    "int3.bin",
    "gdbtest.bin",
    "count.bin",
    "gdbtest.elf",
    "gdbalias.bin",
    "gdbalias.elf",
    "mbinfo.elf",
    "smp.elf",
    "rtc.elf",
    "virtio-net.elf",
    "virtio-blk.elf",
    "virtio-console.elf",
    "virtio-rng.elf",
}

KERNELS = ("mbinfo.elf", "smp.elf", "rtc.elf", "virtio-net.elf", "virtio-blk.elf", "virtio-console.elf",
           "virtio-rng.elf")


def images(folder: Path) -> dict[str, bytes]:
    """The built images in a folder: flat guests and Multiboot kernels."""
    paths = sorted([*folder.glob("*.bin"), *folder.glob("*.elf")])
    return {p.name: p.read_bytes() for p in paths}


def committed() -> dict[str, bytes]:
    return images(GUESTS)


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"cannot rebuild the guests: {', '.join(missing)} not on PATH (GNU binutils and make)")
    out = tmp_path_factory.mktemp("guests")
    proc = subprocess.run(
        ["make", "-C", str(GUESTS), f"OUT={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"make failed:\n{proc.stdout}\n{proc.stderr}"
    return images(out)


def test_committed_images_present() -> None:
    assert set(committed()) == EXPECTED


def test_rebuild_is_byte_identical(rebuilt: dict[str, bytes]) -> None:
    images = committed()
    assert set(rebuilt) == set(images)
    differ = sorted(name for name in images if images[name] != rebuilt[name])
    assert not differ, f"committed images differ from a rebuild (run `make -C guests`): {differ}"


def test_exitloop_parameter_block() -> None:
    image = (GUESTS / "exitloop.bin").read_bytes()
    assert image[0] == 0xEB, "offset 0 must be a short jmp over the parameter block"
    assert 2 + image[1] >= 20, "the jmp must land past the parameter block"
    count, kind, end = struct.unpack_from("<III", image, 8)
    assert (count, kind, end) == (1000, 0, 0)


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_is_multiboot_elf32(name: str) -> None:
    image = (GUESTS / name).read_bytes()
    # ELF32, little-endian, executable, i386: what QEMU's -kernel accepts as Multiboot
    assert image[:4] == b"\x7fELF" and image[4] == 1 and image[5] == 1
    e_type, e_machine = struct.unpack_from("<HH", image, 16)
    assert (e_type, e_machine) == (2, 3)
    (entry,) = struct.unpack_from("<I", image, 24)
    assert entry >= 0x100000, "the kernels are linked at 1 MiB"
    # the header: 4-byte aligned in the first 8 KiB, magic + flags + checksum == 0 (mod 2^32)
    for offset in range(0, 8192 - 12 + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, offset)
        if magic == 0x1BADB002:
            break
    else:
        pytest.fail("no Multiboot header in the first 8 KiB")
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert flags == 0x3, "page-align modules + memory info, no a.out kludge (bit 16)"
