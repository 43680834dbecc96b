"""Booting through pykvm's firmware (firmware/pykvm-fw.bin) instead of setting the CPU mode directly.

The firmware is mapped read-only so that it ends at 4 GiB, and the vCPU starts where a real CPU
does: real mode at 0xFFFFFFF0. The VMM still places the payload in RAM, and tells the firmware how
to enter it with a hand-off block (documented in firmware/README.md)::

    0x6000  u32 magic "PKVM"   u32 mode (0 real, 1 prot32, 2 paged32, 3 pae, 4 long64)
            u64 entry          u64 stack
            u64 rax, rbx, rsi  the registers a boot protocol passes (Multiboot EAX/EBX, Linux RSI)

The firmware then builds the same GDT, page tables and control registers pykvm's direct boot
would, so a payload sees the same machine either way.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import BootError
from ..x86.modes import CpuMode, CpuState

HANDOFF_ADDR = 0x6000
HANDOFF_MAGIC = 0x4D564B50   # "PKVM"
MODE_NUMBERS = {CpuMode.REAL: 0, CpuMode.PROT32: 1, CpuMode.PAGED32: 2, CpuMode.PAE: 3, CpuMode.LONG64: 4}
MAX_SIZE = 16 << 20


def handoff_block(cpu: CpuState) -> bytes:
    """The hand-off block for a payload that pykvm would otherwise enter in state ``cpu``."""
    entry = (cpu.cs.base + cpu.regs["rip"]) if cpu.mode is CpuMode.REAL else cpu.regs["rip"]
    regs = cpu.regs
    return struct.pack("<IIQQQQQ", HANDOFF_MAGIC, MODE_NUMBERS[cpu.mode], entry, regs["rsp"],
                       regs.get("rax", 0), regs.get("rbx", 0), regs.get("rsi", 0))


def read_firmware(path: str) -> bytes:
    """Read and check a firmware image: its last 16 bytes are the reset vector at 0xFFFFFFF0."""
    try:
        image = Path(path).read_bytes()
    except OSError as e:
        raise BootError(f"cannot read firmware {path}: {e.strerror}") from None
    if len(image) < 16 or len(image) % 4096 or len(image) > MAX_SIZE:
        raise BootError(f"firmware {path} is {len(image)} bytes: it must be a whole number of 4 KiB pages, "
                        f"at most {MAX_SIZE >> 20} MiB, ending with the reset vector")
    return image


def bundled_firmware() -> Path:
    """firmware/pykvm-fw.bin, from the installed package or the source checkout."""
    here = Path(__file__).resolve().parent.parent   # pykvm/
    installed = here / "firmware" / "pykvm-fw.bin"
    return installed if installed.exists() else here.parent / "firmware" / "pykvm-fw.bin"
