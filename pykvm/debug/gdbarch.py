"""The x86 register files as gdb sees them: target descriptions and the ``g``/``p`` encodings.

gdb learns the register set from a *target description* (an XML document fetched with
``qXfer:features:read:target.xml``); after that, ``g`` returns every register in the order of
the description, each little-endian, with the width the description gives. pykvm describes:

* ``i386:x86-64`` (a guest in 64-bit mode at connect time): the standard features
  ``org.gnu.gdb.i386.core`` (rax..r15, rip, eflags, segment selectors, x87), ``org.gnu.gdb.i386.sse``
  (xmm0-15, mxcsr), ``org.gnu.gdb.i386.segments`` (fs_base, gs_base);
* ``i386`` (32-bit protected mode) and ``i8086`` (real mode, so gdb disassembles 16-bit code),
  with eax..edi, eip, xmm0-7;
* and in both a pykvm feature ``org.pykvm.x86.sys`` with cr0, cr2, cr3, cr4, cr8 and efer, so
  ``info registers cr0`` works.

The values come from KVM_GET_REGS / KVM_GET_SREGS / KVM_GET_FPU (:class:`VcpuState`); writing a
register changes the matching struct, and only the structs that changed are written back.
Segment selectors are read-only here: loading a selector means loading a descriptor, which a
debugger should not do behind the guest's back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from ..x86.modes import code_bits
from ..x86.registers import CR0

_EFLAGS = [("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10),
           ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21)]
_MXCSR = [("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7), ("DM", 8),
          ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15)]
_X87_CONTROL = ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
_SEGMENTS = ["cs", "ss", "ds", "es", "fs", "gs"]


@dataclass(frozen=True)
class Reg:
    """One register of a description: its gdb name, width, type, and where its value lives."""

    name: str
    bits: int
    type: str
    feature: str
    source: tuple          # ("gpr", field, width) ("seg", name) ("base", name) ("sys", field) ...
    group: str | None = None


@dataclass
class Arch:
    name: str               # the <architecture> of the description
    regs: list[Reg] = field(default_factory=list)

    @property
    def bits(self) -> int:
        """64 for i386:x86-64, else 32."""
        return 64 if self.name == "i386:x86-64" else 32

    def number(self, name: str) -> int:
        """gdb's register number of register ``name`` (StopIteration if this arch has none)."""
        return next(i for i, r in enumerate(self.regs) if r.name == name)

    @property
    def pc(self) -> int:
        """gdb's register number of the program counter (rip or eip)."""
        return self.number("rip" if self.bits == 64 else "eip")

    def g_size(self) -> int:
        """Bytes in a ``g`` packet's register block (every register, little-endian)."""
        return sum(r.bits // 8 for r in self.regs)


def _build(name: str) -> Arch:
    arch = Arch(name)
    core, sse = "org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse"
    add = arch.regs.append
    if name == "i386:x86-64":
        for reg in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"):
            add(Reg(reg, 64, "data_ptr" if reg in ("rbp", "rsp") else "int64", core, ("gpr", reg, 64)))
        for i in range(8, 16):
            add(Reg(f"r{i}", 64, "int64", core, ("gpr", f"r{i}", 64)))
        add(Reg("rip", 64, "code_ptr", core, ("gpr", "rip", 64)))
        nxmm = 16
    else:
        # i386 order: eax ecx edx ebx esp ebp esi edi (as the CPU numbers them)
        for reg in ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di"):
            add(Reg(f"e{reg}", 32, "data_ptr" if reg in ("sp", "bp") else "int32", core, ("gpr", f"r{reg}", 32)))
        add(Reg("eip", 32, "code_ptr", core, ("gpr", "rip", 32)))
        nxmm = 8
    add(Reg("eflags", 32, "i386_eflags", core, ("gpr", "rflags", 32)))
    for seg in _SEGMENTS:
        add(Reg(seg, 32, "int32", core, ("seg", seg)))
    for i in range(8):
        add(Reg(f"st{i}", 80, "i387_ext", core, ("st", i)))
    for reg in _X87_CONTROL:
        add(Reg(reg, 32, "int", core, ("x87", reg), "float"))
    for i in range(nxmm):
        add(Reg(f"xmm{i}", 128, "vec128", sse, ("xmm", i)))
    add(Reg("mxcsr", 32, "i386_mxcsr", sse, ("mxcsr",), "vector"))
    if name == "i386:x86-64":
        for seg in ("fs", "gs"):
            add(Reg(f"{seg}_base", 64, "int", "org.gnu.gdb.i386.segments", ("base", seg)))
    for reg in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        add(Reg(reg, 64 if name == "i386:x86-64" else 32, "int", "org.pykvm.x86.sys", ("sys", reg), "system"))
    return arch


AMD64 = _build("i386:x86-64")
I386 = _build("i386")
I8086 = _build("i8086")


def arch_for(sregs) -> Arch:
    """The description matching the vCPU's mode: 64-bit code, real mode, else 32-bit."""
    bits = code_bits(sregs)
    return AMD64 if bits == 64 else I8086 if not sregs.cr0 & CR0.PE else I386


def target_xml(arch: Arch) -> str:
    """The target description document for ``arch``."""
    features: dict[str, list[str]] = {}
    for number, reg in enumerate(arch.regs):
        group = f' group="{reg.group}"' if reg.group else ""
        features.setdefault(reg.feature, []).append(
            f'    <reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" regnum="{number}"{group}/>')
    types = {
        "org.gnu.gdb.i386.core": [_flags("i386_eflags", _EFLAGS)],
        "org.gnu.gdb.i386.sse": [
            '    <vector id="v4f" type="ieee_single" count="4"/>',
            '    <vector id="v2d" type="ieee_double" count="2"/>',
            '    <vector id="v16i8" type="int8" count="16"/>',
            '    <vector id="v8i16" type="int16" count="8"/>',
            '    <vector id="v4i32" type="int32" count="4"/>',
            '    <vector id="v2i64" type="int64" count="2"/>',
            '    <union id="vec128">\n' + "\n".join(
                f'      <field name="{n}" type="{t}"/>' for n, t in (
                    ("v4_float", "v4f"), ("v2_double", "v2d"), ("v16_int8", "v16i8"), ("v8_int16", "v8i16"),
                    ("v4_int32", "v4i32"), ("v2_int64", "v2i64"), ("uint128", "uint128"))) + "\n    </union>",
            _flags("i386_mxcsr", _MXCSR)],
    }
    parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
             f"  <architecture>{escape(arch.name)}</architecture>",
             "  <osabi>none</osabi>"]          # bare metal: no OS ABI (gdb would assume GNU/Linux)
    for feature, regs in features.items():
        parts.append(f'  <feature name="{feature}">')
        parts.extend(types.get(feature, []))
        parts.extend(regs)
        parts.append("  </feature>")
    parts.append("</target>")
    return "\n".join(parts) + "\n"


