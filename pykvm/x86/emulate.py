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

This module only decides (no I/O, as all of pykvm.x86): :func:`complete` returns an
:class:`Outcome` (advance RIP by n bytes, inject an exception, reset, or give up), and the
machine applies it to the vCPU. On hardware KVM this exit is rare (e.g. an MMIO access by an
instruction KVM cannot emulate); on the kvm_pvm backend all CPL0 code is emulated, so it comes up
with ordinary kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registers import INT3, Vector

FWAIT = 0x9B

# Prefixes that may precede an opcode without changing what int3 / fwait do.
_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3}


@dataclass(frozen=True)
class Outcome:
    """What to do with the vCPU: ``resumed`` (advance RIP by ``advance`` bytes, then inject
    exception ``inject`` if not None, and run on), or end the run (``reset`` or a failure)."""

    resumed: bool
    reason: str = ""
    reset: bool = False
    advance: int = 0
    inject: int | None = None


def complete(insn: bytes, idt_limit: int) -> Outcome:
    """Decide how to complete the instruction whose bytes start ``insn`` (at RIP).

    ``idt_limit`` is the guest's IDTR limit (0: no IDT, so an exception would triple-fault)."""
    i = 0
    while i < len(insn) and insn[i] in _PREFIXES:
        i += 1
    if i >= len(insn):
        return Outcome(False, "no instruction bytes")
    opcode, length = insn[i], i + 1
    if opcode == INT3:
        if idt_limit == 0:
            return Outcome(False, "int3 with an empty IDT: the guest is forcing a reboot", reset=True)
        return Outcome(True, "int3: #BP injected", advance=length, inject=Vector.BP)
    if opcode == FWAIT:
        return Outcome(True, "fwait: completed", advance=length)
    return Outcome(False, "not an instruction pykvm completes")
