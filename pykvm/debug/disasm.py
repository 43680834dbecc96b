"""Disassembly of guest code with capstone, in the guest's current code size."""

from __future__ import annotations

import capstone
from capstone import x86 as cs_x86

_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_engines: dict[int, capstone.Cs] = {}


def disassemble(code: bytes, address: int, bits: int, limit: int = 8) -> list[tuple[int, bytes, str]]:
    """Up to ``limit`` instructions as (address, bytes, "mnemonic operands")."""
    engine = _engines.get(bits)
    if engine is None:
        engine = _engines[bits] = capstone.Cs(capstone.CS_ARCH_X86, _MODES[bits])
    out = []
    for insn in engine.disasm(code, address):
        out.append((insn.address, bytes(insn.bytes), f"{insn.mnemonic} {insn.op_str}".strip()))
        if len(out) >= limit:
            break
    return out


def format_listing(code: bytes, address: int, bits: int, limit: int = 8, mark: int | None = None) -> str:
    """Up to ``limit`` instructions, one per line, ``=>`` marking the one at ``mark``."""
    lines = []
    for addr, raw, text in disassemble(code, address, bits, limit):
        arrow = "=>" if addr == mark else "  "
        lines.append(f"{arrow} {addr:#010x}: {raw.hex(' '):<30} {text}")
    if not lines:
        lines.append(f"   {address:#010x}: {code[:16].hex(' ')}  (not a valid instruction in {bits}-bit mode)")
    return "\n".join(lines)


_detail_engines: dict[int, capstone.Cs] = {}


def decode(code: bytes, address: int, bits: int):
    """The first instruction of ``code`` as a capstone instruction with operand details (for
    the tracer and the step guard), or None if the bytes are not a valid instruction."""
    engine = _detail_engines.get(bits)
    if engine is None:
        engine = _detail_engines[bits] = capstone.Cs(capstone.CS_ARCH_X86, _MODES[bits])
        engine.detail = True
    return next(engine.disasm(code, address, 1), None)


# Capstone groups of instructions that may not continue at the next sequential address.
_TRANSFERS = {capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_RET, capstone.CS_GRP_INT,
              capstone.CS_GRP_IRET}


def transfers_control(insn) -> bool:
    """True for jumps, calls, returns, software interrupts and their returns."""
    return any(g in _TRANSFERS for g in insn.groups) or insn.mnemonic in ("syscall", "sysret", "sysenter",
                                                                             "sysexit", "ud2", "hlt")


def text_of(insn, bits: int) -> str:
    """"mnemonic operands" of a decoded instruction. In 16-bit code a relative jump's target
    wraps at 64 KiB like IP does (capstone would print e.g. 0x10000 for IP 0)."""
    if bits == 16 and capstone.CS_GRP_BRANCH_RELATIVE in insn.groups:
        imms = [op.imm for op in insn.operands if op.type == cs_x86.X86_OP_IMM]
        if len(imms) == 1:
            return f"{insn.mnemonic} {imms[0] & 0xFFFF:#x}"
    return f"{insn.mnemonic} {insn.op_str}".strip()
