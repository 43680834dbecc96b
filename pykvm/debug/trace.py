"""Exit tracing: one line per VM exit, with the guest instruction behind it.

``pykvm run ... --trace`` prints, for every exit the filter lets through, a line on stderr::

    vcpu0 IO     out port=0x3f8 size=1 value=0x48 'H'       rip=0x8029  0x8028: out dx, al

vCPU, exit reason, what the exit carries (port or guest-physical address, size, direction,
value), RIP, and the instruction at RIP disassembled with capstone in the vCPU's current code
size (16, 32 or 64 bit). KVM reports some exits after the instruction has completed (on every
backend an MMIO write; on kvm_pvm also a port write), so RIP already points past it; the tracer
then shows the instruction that ends at RIP and caused the exit, found by decoding backwards and
checking it against the exit (an I/O instruction of that direction and size; a memory operand
whose address translates to the MMIO address). Otherwise the instruction at RIP is shown.

Registers come cheaply through the kvm_run page: with KVM_CAP_SYNC_REGS, ``kvm_valid_regs``
asks KVM to copy the general and special registers there on every exit (set once per vCPU when
tracing starts), so tracing adds no ioctl per exit. Without the capability the tracer falls back
to KVM_GET_REGS / KVM_GET_SREGS.

Filters (``--trace-filter``) are comma-separated terms, an exit passes if any term matches:

    io                every port I/O exit        io:0x3f8        one port
    io:0x3f8-0x3ff    a range of ports           mmio:0xd0000000-0xd0000fff
    mmio              every MMIO exit            hlt, debug, internal_error, shutdown, intr, ...

Tracing is off unless asked for, and then costs the exit loop a single ``is not None`` test.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field

from capstone import x86 as cs_x86

from ..errors import UsageError
from ..kvm.constants import KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS, Cap, ExitReason
from ..memory import GuestMemoryError
from ..x86.modes import code_bits, linear_rip
from ..x86.paging import PageFault, translate
from .disasm import decode, text_of
from .vmem import read_virtual

_IO, _MMIO, _HLT = int(ExitReason.IO), int(ExitReason.MMIO), int(ExitReason.HLT)
_LOOK_BACK = {_IO: 3, _MMIO: 15, _HLT: 1}     # how far back the exiting instruction may start
_OUTS = ("out", "outsb", "outsw", "outsd")
_INS = ("in", "insb", "insw", "insd")
_ALIASES = {"pio": "io", "port": "io"}
_CACHE_MAX = 4096


# --- filters --------------------------------------------------------------------------------
@dataclass
class TraceFilter:
    """Which exits to trace: reasons (all addresses) and address ranges per reason."""

    reasons: set[int] = field(default_factory=set)                             # every exit of these
    ranges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)     # reason -> [(lo, hi)]

    @classmethod
    def parse(cls, spec: str) -> TraceFilter:
        """``io:0x3f8-0x3ff,mmio,hlt`` -> a filter. Raises UsageError with the offending term."""
        filt = cls()
        terms = [t.strip() for t in spec.split(",")]
        if not any(terms):
            raise UsageError("--trace-filter is empty: give e.g. io:0x3f8-0x3ff,mmio,hlt")
        for term in terms:
            if not term:
                raise UsageError(f"--trace-filter {spec!r}: empty term between commas")
            name, _, span = term.partition(":")
            name = _ALIASES.get(name.strip().lower(), name.strip().lower())
            try:
                reason = int(ExitReason[name.upper()])
            except KeyError:
                names = ", ".join(r.name.lower() for r in ExitReason)
                raise UsageError(f"--trace-filter: unknown exit reason {name!r} in {term!r} (known: {names})") \
                    from None
            if not span:
                filt.reasons.add(reason)
                continue
            if reason not in (_IO, _MMIO):
                raise UsageError(f"--trace-filter: {term!r}: only io and mmio take an address range")
            filt.ranges.setdefault(reason, []).append(_parse_range(span, term))
        return filt

    def matches(self, reason: int, addr: int) -> bool:
        """True if an exit of ``reason`` at port/address ``addr`` passes the filter."""
        if reason in self.reasons:
            return True
        return any(lo <= addr <= hi for lo, hi in self.ranges.get(reason, ()))


def _parse_range(span: str, term: str) -> tuple[int, int]:
    lo_text, dash, hi_text = span.partition("-")
    try:
        lo = int(lo_text.strip(), 0)
        hi = int(hi_text.strip(), 0) if dash else lo
    except ValueError:
        raise UsageError(f"--trace-filter: {term!r}: the range must be ADDR or LOW-HIGH, e.g. io:0x3f8-0x3ff") \
            from None
    if lo < 0 or hi < lo:
        raise UsageError(f"--trace-filter: {term!r}: empty or negative range")
    return lo, hi


# --- the tracer -----------------------------------------------------------------------------
class Tracer:
    """Formats and prints exits; one instance per run, shared by the vCPU threads."""

    def __init__(self, machine, filt: TraceFilter | None = None, out=None, sync_regs: bool | None = None) -> None:
        self.machine = machine
        self.memory = machine.memory
        self.filter = filt
        self.out = out if out is not None else sys.stderr
        if sync_regs is None:
            wanted = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS
            sync_regs = machine.kvm.check_extension(Cap.SYNC_REGS) & wanted == wanted
        self.sync_regs = sync_regs
        self._lock = threading.Lock()                   # whole lines, even with several vCPUs
        self._decoded: dict[tuple, tuple[int, int, str]] = {}   # (bits, addr, bytes) -> decoded

    def for_vcpu(self, vcpu):
        """The callable the exit loop calls after handling each exit of this vCPU."""
        if self.sync_regs:
            vcpu.run_struct.kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS

        def trace() -> None:
            """Print this vCPU's current exit if the filter lets it through."""
            line = self.describe(vcpu)
            if line is not None:
                with self._lock:
                    try:
                        self.out.write(line + "\n")
                        self.out.flush()
                    except (BrokenPipeError, ValueError):
                        pass
        return trace

    def registers(self, vcpu):
        """(regs, sregs) at this exit: from the kvm_run page when KVM syncs them there."""
        if self.sync_regs:
            sync = vcpu.run_struct.s.regs
            return sync.regs, sync.sregs
        return vcpu.get_regs(), vcpu.get_sregs()

    def describe(self, vcpu) -> str | None:
        """The trace line of the exit just handled, or None if the filter drops it."""
        run = vcpu.run_struct
        reason = run.exit_reason
        if reason == _IO:
            io = run.io
            addr, detail = io.port, self._io_detail(vcpu, io)
        elif reason == _MMIO:
            mmio = run.mmio
            value = int.from_bytes(bytes(mmio.data[0:min(mmio.len, 8)]), "little")
            addr = mmio.phys_addr
            detail = (f"{'write' if mmio.is_write else 'read '} addr={addr:#x} size={mmio.len} "
                      f"value={value:#x}")
        else:
            addr, detail = 0, _other_detail(run, reason)
        if self.filter is not None and not self.filter.matches(reason, addr):
            return None
        try:
            name = ExitReason(reason).name
        except ValueError:
            name = str(reason)
        regs, sregs = self.registers(vcpu)
        return f"vcpu{vcpu.id} {name:<6} {detail:<52} rip={regs.rip:#x}  {self._instruction(run, reason, regs, sregs)}"

    def _io_detail(self, vcpu, io) -> str:
        out = io.direction == 1
        size, count = io.size, io.count
        try:
            raw = bytes(vcpu.run_data(io.data_offset, size * count))
        except Exception:
            raw = b""
        head = f"{'out' if out else 'in '} port={io.port:#x} size={size}"
        if count != 1:
            return f"{head} count={count} data={raw[:16].hex(' ')}{' ...' if len(raw) > 16 else ''}"
        value = int.from_bytes(raw, "little")
        text = f"{head} value={value:#x}"
        if out and size == 1 and 0x20 <= value < 0x7F:     # a character, perhaps
            text += f" {chr(value)!r}"
        elif out and size == 1 and value == 0x0A:
            text += " '\\n'"
        return text

    # --- which instruction ------------------------------------------------------------------
    def _instruction(self, run, reason: int, regs, sregs) -> str:
        bits, rip = code_bits(sregs), linear_rip(regs, sregs)
        mask = 0xFFFF_FFFF_FFFF_FFFF if bits == 64 else 0xFFFF_FFFF
        at = self._decode_at(rip, bits, sregs)
        if reason in _LOOK_BACK and (at is None or not self._caused(at, reason, run, regs, sregs, bits)):
            # The exit came after the instruction completed: find the one that ends at RIP. The
            # shortest match wins (a longer one would have swallowed the end of its predecessor).
            for back in range(1, _LOOK_BACK[reason] + 1):
                cand = self._decode_at((rip - back) & mask, bits, sregs)
                if cand is not None and cand[1] == back and self._caused(cand, reason, run, regs, sregs, bits):
                    return f"{cand[0]:#x}: {cand[2]}"
        if at is None:
            return "(code at rip unreadable)"
        return f"{at[0]:#x}: {at[2]}"

    def _decode_at(self, linear: int, bits: int, sregs):
        """(address, length, text, insn) of the instruction at a linear address, or None."""
        code = read_virtual(self.memory, (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer), linear, 15)
        if not code:
            return None
        # 16-bit code is decoded at its offset in CS, so jump targets read as the IP values they are
        at = (linear - sregs.cs.base) & 0xFFFF if bits == 16 else linear
        key = (bits, linear, at, code)
        hit = self._decoded.get(key)
        if hit is None:
            insn = decode(code, at, bits)
            if insn is None:
                return None
            if len(self._decoded) >= _CACHE_MAX:
                self._decoded.clear()
            hit = self._decoded[key] = (linear, insn.size, text_of(insn, bits), insn)
        return hit

    def _caused(self, decoded, reason: int, run, regs, sregs, bits: int) -> bool:
        """Could this instruction have made this exit (kind, direction, size, address)?"""
        insn = decoded[3]
        words = insn.mnemonic.split()
        if reason == _HLT:
            return "hlt" in words
        if reason == _IO:
            out = run.io.direction == 1
            if not any(w in (_OUTS if out else _INS) for w in words):
                return False
            sizes = [op.size for op in insn.operands if op.type == cs_x86.X86_OP_MEM
                     or (op.type == cs_x86.X86_OP_REG and insn.reg_name(op.reg) != "dx")]
            return not sizes or sizes[0] == run.io.size
        target, size = run.mmio.phys_addr, run.mmio.len
        for op in insn.operands:
            if op.type != cs_x86.X86_OP_MEM or op.size != size:
                continue
            ea = self._effective_address(insn, op.mem, regs, sregs, decoded[0] + decoded[1], bits)
            if ea is None:
                continue
            try:
                if translate(self.memory, ea, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) == target:
                    return True
            except (PageFault, GuestMemoryError):
                continue
        return False

    @staticmethod
    def _effective_address(insn, mem, regs, sregs, next_ip: int, bits: int) -> int | None:
        ea = mem.disp
        for reg, scale in ((mem.base, 1), (mem.index, mem.scale)):
            if reg == 0:
                continue
            name = insn.reg_name(reg)
            value = _register_value(name, regs, next_ip)
            if value is None:
                return None
            ea += value * scale
        if mem.segment:
            seg = insn.reg_name(mem.segment)
            if seg in ("fs", "gs"):
                ea += getattr(sregs, seg).base
        elif bits != 64:
            ea += sregs.ds.base
        return ea & (0xFFFF_FFFF_FFFF_FFFF if bits == 64 else 0xFFFF_FFFF)


