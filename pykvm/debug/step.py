"""``--step N``: what a single-stepped vCPU did, one line per instruction.

:class:`DebugControl` (pykvm/debug/control.py) runs the vCPU with KVM_GUESTDBG_SINGLESTEP and calls
:meth:`StepPrinter.step` after each single-step trap (#DB with DR6.BS, Intel SDM vol. 3 §17.3.1.4);
this module only formats: the instruction's linear address, bytes and disassembly, then the
registers it changed (RIP only when it did not simply advance past the instruction).
"""

from __future__ import annotations

from collections.abc import Callable

from ..x86.modes import code_bits, linear_rip, mode_of
from .disasm import decode, text_of
from .vmem import read_virtual

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15", "rflags")
SYSTEM = ("cr0", "cr3", "cr4", "efer")
MAX_INSTRUCTION = 15          # bytes: the longest x86 instruction (SDM vol. 2 §2.3.11)


def instruction_at(memory, regs, sregs):
    """(linear RIP, capstone instruction at it, or None when its bytes are unmapped or undecodable)."""
    linear, bits = linear_rip(regs, sregs), code_bits(sregs)
    code = read_virtual(memory, (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer), linear, MAX_INSTRUCTION)
    # 16-bit code is decoded at its offset in CS, so jump targets read as the IP values they are
    return linear, (decode(code, regs.rip if bits == 16 else linear, bits) if code else None)


def register_snapshot(regs, sregs) -> dict[str, int]:
    """The registers a step line compares: GPRs, RFLAGS, RIP, CR0/3/4, EFER, CS selector, code bits."""
    snap = {name: getattr(regs, name) for name in GPRS}
    snap["rip"] = regs.rip
    snap.update({name: getattr(sregs, name) for name in SYSTEM})
    snap["cs"] = sregs.cs.selector
    snap["bits"] = code_bits(sregs)
    return snap


class StepPrinter:
    """Formats ``--step`` lines for any number of vCPUs and hands each to ``say`` (one line, no newline)."""

    def __init__(self, memory, say: Callable[[str], None]) -> None:
        self.memory = memory
        self.say = say
        self.count = 0                       # steps printed, over every vCPU
        self._last: dict[int, tuple] = {}    # vCPU -> (registers, (linear, instruction)) before its step

    def begin(self, vcpu, steps: int) -> None:
        """Say that ``vcpu`` will be stepped ``steps`` times, with its mode and all its registers."""
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        self.say(f"single-stepping vCPU {vcpu.id} for {steps} instructions "
                 f"(KVM_SET_GUEST_DEBUG, SINGLESTEP); {mode_of(sregs.cr0, sregs.cr4, sregs.efer, sregs.cs.l)}")
        self.say("  " + " ".join(f"{name}={getattr(regs, name):#x}" for name in GPRS)
                 + f" rip={regs.rip:#x} cs={sregs.cs.selector:#x} "
                 + " ".join(f"{name}={getattr(sregs, name):#x}" for name in SYSTEM))
        self._last[vcpu.id] = (register_snapshot(regs, sregs), instruction_at(self.memory, regs, sregs))

    def step(self, vcpu) -> None:
        """After one single-step trap: the instruction ``vcpu`` executed and the registers it changed."""
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        before, (linear, insn) = self._last[vcpu.id]
        after = register_snapshot(regs, sregs)
        self.count += 1
        where = f"{linear:#x}: {insn.bytes.hex(' '):<27} {text_of(insn, before['bits'])}" if insn \
            else f"{linear:#x}: (unreadable)"
        changed = [f"{name}={after[name]:#x}" for name in after
                   if name not in ("rip", "bits") and after[name] != before[name]]
        if insn is None or after["rip"] != before["rip"] + insn.size:   # a jump, or a lost step
            changed.append(f"rip={after['rip']:#x}")
        if after["bits"] != before["bits"]:
            changed.append(f"(now {mode_of(sregs.cr0, sregs.cr4, sregs.efer, sregs.cs.l)})")
        self.say(f"step {self.count:>4}  {where:<66} {' '.join(changed)}".rstrip())
        self._last[vcpu.id] = (after, instruction_at(self.memory, regs, sregs))

    def done(self, vcpu) -> None:
        """Say that ``vcpu``'s stepping is over and it runs on normally."""
        self._last.pop(vcpu.id, None)
        self.say(f"stepped {self.count} instructions; vCPU {vcpu.id} continues normally")
