"""Segment descriptors: the 8-byte GDT format and the unpacked form KVM's sregs use.

A descriptor is built once as a :class:`Segment`; pykvm writes its packed bytes into the guest's
GDT *and* loads the same fields into the vCPU's hidden segment registers, which is exactly the
state a real CPU is in after loading that selector.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Access-byte type field for code/data segments (S=1).
TYPE_DATA_RW = 0x3      # read/write, accessed
TYPE_CODE_RX = 0xB      # execute/read, accessed
TYPE_TSS32_BUSY = 0xB   # with S=0: a busy 32-bit TSS
TYPE_LDT = 0x2


@dataclass(frozen=True)
class Segment:
    """A segment register's full (visible + hidden) state, field names as in struct kvm_segment."""

    selector: int
    base: int = 0
    limit: int = 0xFFFF_FFFF   # byte granular here; pack() converts to 4 KiB units when g=1
    type: int = TYPE_DATA_RW
    s: int = 1          # 1 = code/data, 0 = system (TSS, LDT)
    dpl: int = 0
    present: int = 1
    avl: int = 0
    l: int = 0          # 64-bit code segment
    db: int = 1         # default operand size 32 (code) / big stack (data)
    g: int = 1          # limit counted in 4 KiB pages
    unusable: int = 0

    def pack(self) -> bytes:
        """The 8-byte GDT descriptor for this segment."""
        limit = self.limit >> 12 if self.g else self.limit
        if limit > 0xFFFFF:
            raise ValueError(f"segment limit {self.limit:#x} does not fit with g={self.g}")
        access = self.type | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = self.avl | (self.l << 1) | (self.db << 2) | (self.g << 3)
        return struct.pack(
            "<HHBBBB",
            limit & 0xFFFF,
            self.base & 0xFFFF,
            (self.base >> 16) & 0xFF,
            access,
            ((limit >> 16) & 0xF) | (flags << 4),
            (self.base >> 24) & 0xFF,
        )

    @classmethod
    def unpack(cls, selector: int, raw: bytes) -> Segment:
        """Decode an 8-byte descriptor (the inverse of :meth:`pack` for code/data segments)."""
        lim_lo, base_lo, base_mid, access, lim_flags, base_hi = struct.unpack("<HHBBBB", raw)
        flags = lim_flags >> 4
        limit = lim_lo | ((lim_flags & 0xF) << 16)
        g = (flags >> 3) & 1
        if g:
            limit = (limit << 12) | 0xFFF
        return cls(
            selector=selector, base=base_lo | (base_mid << 16) | (base_hi << 24), limit=limit,
            type=access & 0xF, s=(access >> 4) & 1, dpl=(access >> 5) & 3, present=access >> 7,
            avl=flags & 1, l=(flags >> 1) & 1, db=(flags >> 2) & 1, g=g,
        )


def real_mode_segment(selector: int, code: bool = False) -> Segment:
    """A real-mode segment: base = selector * 16, 64 KiB limit, 16-bit."""
    return Segment(selector=selector, base=selector << 4, limit=0xFFFF,
                   type=TYPE_CODE_RX if code else TYPE_DATA_RW, db=0, g=0)


# The flat boot GDT, laid out as Linux's boot protocol expects (__BOOT_CS = 0x10, __BOOT_DS = 0x18).
NULL_SELECTOR = 0x00
CODE_SELECTOR = 0x10
DATA_SELECTOR = 0x18
CODE32_SELECTOR = 0x08   # always a 32-bit code segment, for kernels that drop back to compatibility code

FLAT_CODE32 = Segment(selector=CODE_SELECTOR, type=TYPE_CODE_RX)
FLAT_CODE64 = Segment(selector=CODE_SELECTOR, type=TYPE_CODE_RX, l=1, db=0)   # L=1 requires D=0
FLAT_DATA = Segment(selector=DATA_SELECTOR, type=TYPE_DATA_RW)


def flat_gdt(long_mode: bool) -> tuple[bytes, Segment, Segment]:
    """GDT bytes for flat 4 GiB segments, and the code and data segments to load.

    Entries: 0x00 null, 0x08 32-bit code, 0x10 the mode's code segment (32- or 64-bit), 0x18 data.
    """
    code = FLAT_CODE64 if long_mode else FLAT_CODE32
    code32 = Segment(selector=CODE32_SELECTOR, type=TYPE_CODE_RX)
    table = bytes(8) + code32.pack() + code.pack() + FLAT_DATA.pack()
    return table, code, FLAT_DATA
