"""Mutated images for every loader, loaded and run (issue 9, part 8): a flat binary, ELF32, ELF64,
a Multiboot kernel (guests/mbinfo.elf), a bzImage, a PVH vmlinux, an initrd, and firmware. Each
mutated image must give either one clear error whose status is 2 (a BootError/UsageError: one
paragraph naming the image), or a plan that then runs to a documented end (0, an odd debug-exit
status <= 255, 2, 4, 124) without a pykvm exception. Hypothesis draws the mutations
(derandomized: the same cases on every run); a few of them also go through the CLI, where the
status and the absence of a traceback are what a user sees. Counts: 30 loads per loader in-process, 16 CLI runs."""

from __future__ import annotations

import random
import struct

import pytest
from conftest import ROOT, needs_kvm, run_pykvm
from fuzz_guests import Tally, documented
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_boot_elf import FUZZ32, FUZZ64, mutated
from test_boot_linux import bzimage, pvh_kernel

from pykvm.boot.detect import load_kernel
from pykvm.boot.firmware import bundled_firmware, read_firmware
from pykvm.boot.flat import load_flat
from pykvm.errors import PykvmError
from pykvm.machine import Machine
from pykvm.x86.modes import CpuMode

pytestmark = needs_kvm
MEM = 32 << 20
TIMEOUT = 0.3
MBINFO = (ROOT / "guests" / "mbinfo.elf").read_bytes()
HELLO = (ROOT / "guests" / "hello-long64.bin").read_bytes()
FIRMWARE = bundled_firmware().read_bytes()
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TALLIES: dict[str, Tally] = {}


def _sink(_data: bytes) -> None:
    pass


def load_and_run(loader: str, load, firmware: bytes | None = None) -> None:
    """``load()`` makes a plan or raises a PykvmError; a plan is run to its end."""
    tally = TALLIES.setdefault(loader, Tally())
    try:
        plan = load()
    except PykvmError as e:
        message = str(e)
        assert e.exit_status == 2, f"{loader}: {type(e).__name__} with status {e.exit_status}: {message}"
        assert message and "\n\n" not in message and "Traceback" not in message
        tally.statuses["error 2"] += 1
        tally.reasons[message.split(":")[0][:40]] += 1
        return
    with Machine(mem_size=MEM, irqchip=plan.irqchip, serial_out=_sink, firmware=firmware) as machine:
        machine.load(plan)
        result = machine.run(timeout=TIMEOUT)
    tally.add(loader, result, 0.0, TIMEOUT)
    assert not tally.problems, tally.problems[-1]


@st.composite
def anywhere(draw, image: bytes) -> bytes:
    """``mutated`` with the magic bytes fair game too."""
    return draw(mutated(image, start=0))


@FUZZ
@given(image=anywhere(HELLO), mode=st.sampled_from([CpuMode.REAL, CpuMode.PROT32, CpuMode.LONG64]))
def test_mutated_flat_binaries(image, mode):
    load_and_run("flat", lambda: load_flat(image, 0x8000, mode, MEM, name="flat.bin"))


@FUZZ
@given(image=mutated(FUZZ32))
def test_mutated_elf32(image):
    load_and_run("ELF32", lambda: load_kernel(image, MEM, name="k32.elf"))


@FUZZ
@given(image=mutated(FUZZ64))
def test_mutated_elf64(image):
    load_and_run("ELF64", lambda: load_kernel(image, MEM, name="k64.elf"))


@FUZZ
@given(image=mutated(MBINFO), cmdline=st.text(max_size=40))
def test_mutated_multiboot_kernels(image, cmdline):
    load_and_run("Multiboot", lambda: load_kernel(image, MEM, name="mbinfo.elf", cmdline=cmdline,
                                                  modules=[("m", b"module", "args")]))


@FUZZ
@given(data=st.data())
def test_mutated_bzimages(data):
    image = bytearray(bzimage())
    for _ in range(data.draw(st.integers(1, 6))):
        image[data.draw(st.integers(0x1F1, 0x26F))] = data.draw(st.integers(0, 255))
    image = data.draw(mutated(bytes(image), start=0x1F1)) if data.draw(st.booleans()) else bytes(image)
    load_and_run("bzImage", lambda: load_kernel(image, MEM, name="bzImage", cmdline="console=ttyS0",
                                                initrd=b"initrd" * 100))


