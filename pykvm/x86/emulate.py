"""Completing instructions KVM's emulator gives up on (KVM_EXIT_INTERNAL_ERROR, suberror 1).

KVM hands such an instruction back to user space. Where its architectural effect is simple, pykvm
performs it and resumes the guest; anything else is reported precisely (bytes, disassembly,
registers, mode). The set is deliberately small and documented:

=================  ==========================================================================
``int3`` (CC)      a trap: RIP moves past it, then #BP (vector 3, no error code) is injected so
                   the guest's own handler runs, exactly as the CPU would. If the IDT is empty
                   (limit 0) the guest is deliberately rebooting (Linux's reboot=t): a reset.
``fwait`` (9B)     with no x87 exception pending it does nothing: RIP moves past it.
=================  ==========================================================================

On hardware KVM this exit is rare (e.g. an MMIO access by an instruction KVM cannot emulate); on
the kvm_pvm backend all CPL0 code is emulated, so it comes up with ordinary kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

INT3 = 0xCC
FWAIT = 0x9B
BP_VECTOR = 3

# Prefixes that may precede an opcode without changing what int3 / fwait do.
_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3}


@dataclass
class Outcome:
    """What the fallback did: ``resumed`` (guest continues), or a run end with a reason."""

    resumed: bool
    reason: str = ""
    reset: bool = False


def complete(vcpu, insn: bytes) -> Outcome:
    """Try to complete the instruction whose bytes start ``insn`` at the vCPU's RIP."""
    i = 0
    while i < len(insn) and insn[i] in _PREFIXES:
        i += 1
    if i >= len(insn):
        return Outcome(False, "no instruction bytes")
    opcode, length = insn[i], i + 1
    if opcode == INT3:
        sregs = vcpu.get_sregs()
        if sregs.idt.limit == 0:
            return Outcome(False, "int3 with an empty IDT: the guest is forcing a reboot", reset=True)
        _advance(vcpu, length)
        inject_exception(vcpu, BP_VECTOR)
        return Outcome(True, "int3: #BP injected")
    if opcode == FWAIT:
        _advance(vcpu, length)
        return Outcome(True, "fwait: completed")
    return Outcome(False, "not an instruction pykvm completes")


def inject_exception(vcpu, vector: int) -> None:
    """Make ``vector`` (an exception without error code, e.g. #BP or #DB) the next thing the vCPU
    delivers through the guest's IDT (KVM_SET_VCPU_EVENTS, exception injected)."""
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = 0
    events.exception.error_code = 0
    events.flags = 0
    vcpu.set_vcpu_events(events)


def _advance(vcpu, length: int) -> None:
    regs = vcpu.get_regs()
    regs.rip += length
    vcpu.set_regs(regs)
