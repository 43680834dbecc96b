"""Typed VM exits: what :meth:`pykvm.kvm.Vcpu.run` returns, decoded from ``struct kvm_run``.

api.rst section 5 ("The kvm_run structure") defines what KVM reports after KVM_RUN returns: an
``exit_reason`` and, in a union, the fields of that reason. An *exit* here is one tuple: the reason
(an :class:`ExitReason` value, as an int) followed by those fields, in this order:

==============  ==========================================================================
reason          fields after the reason
==============  ==========================================================================
IO              direction (KVM_EXIT_IO_IN 0 / OUT 1), size (bytes), port, count, data_offset
MMIO            phys_addr, len (1..8 bytes), is_write; the data is at :data:`MMIO_DATA`
DEBUG           exception, pc, dr6, dr7 (the ``debug.arch`` block)
FAIL_ENTRY      hardware_entry_failure_reason, cpu
INTERNAL_ERROR  suberror, ndata, flags, insn_size, insn_bytes (the ``emulation_failure`` view)
SYSTEM_EVENT    type, ndata
anything else   (none)
==============  ==========================================================================

The tuple is exactly what one ``struct.unpack_from`` over the kvm_run mapping makes, so decoding
allocates nothing beyond it; the named tuple classes below (:class:`IoExit`, ...) have the same
shape and are what tests and readers build by hand. The formats are derived from cffi's
``offsetof``/``sizeof`` of the declarations in :mod:`.abi`, and ``tests/test_abi.py`` compares
every field's position with the system's ``<linux/kvm.h>``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .abi import ffi
from .constants import ExitReason

__all__ = ["INTR_EXIT", "MMIO_DATA", "REASON_AT", "LAYOUTS", "DebugExit", "FailEntryExit", "InternalErrorExit",
           "IoExit", "MmioExit", "SystemEventExit", "decode", "field_offsets", "named"]

_PRIMITIVE = {"uint8_t": "B", "uint16_t": "H", "uint32_t": "I", "uint64_t": "Q"}


def _member(path: str) -> tuple[int, object]:
    """(offset in struct kvm_run, cffi type) of a dotted member such as ``io.port``."""
    ctype, offset = ffi.typeof("struct kvm_run"), 0
    for name in path.split("."):
        field = dict(ctype.fields)[name]
        offset, ctype = offset + field.offset, field.type
    return offset, ctype


class Layout:
    """A struct.Struct reading ``exit_reason`` and some kvm_run members in one unpack.

    ``paths`` are dotted member names; each member's offset and size come from cffi, the gaps
    between them become pad bytes. Arrays of bytes come back as ``bytes``."""

    def __init__(self, *paths: str) -> None:
        self.paths = ("exit_reason", *paths)
        self.offsets: dict[str, int] = {}     # member path -> its offset in struct kvm_run
        fmt = "<"
        self.start = _member("exit_reason")[0]
        for path in self.paths:
            offset, ctype = _member(path)
            gap = offset - (self.start + struct.calcsize(fmt))
            if gap < 0:
                raise ValueError(f"kvm_run member {path} overlaps the one before it")
            code = (f"{ctype.length}s" if ctype.kind == "array" and ctype.item.cname == "uint8_t"
                    else _PRIMITIVE[ctype.cname])
            fmt += f"{gap}x" if gap else ""
            self.offsets[path] = self.start + struct.calcsize(fmt)
            fmt += code
        self.struct = struct.Struct(fmt)
        self.unpack_from = self.struct.unpack_from


LAYOUTS: dict[int, Layout] = {
    ExitReason.IO: Layout("io.direction", "io.size", "io.port", "io.count", "io.data_offset"),
    ExitReason.MMIO: Layout("mmio.phys_addr", "mmio.len", "mmio.is_write"),
    ExitReason.DEBUG: Layout("debug.arch.exception", "debug.arch.pc", "debug.arch.dr6", "debug.arch.dr7"),
    ExitReason.FAIL_ENTRY: Layout("fail_entry.hardware_entry_failure_reason", "fail_entry.cpu"),
    ExitReason.INTERNAL_ERROR: Layout("emulation_failure.suberror", "emulation_failure.ndata",
                                      "emulation_failure.flags", "emulation_failure.insn_size",
                                      "emulation_failure.insn_bytes"),
    ExitReason.SYSTEM_EVENT: Layout("system_event.type", "system_event.ndata"),
}
REASON_AT = _member("exit_reason")[0]
MMIO_DATA = _member("mmio.data")[0]   # up to 8 bytes, little-endian
INTR_EXIT = (int(ExitReason.INTR),)    # KVM_RUN interrupted (EINTR) or a parked AP woken (EAGAIN)

_REASON = struct.Struct("<I").unpack_from
_BARE = {int(r): (int(r),) for r in ExitReason}   # reasons without fields: one shared tuple each
_DECODERS = {int(reason): layout.unpack_from for reason, layout in LAYOUTS.items()}


def decode(buf, at: int = REASON_AT) -> tuple:
    """The exit in the kvm_run bytes ``buf`` (the mapping): ``(reason, *fields)`` as tabled above.

    A reason this module does not know comes back as a 1-tuple too; the caller decides."""
    reason = _REASON(buf, at)[0]
    unpack = _DECODERS.get(reason)
    if unpack is not None:
        return unpack(buf, at)
    return _BARE.get(reason) or (reason,)


def field_offsets() -> dict[str, int]:
    """Every member the decoders read -> its offset in struct kvm_run (for the ABI test)."""
    result = {}
    for layout in LAYOUTS.values():
        result.update(layout.offsets)
    return result


class IoExit(NamedTuple):
    """KVM_EXIT_IO: ``count`` elements of ``size`` bytes at ``data_offset`` in the kvm_run mapping."""

    reason: int
    direction: int
    size: int
    port: int
    count: int
    data_offset: int


class MmioExit(NamedTuple):
    """KVM_EXIT_MMIO: ``len`` bytes at guest-physical ``phys_addr``; data at MMIO_DATA."""

    reason: int
    phys_addr: int
    len: int
    is_write: int


class DebugExit(NamedTuple):
    """KVM_EXIT_DEBUG: the x86 ``kvm_debug_exit_arch``."""

    reason: int
    exception: int
    pc: int
    dr6: int
    dr7: int


class FailEntryExit(NamedTuple):
    """KVM_EXIT_FAIL_ENTRY: the hardware's reason the VM entry failed."""

    reason: int
    hardware_entry_failure_reason: int
    cpu: int


class InternalErrorExit(NamedTuple):
    """KVM_EXIT_INTERNAL_ERROR, read through the ``emulation_failure`` view of the union.

    ``flags``/``insn_size``/``insn_bytes`` mean something only when suberror is
    KVM_INTERNAL_ERROR_EMULATION, ndata >= 3 and flags has the instruction-bytes bit."""

    reason: int
    suberror: int
    ndata: int
    flags: int
    insn_size: int
    insn_bytes: bytes


class SystemEventExit(NamedTuple):
    """KVM_EXIT_SYSTEM_EVENT: KVM_SYSTEM_EVENT_SHUTDOWN / RESET / CRASH ..."""

    reason: int
    type: int
    ndata: int


_NAMED = {ExitReason.IO: IoExit, ExitReason.MMIO: MmioExit, ExitReason.DEBUG: DebugExit,
          ExitReason.FAIL_ENTRY: FailEntryExit, ExitReason.INTERNAL_ERROR: InternalErrorExit,
          ExitReason.SYSTEM_EVENT: SystemEventExit}


def named(exit: tuple) -> tuple:
    """The same exit as its named tuple class (for printing and tests; the loop uses plain tuples)."""
    cls = _NAMED.get(exit[0])
    return cls(*exit) if cls is not None else exit