@FUZZ
@given(image=mutated(pvh_kernel()))
def test_mutated_pvh_kernels(image):
    load_and_run("PVH", lambda: load_kernel(image, MEM, name="vmlinux", initrd=b"x" * 4096))


@FUZZ
@given(size=st.sampled_from([0, 1, 4095, 1 << 20, MEM - 4096, MEM, MEM + 1]), which=st.sampled_from(["pvh", "bz"]))
def test_initrds_of_every_size(size, which):
    kernel = pvh_kernel() if which == "pvh" else bzimage()
    load_and_run("initrd", lambda: load_kernel(kernel, MEM, name=which, initrd=bytes(size)))


@FUZZ
@given(data=st.data())
def test_mutated_firmware(data, tmp_path_factory):
    image = data.draw(mutated(FIRMWARE, start=0)) if data.draw(st.booleans()) else FIRMWARE[:data.draw(
        st.sampled_from([0, 15, 16, 4096, len(FIRMWARE) - 1]))]
    path = tmp_path_factory.mktemp("fw") / "fw.bin"
    path.write_bytes(image)

    def load():
        firmware = read_firmware(str(path))
        load.firmware = firmware
        return load_flat(HELLO, 0x8000, CpuMode.LONG64, MEM, name="hello")
    load.firmware = None
    tally = TALLIES.setdefault("firmware", Tally())
    try:
        plan = load()
    except PykvmError as e:
        assert e.exit_status == 2 and "firmware" in str(e)
        tally.statuses["error 2"] += 1
        return
    with Machine(mem_size=MEM, serial_out=_sink, firmware=load.firmware) as machine:
        machine.load(plan)
        result = machine.run(timeout=TIMEOUT)
    tally.add("firmware", result, 0.0, TIMEOUT)
    assert not tally.problems, tally.problems[-1]


def test_zz_print_the_tallies():
    """Runs last in this file: what the mutated images did, per loader."""
    for loader, tally in TALLIES.items():
        print(f"\n{loader}: {dict(tally.statuses)}; {', '.join(f'{k} x{n}' for k, n in tally.reasons.most_common(4))}")


CLI_CASES = [("flat", HELLO, ["--mode", "long64"]), ("elf32", FUZZ32, ["--kernel"]), ("elf64", FUZZ64, ["--kernel"]),
             ("multiboot", MBINFO, ["--kernel"]), ("bzimage", bzimage(), ["--kernel"]),
             ("pvh", pvh_kernel(), ["--kernel"]), ("firmware", FIRMWARE, ["--firmware"]),
             ("initrd", b"", ["--initrd"])]


@pytest.mark.parametrize(("kind", "original", "how"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_mutated_images_through_the_cli(tmp_path, kind, original, how):
    rng = random.Random(f"cli/{kind}")
    for case in range(2):
        data = bytearray(original or b"\0" * 64)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data))
            if rng.random() < 0.5:
                data[pos] = rng.randrange(256)
            elif pos + 4 <= len(data):
                struct.pack_into("<I", data, pos, rng.choice([0, 0xFFFFFFFF, 0x80000000, rng.getrandbits(32)]))
        if case == 1:
            data = data[:rng.randrange(len(data) + 1)]
        path = tmp_path / f"{kind}-{case}"
        path.write_bytes(bytes(data))
        if how == ["--kernel"]:
            args = ["--kernel", str(path)]
        elif how == ["--firmware"]:
            args = ["--firmware", str(path), "--kernel", str(ROOT / "guests" / "hello-long64.bin")]
        elif how == ["--initrd"]:
            args = ["--kernel", str(tmp_path / "pvh"), "--initrd", str(path)]
            (tmp_path / "pvh").write_bytes(pvh_kernel())
        else:
            args = [str(path), *how]
        proc = run_pykvm("run", *args, "--timeout", "2", timeout=60)
        err = proc.stderr.decode(errors="replace")
        assert documented(proc.returncode), f"{kind} {case}: status {proc.returncode}: {err}"
        assert "Traceback" not in err, err
        if proc.returncode == 2:
            assert err.startswith("pykvm: ") and "\n\n" not in err.strip(), err
