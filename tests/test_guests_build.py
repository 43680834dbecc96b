"""The committed guest images in guests/ are exactly what their sources build to.

The .bin files are committed so an installed pykvm runs them without a toolchain;
these tests rebuild them from source with GNU as/ld into a temporary directory and
require byte-identical output, and check the exitloop parameter block that the
exit-latency benchmark patches.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

GUESTS = Path(__file__).resolve().parent.parent / "guests"
TOOLS = ("as", "ld", "objcopy", "make")

EXPECTED = {
    "hello-real.bin",
    "hello-prot32.bin",
    "hello-paged32.bin",
    "hello-pae.bin",
    "hello-long64.bin",
    "mmio.bin",
    "spin.bin",
    "exitloop.bin",
}


def committed() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(GUESTS.glob("*.bin"))}


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
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


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
    assert 2 + image[1] >= 16, "the jmp must land past the parameter block"
    count, kind = struct.unpack_from("<II", image, 8)
    assert (count, kind) == (1000, 0)