def _flags(name: str, fields: list[tuple[str, int]]) -> str:
    lines = [f'    <flags id="{name}" size="4">']
    lines += [f'      <field name="{n}" start="{bit}" end="{bit}"/>' for n, bit in fields]
    return "\n".join(lines + ["    </flags>"])


# --- values ---------------------------------------------------------------------------------
@dataclass
class VcpuState:
    """One vCPU's registers as KVM gives them (cffi structs), and which ones were changed."""

    regs: object
    sregs: object
    fpu: object
    dirty: set[str] = field(default_factory=set)    # of "regs", "sregs", "fpu"


class RegisterError(ValueError):
    """A register number gdb sent that this description does not have, or a value it cannot set."""


def read_register(arch: Arch, state: VcpuState, number: int) -> bytes:
    """Register ``number`` as gdb's ``p`` packet wants it (little-endian); RegisterError if none."""
    if not 0 <= number < len(arch.regs):
        raise RegisterError(f"no register {number}")
    reg = arch.regs[number]
    return _get(reg, state).to_bytes(reg.bits // 8, "little")


def read_all(arch: Arch, state: VcpuState) -> bytes:
    """Every register concatenated, as gdb's ``g`` packet wants them."""
    return b"".join(read_register(arch, state, n) for n in range(len(arch.regs)))


def write_register(arch: Arch, state: VcpuState, number: int, raw: bytes) -> None:
    """Set register ``number`` from ``raw`` (its exact width, little-endian); RegisterError otherwise."""
    if not 0 <= number < len(arch.regs):
        raise RegisterError(f"no register {number}")
    reg = arch.regs[number]
    if len(raw) != reg.bits // 8:
        raise RegisterError(f"{reg.name} is {reg.bits // 8} bytes, not {len(raw)}")
    _set(reg, state, int.from_bytes(raw, "little"))


def write_all(arch: Arch, state: VcpuState, raw: bytes) -> None:
    """A ``G`` packet: every register; unchanged segment selectors are accepted, changed ones refused."""
    if len(raw) != arch.g_size():
        raise RegisterError(f"G packet of {len(raw)} bytes; the description has {arch.g_size()}")
    offset = 0
    for number, reg in enumerate(arch.regs):
        size = reg.bits // 8
        value = raw[offset:offset + size]
        offset += size
        if reg.source[0] == "seg" and value == read_register(arch, state, number):
            continue
        write_register(arch, state, number, value)


def _get(reg: Reg, state: VcpuState) -> int:
    kind = reg.source[0]
    regs, sregs, fpu = state.regs, state.sregs, state.fpu
    if kind == "gpr":
        return getattr(regs, reg.source[1]) & ((1 << reg.source[2]) - 1)
    if kind == "seg":
        return getattr(sregs, reg.source[1]).selector
    if kind == "base":
        return getattr(sregs, reg.source[1]).base
    if kind == "sys":
        return getattr(sregs, reg.source[1]) & ((1 << reg.bits) - 1)
    if kind == "st":
        return int.from_bytes(bytes(fpu.fpr[reg.source[1]][0:10]), "little")
    if kind == "xmm":
        return int.from_bytes(bytes(fpu.xmm[reg.source[1]][0:16]), "little")
    if kind == "mxcsr":
        return fpu.mxcsr
    name = reg.source[1]   # x87 control registers
    if name == "fctrl":
        return fpu.fcw
    if name == "fstat":
        return fpu.fsw
    if name == "ftag":
        return full_tag_word(fpu)
    if name == "fiseg":
        return (fpu.last_ip >> 32) & 0xFFFF
    if name == "fioff":
        return fpu.last_ip & 0xFFFF_FFFF
    if name == "foseg":
        return (fpu.last_dp >> 32) & 0xFFFF
    if name == "fooff":
        return fpu.last_dp & 0xFFFF_FFFF
    return fpu.last_opcode & 0x7FF   # fop


def _set(reg: Reg, state: VcpuState, value: int) -> None:
    kind = reg.source[0]
    regs, sregs, fpu = state.regs, state.sregs, state.fpu
    if kind == "gpr":
        setattr(regs, reg.source[1], value)     # 32-bit registers zero-extend, as the CPU does
        state.dirty.add("regs")
    elif kind == "seg":
        if value != getattr(sregs, reg.source[1]).selector:
            raise RegisterError(f"{reg.name}: pykvm does not load segment selectors from the debugger")
    elif kind == "base":
        getattr(sregs, reg.source[1]).base = value
        state.dirty.add("sregs")
    elif kind == "sys":
        setattr(sregs, reg.source[1], value)
        state.dirty.add("sregs")
    elif kind == "st":
        fpu.fpr[reg.source[1]][0:10] = list(value.to_bytes(10, "little"))
        state.dirty.add("fpu")
    elif kind == "xmm":
        fpu.xmm[reg.source[1]][0:16] = list(value.to_bytes(16, "little"))
        state.dirty.add("fpu")
    elif kind == "mxcsr":
        fpu.mxcsr = value
        state.dirty.add("fpu")
    else:
        name = reg.source[1]
        if name == "fctrl":
            fpu.fcw = value & 0xFFFF
        elif name == "fstat":
            fpu.fsw = value & 0xFFFF
        elif name == "ftag":
            fpu.ftwx = abridged_tag_word(value)
        elif name == "fiseg":
            fpu.last_ip = (fpu.last_ip & 0xFFFF_FFFF) | ((value & 0xFFFF) << 32)
        elif name == "fioff":
            fpu.last_ip = (fpu.last_ip & ~0xFFFF_FFFF) | (value & 0xFFFF_FFFF)
        elif name == "foseg":
            fpu.last_dp = (fpu.last_dp & 0xFFFF_FFFF) | ((value & 0xFFFF) << 32)
        elif name == "fooff":
            fpu.last_dp = (fpu.last_dp & ~0xFFFF_FFFF) | (value & 0xFFFF_FFFF)
        else:
            fpu.last_opcode = value & 0x7FF
        state.dirty.add("fpu")


def full_tag_word(fpu) -> int:
    """The x87 tag word (2 bits per physical register) from FXSAVE's abridged one (1 bit: empty
    or not), classifying each non-empty register by its contents as the CPU would."""
    top = (fpu.fsw >> 11) & 7
    tag = 0
    for phys in range(8):
        if not fpu.ftwx & (1 << phys):
            t = 3                                                    # empty
        else:
            raw = bytes(fpu.fpr[(phys - top) & 7][0:10])              # fpr[i] is ST(i)
            mantissa = int.from_bytes(raw[:8], "little")
            exponent = int.from_bytes(raw[8:10], "little") & 0x7FFF
            if exponent == 0x7FFF:
                t = 2                                                # special: inf, NaN
            elif exponent == 0:
                t = 1 if mantissa == 0 else 2                        # zero, or denormal
            else:
                t = 0 if mantissa >> 63 else 2                       # valid, or unnormal
        tag |= t << (2 * phys)
    return tag


def abridged_tag_word(tag: int) -> int:
    """The FXSAVE abridged tag byte (1 bit per x87 register) of a full 16-bit FTW (SDM vol. 1 §10.5.1)."""
    return sum(1 << phys for phys in range(8) if (tag >> (2 * phys)) & 3 != 3)