_GPR = {"a": "rax", "b": "rbx", "c": "rcx", "d": "rdx", "si": "rsi", "di": "rdi", "sp": "rsp", "bp": "rbp"}


def _register_value(name: str, regs, next_ip: int) -> int | None:
    """The value of a capstone register name (rax/eax/ax, r8/r8d/r8w, rip) in kvm_regs."""
    if name in ("rip", "eip", "ip"):
        return next_ip
    if name.startswith("r") and name[1:2].isdigit():
        digits = name[1:].rstrip("dwb")
        width = {"d": 32, "w": 16, "b": 8}.get(name[-1], 64)
        return getattr(regs, f"r{digits}") & ((1 << width) - 1)
    core, width = name, 16
    if len(name) == 3 and name[0] in "re":
        core, width = name[1:], 64 if name[0] == "r" else 32
    core = core[:-1] if core in ("ax", "bx", "cx", "dx") else core
    field_name = _GPR.get(core)
    if field_name is None:
        return None
    return getattr(regs, field_name) & ((1 << width) - 1)


def _other_detail(run, reason: int) -> str:
    if reason == int(ExitReason.DEBUG):
        arch = run.debug.arch
        return f"exception={arch.exception} pc={arch.pc:#x} dr6={arch.dr6:#x}"
    if reason == int(ExitReason.INTERNAL_ERROR):
        return f"suberror={run.internal.suberror}"
    if reason == int(ExitReason.SYSTEM_EVENT):
        return f"type={run.system_event.type}"
    if reason == int(ExitReason.FAIL_ENTRY):
        return f"hardware_entry_failure_reason={run.fail_entry.hardware_entry_failure_reason:#x}"
    return ""
