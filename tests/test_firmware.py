"""The reset-vector firmware (firmware/pykvm-fw.bin): a reproducible image, and a payload booted
through it sees exactly the machine pykvm's direct boot gives it.

- the committed image is what `make -C firmware` builds, 64 KiB with a jump at the reset vector;
- every hello guest this host can run prints the same two lines through the firmware as directly;
- a one-byte `hlt` payload halts with the same registers, segments, control registers and the same
  GDT and page tables in RAM, whether the firmware built them or pykvm did;
- a missing or bad hand-off block ends the run with status 253 and a message on COM1;
- under QEMU TCG (if installed) all five modes, including paged32 and pae that kvm_pvm cannot run.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, backend, needs_kvm, run_pykvm

FIRMWARE_DIR = ROOT / "firmware"
IMAGE = FIRMWARE_DIR / "pykvm-fw.bin"
GUESTS = ROOT / "guests"
TOOLS = ("as", "ld", "objcopy", "make")

HANDOFF_ADDR = 0x6000
MAGIC = 0x4D564B50            # "PKVM"
MODES = {"real": 0, "prot32": 1, "paged32": 2, "pae": 3, "long64": 4}
FAIL_STATUS = (0x7E << 1) | 1   # the firmware writes 0x7e to the debug-exit port

# kvm_pvm supports paging only in long mode: paged32 and pae fail there however they are reached.
PAGING_WITHOUT_LONG_MODE = ("paged32", "pae")


def handoff(mode: int, entry: int, stack: int, magic: int = MAGIC) -> bytes:
    """The hand-off block as firmware/README.md documents it."""
    return struct.pack("<IIQQ", magic, mode, entry, stack)


def host_cannot(mode: str) -> bool:
    """kvm_pvm supports paging only in 64-bit long mode: there the firmware's own CR0.PG write in
    paged32/pae takes #GP and, with no IDT, the VM triple-faults. What such a mode looks like when it
    works is shown by test_firmware_under_qemu_tcg."""
    return mode in PAGING_WITHOUT_LONG_MODE and backend() == "kvm_pvm"


def assert_paging_refused(result_status: int, report: str) -> None:
    assert result_status == 4, report
    assert "triple fault" in report and "mov cr0, eax" in report, report


# --- the image ---------------------------------------------------------------------------------

def test_image_layout() -> None:
    image = IMAGE.read_bytes()
    assert len(image) == 0x10000, "the firmware must be exactly 64 KiB, mapped to end at 4 GiB"
    opcode = image[0xFFF0]
    assert opcode in (0xE9, 0xEB), f"offset 0xFFF0 (the reset vector) must be a jmp, not {opcode:#04x}"
    # Real mode, CS.base = 0xFFFF0000: the target is IP-relative and wraps inside the 64 KiB segment.
    if opcode == 0xE9:
        target = (0xFFF3 + struct.unpack_from("<h", image, 0xFFF1)[0]) & 0xFFFF
    else:
        target = (0xFFF2 + struct.unpack_from("<b", image, 0xFFF1)[0]) & 0xFFFF
    assert image[target] != 0xFF, f"the reset vector jumps to {target:#x}, which is unused ROM"


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"cannot rebuild the firmware: {', '.join(missing)} not on PATH (GNU binutils and make)")
    proc = subprocess.run(["make", "-C", str(FIRMWARE_DIR), f"OUT={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"make failed:\n{proc.stdout}\n{proc.stderr}"
    rebuilt = (tmp_path / "pykvm-fw.bin").read_bytes()
    assert rebuilt == IMAGE.read_bytes(), "firmware/pykvm-fw.bin differs from a rebuild (run `make -C firmware`)"


# --- booting through it on KVM -------------------------------------------------------------------

@needs_kvm
@pytest.mark.parametrize("mode", MODES)
def test_hello_through_firmware_prints_what_a_direct_boot_prints(mode: str) -> None:
    name = f"hello-{mode}"
    if host_cannot(mode):
        via = run_pykvm("run", "--firmware", str(IMAGE), name, "--timeout", "30")
        assert_paging_refused(via.returncode, via.stderr.decode())
        return
    direct = run_pykvm("run", name, "--timeout", "30")
    assert direct.returncode == 0, direct.stderr
    via = run_pykvm("run", "--firmware", str(IMAGE), name, "--timeout", "30")
    assert via.returncode == 0, via.stderr.decode()
    assert via.stdout == direct.stdout
    assert len(via.stdout.splitlines()) == 2 and via.stdout.startswith(b"Hello from ")


def _firmware_machine(out: bytearray):
    from pykvm.machine import Machine
    return Machine(mem_size=64 << 20, firmware=IMAGE.read_bytes(), serial_out=out.extend)


_SEGMENT_FIELDS = ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")
_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
         "r14", "r15", "rip", "rflags")


def _snapshot(machine, mode: str) -> dict:
    """Everything a payload could observe of the boot state (after its `hlt`: RIP = entry + 1)."""
    vcpu = machine.vcpus[0]
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    snap = {name: getattr(regs, name) for name in _REGS}
    for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        snap[seg] = {f: getattr(getattr(sregs, seg), f) for f in _SEGMENT_FIELDS}
    snap["gdtr"] = (sregs.gdt.base, sregs.gdt.limit)
    snap["idtr"] = (sregs.idt.base, sregs.idt.limit)
    for cr in ("cr0", "cr3", "cr4", "efer"):
        snap[cr] = getattr(sregs, cr)
    snap["gdt in RAM"] = machine.memory.read(0x500, 32)
    # The CPU sets accessed/dirty bits (0x20/0x40) in the entries its page walks use; the firmware
    # runs at 0xFFFFxxxx and walks entries a direct boot never touches. Compare all else.
    tables = bytearray(machine.memory.read(0x70000, 0x6000))
    for i in range(0, len(tables), 4 if mode == "paged32" else 8):   # the low byte of every entry
        tables[i] &= ~0x60 & 0xFF
    snap["page tables in RAM"] = bytes(tables)
    return snap


@needs_kvm
@pytest.mark.parametrize("mode,entry", [("real", 0x8000), ("real", 0x20000), ("prot32", 0x8000),
                                        ("paged32", 0x8000), ("pae", 0x8000), ("long64", 0x8000),
                                        ("long64", 0x200000)])
def test_firmware_builds_exactly_the_direct_boot_state(mode: str, entry: int) -> None:
    """No help from pykvm: the firmware alone writes the GDT and page tables and sets every register."""
    from pykvm.boot.flat import load_flat
    from pykvm.machine import Machine
    from pykvm.x86.modes import CpuMode

    hlt = b"\xf4"
    plan = load_flat(hlt, entry, CpuMode(mode), 64 << 20)
    direct = None
    if not host_cannot(mode):
        with Machine(mem_size=64 << 20) as m:
            m.load(plan)
            result = m.run(timeout=20)
            assert result.status == 0, result
            direct = _snapshot(m, mode)

    out = bytearray()
    with _firmware_machine(out) as m:
        m.memory.write(entry, hlt)                      # only the payload and the hand-off block:
        m.memory.write(HANDOFF_ADDR, handoff(MODES[mode], entry, 0x7000))   # not m.load(plan)
        result = m.run(timeout=20)
        if host_cannot(mode):
            assert_paging_refused(result.status, f"{result.reason}\n{result.report}")
            return
        assert result.status == 0, f"{result.reason}\n{result.report}\n{bytes(out)!r}"
        via = _snapshot(m, mode)

    assert out == b""
    differ = {k: (direct[k], via[k]) for k in direct if direct[k] != via[k]}
    assert not differ, f"direct boot vs firmware: {differ}"


@needs_kvm
@pytest.mark.parametrize("block,message", [
    (None, b"pykvm-fw: no hand-off block\n"),
    (handoff(4, 0x8000, 0x7000, magic=0x12345678), b"pykvm-fw: no hand-off block\n"),
    (handoff(5, 0x8000, 0x7000), b"pykvm-fw: bad mode in the hand-off block\n"),
    (handoff(0, 0x12345, 0x7000), b"pykvm-fw: entry or stack out of range for the mode\n"),
    (handoff(1, 0x1_0000_8000, 0x7000), b"pykvm-fw: entry or stack out of range for the mode\n"),
])
def test_bad_handoff_block(block: bytes | None, message: bytes) -> None:
    out = bytearray()
    with _firmware_machine(out) as m:
        if block is not None:
            m.memory.write(HANDOFF_ADDR, block)
        result = m.run(timeout=20)
    assert result.status == FAIL_STATUS == 253, result
    assert bytes(out) == message


# --- all five modes under QEMU's emulator --------------------------------------------------------

# What pykvm's direct boot makes the hello guests print (guests/README.md; the KVM tests above check
# it for the modes this host runs).
EXPECTED = {
    "real": "Hello from real mode!\ncr0=00000010 cr4=00000000 efer=00000000\n",
    "prot32": "Hello from 32-bit protected mode!\ncr0=00000011 cr4=00000000 efer=00000000\n",
    "paged32": "Hello from 32-bit paging!\ncr0=80000011 cr4=00000010 efer=00000000\n",
    "pae": "Hello from PAE paging!\ncr0=80000011 cr4=00000020 efer=00000000\n",
    "long64": "Hello from 64-bit long mode!\ncr0=80000011 cr4=00000020 efer=00000500\n",
}


@pytest.mark.parametrize("mode", MODES)
def test_firmware_under_qemu_tcg(mode: str, tmp_path: Path) -> None:
    """QEMU's TCG emulates 32-bit and PAE paging, which kvm_pvm cannot run: the firmware's paged32 and
    pae paths are exercised here. QEMU maps -bios to end at 4 GiB, like pykvm."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    block = tmp_path / "handoff.bin"
    block.write_bytes(handoff(MODES[mode], 0x8000, 0x7000))
    serial = tmp_path / "serial.txt"
    cmd = [qemu, "-accel", "tcg", "-M", "pc", "-m", "64", "-nodefaults", "-no-user-config",
           "-display", "none", "-no-reboot", "-bios", str(IMAGE), "-serial", f"file:{serial}",
           "-device", f"loader,file={block},addr={HANDOFF_ADDR:#x},force-raw=on",
           "-device", f"loader,file={GUESTS / f'hello-{mode}.bin'},addr=0x8000,force-raw=on",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
    # The guests end with `cli; hlt`, which QEMU just sits in: stop it once both lines are out.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    text = ""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            text = serial.read_text() if serial.exists() else ""
            if text.count("\n") >= 2:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    text = serial.read_text() if serial.exists() else ""
    assert text == EXPECTED[mode], f"QEMU said: {err.decode(errors='replace')}"
