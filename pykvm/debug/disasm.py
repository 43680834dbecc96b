"""Disassembly of guest code with capstone, in the guest's current code size."""

from __future__ import annotations

import capstone

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
    lines = []
    for addr, raw, text in disassemble(code, address, bits, limit):
        arrow = "=>" if addr == mark else "  "
        lines.append(f"{arrow} {addr:#010x}: {raw.hex(' '):<30} {text}")
    if not lines:
        lines.append(f"   {address:#010x}: {code[:16].hex(' ')}  (not a valid instruction in {bits}-bit mode)")
    return "\n".join(lines)
