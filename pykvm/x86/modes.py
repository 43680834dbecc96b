"""The five CPU modes pykvm can start a guest in, and the exact state each one needs.

A real CPU reaches protected or long mode by running a sequence of instructions (load a GDT, set
CR0.PE, build page tables, set EFER.LME, set CR0.PG, far-jump). A VMM can skip the journey and
write the destination state straight into the vCPU: that is what :func:`initial_state` computes.
The GDT and page tables still have to exist in guest memory, because the guest may reload a
segment register or take a page walk at any time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from . import paging
from .registers import CR0, CR4, EFER, RFLAGS
from .segments import Segment, flat_gdt, real_mode_segment

# Where pykvm puts the structures a mode needs (guest-physical). Low memory, out of the way of
# the usual load addresses (0x7c00, 0x8000, 0x10000, 0x100000).
GDT_ADDR = 0x500
PAGE_TABLES_ADDR = 0x70000
PAGE_TABLES_END = 0x76000


class CpuMode(enum.Enum):
    """The CPU modes pykvm can enter a guest in (--mode)."""
    REAL = "real"
    PROT32 = "prot32"
    PAGED32 = "paged32"
    PAE = "pae"
    LONG64 = "long64"

    @property
    def description(self) -> str:
        """The mode in words, for messages."""
        return _DESCRIPTIONS[self]

    @property
    def bits(self) -> int:
        """Default code size, which is also what the disassembler needs."""
        return {CpuMode.REAL: 16, CpuMode.LONG64: 64}.get(self, 32)


_DESCRIPTIONS = {
    CpuMode.REAL: "real mode (16-bit, segment*16+offset, no protection)",
    CpuMode.PROT32: "32-bit protected mode, flat segments, paging off",
    CpuMode.PAGED32: "32-bit protected mode with 32-bit paging (4 MiB pages)",
    CpuMode.PAE: "32-bit protected mode with PAE paging (2 MiB pages)",
    CpuMode.LONG64: "64-bit long mode, 4-level paging (2 MiB pages)",
}


@dataclass
class CpuState:
    """Initial vCPU state: what KVM_SET_SREGS / KVM_SET_REGS are given before the first run."""

    mode: CpuMode
    cs: Segment
    ds: Segment
    gdt: tuple[int, int] = (0, 0xFFFF)     # (base, limit)
    idt: tuple[int, int] = (0, 0)          # limit 0: any exception triple-faults (a clean SHUTDOWN)
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    regs: dict[str, int] = field(default_factory=dict)   # rip, rsp, rflags, rax, rbx, rsi, ...


def initial_state(mode: CpuMode, entry: int, stack: int) -> tuple[CpuState, list[tuple[int, bytes]]]:
    """The vCPU state for ``mode`` entered at ``entry``, plus the memory it relies on.

    Returns ``(state, writes)``; writes are (guest-physical address, bytes) for the GDT and the
    page tables. Interrupts are off (RFLAGS.IF = 0) and there is no IDT.
    """
    regs = {"rip": entry, "rsp": stack, "rflags": int(RFLAGS.FIXED)}
    if mode is CpuMode.REAL:
        # CS:IP must reach ``entry``: use segment 0 below 64 KiB (as a boot sector expects),
        # otherwise the paragraph that holds it.
        if entry < 0x10000:
            seg = 0
        else:
            if entry % 16 or entry >= 0x100000:
                raise ValueError(f"real-mode entry {entry:#x} must be below 1 MiB and 16-byte aligned")
            seg = entry >> 4
        regs["rip"] = entry - (seg << 4)
        regs["rsp"] = stack & 0xFFFF if seg == 0 else 0xFFFE
        state = CpuState(mode, cs=real_mode_segment(seg, code=True), ds=real_mode_segment(seg),
                         cr0=int(CR0.ET), regs=regs)
        return state, []

    long_mode = mode is CpuMode.LONG64
    gdt, code, data = flat_gdt(long_mode)
    writes = [(GDT_ADDR, gdt)]
    cr0 = CR0.PE | CR0.ET       # segments come from descriptors now
    cr3 = cr4 = efer = 0
    if mode is CpuMode.PAGED32:
        cr3, tables = paging.paging32(PAGE_TABLES_ADDR)
        cr4 = CR4.PSE           # the directory's PS bit means a 4 MiB page
        cr0 |= CR0.PG
    elif mode is CpuMode.PAE:
        cr3, tables = paging.paging_pae(PAGE_TABLES_ADDR)
        cr4 = CR4.PAE
        cr0 |= CR0.PG
    elif mode is CpuMode.LONG64:
        cr3, tables = paging.paging_long(PAGE_TABLES_ADDR)
        cr4 = CR4.PAE           # long mode requires PAE-format tables
        efer = EFER.LME | EFER.LMA
        cr0 |= CR0.PG
    else:
        tables = []
    state = CpuState(mode, cs=code, ds=data, gdt=(GDT_ADDR, len(gdt) - 1), cr0=int(cr0),
                     cr3=cr3, cr4=int(cr4), efer=int(efer), regs=regs)
    return state, writes + tables


def reserved_ranges(mode: CpuMode) -> list[tuple[int, int, str]]:
    """Guest-physical (start, end, what) ranges :func:`initial_state` writes for ``mode``."""
    if mode is CpuMode.REAL:
        return []
    ranges = [(GDT_ADDR, GDT_ADDR + 32, "the boot GDT")]
    size = {CpuMode.PAGED32: 0x1000, CpuMode.PAE: 0x5000, CpuMode.LONG64: 0x6000}.get(mode)
    if size:
        ranges.append((PAGE_TABLES_ADDR, PAGE_TABLES_ADDR + size, "the boot page tables"))
    return ranges


def mode_of(cr0: int, cr4: int, efer: int, cs_l: int) -> str:
    """Name the mode a vCPU is in from its control registers (for reports)."""
    if not cr0 & CR0.PE:
        return "real mode"
    if efer & EFER.LMA:
        return "64-bit long mode" if cs_l else "compatibility mode (32-bit code under long mode)"
    if not cr0 & CR0.PG:
        return "32-bit protected mode"
    return "32-bit protected mode, PAE paging" if cr4 & CR4.PAE else "32-bit protected mode, 32-bit paging"


def code_bits(sregs) -> int:
    """16, 32 or 64: the default code size of a vCPU with special registers ``sregs`` (SDM 3.4.5:
    CS.L in IA-32e mode, else CS.D; real mode is 16)."""
    if not sregs.cr0 & CR0.PE:
        return 16
    if sregs.efer & EFER.LMA and sregs.cs.l:
        return 64
    return 32 if sregs.cs.db else 16


def linear_rip(regs, sregs) -> int:
    """CS.base + RIP, wrapped to the code size (64 or 32 bits): the linear address of the next
    instruction."""
    mask = 0xFFFF_FFFF_FFFF_FFFF if code_bits(sregs) == 64 else 0xFFFF_FFFF
    return (sregs.cs.base + regs.rip) & mask
