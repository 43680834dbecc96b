"""The report printed when a run ends abnormally: registers, CPU mode, and the code at RIP."""

from __future__ import annotations

from ..memory import GuestMemoryError
from ..x86.modes import code_bits, linear_rip, mode_of
from ..x86.paging import PageFault, translate
from .disasm import format_listing

__all__ = ["code_at_rip", "code_bits", "describe_vcpu"]   # code_bits: re-exported from pykvm.x86.modes


def describe_vcpu(vcpu, memory) -> str:
    """The crash report of a vCPU: mode, registers, control registers and the code at RIP."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    r = regs
    lines = [
        f"vCPU {vcpu.id} in {mode_of(sregs.cr0, sregs.cr4, sregs.efer, sregs.cs.l)}",
        f"  rax={r.rax:016x} rbx={r.rbx:016x} rcx={r.rcx:016x} rdx={r.rdx:016x}",
        f"  rsi={r.rsi:016x} rdi={r.rdi:016x} rsp={r.rsp:016x} rbp={r.rbp:016x}",
        f"  r8 ={r.r8:016x} r9 ={r.r9:016x} r10={r.r10:016x} r11={r.r11:016x}",
        f"  r12={r.r12:016x} r13={r.r13:016x} r14={r.r14:016x} r15={r.r15:016x}",
        f"  rip={r.rip:016x} rflags={r.rflags:08x}",
        f"  cs={sregs.cs.selector:04x} (base {sregs.cs.base:#x}) ds={sregs.ds.selector:04x} "
        f"ss={sregs.ss.selector:04x} gdt={sregs.gdt.base:#x}/{sregs.gdt.limit:#x} "
        f"idt={sregs.idt.base:#x}/{sregs.idt.limit:#x}",
        f"  cr0={sregs.cr0:08x} cr2={sregs.cr2:016x} cr3={sregs.cr3:016x} cr4={sregs.cr4:08x} "
        f"efer={sregs.efer:x}",
    ]
    bits = code_bits(sregs)
    try:
        linear, code, phys = code_at_rip(vcpu, memory, 64, regs, sregs)
    except (PageFault, GuestMemoryError) as e:   # RIP may point anywhere
        lines.append(f"  code at rip: unreadable ({e})")
    else:
        lines.append(f"  code at rip ({bits}-bit, linear {linear:#x} = physical {phys:#x}):")
        lines.append(format_listing(code, linear, bits, limit=6, mark=linear))
    return "\n".join(lines)


def code_at_rip(vcpu, memory, n: int, regs=None, sregs=None) -> tuple[int, bytes, int]:
    """(linear address, up to n code bytes, physical address) at the vCPU's CS:RIP, read through
    the guest's own page tables. Raises PageFault or GuestMemoryError if RIP is not mapped."""
    regs = regs or vcpu.get_regs()
    sregs = sregs or vcpu.get_sregs()
    linear = linear_rip(regs, sregs)
    phys = translate(memory, linear, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer)
    return linear, memory.read(phys, _readable(memory, phys, n)), phys


def _readable(memory, gpa: int, n: int) -> int:
    """The largest length <= n that can be read at gpa (code near the end of RAM)."""
    while n > 1 and not memory.contains(gpa, n):
        n //= 2
    return n
