"""Bits of the x86 control registers, EFER and RFLAGS that pykvm sets or reads (Intel SDM vol. 3)."""

from __future__ import annotations

import enum


class CR0(enum.IntFlag):
    PE = 1 << 0   # protection enable: segment descriptors instead of real-mode paragraphs
    MP = 1 << 1
    EM = 1 << 2
    TS = 1 << 3
    ET = 1 << 4   # extension type: hard-wired to 1 since the 486
    NE = 1 << 5   # native x87 error reporting
    WP = 1 << 16
    AM = 1 << 18
    NW = 1 << 29
    CD = 1 << 30
    PG = 1 << 31  # paging: linear addresses go through CR3's tables


class CR4(enum.IntFlag):
    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2
    DE = 1 << 3
    PSE = 1 << 4   # 4 MiB pages in 32-bit paging
    PAE = 1 << 5   # 64-bit page-table entries (needed for PAE paging and long mode)
    MCE = 1 << 6
    PGE = 1 << 7
    PCE = 1 << 8
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12
    VMXE = 1 << 13
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17
    OSXSAVE = 1 << 18
    SMEP = 1 << 20
    SMAP = 1 << 21


class EFER(enum.IntFlag):
    SCE = 1 << 0    # SYSCALL/SYSRET
    LME = 1 << 8    # long mode enable: takes effect when paging is turned on
    LMA = 1 << 10   # long mode active (set by the CPU; KVM wants it set with LME when entering directly)
    NXE = 1 << 11


class RFLAGS(enum.IntFlag):
    CF = 1 << 0
    FIXED = 1 << 1  # reserved, always reads 1
    PF = 1 << 2
    AF = 1 << 4
    ZF = 1 << 6
    SF = 1 << 7
    TF = 1 << 8
    IF = 1 << 9
    DF = 1 << 10
    OF = 1 << 11
    VM = 1 << 17


MSR_EFER = 0xC000_0080
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_FS_BASE = 0xC000_0100
MSR_GS_BASE = 0xC000_0101
MSR_APIC_BASE = 0x1B


class Vector(enum.IntEnum):
    """Exception vectors pykvm injects or reports (SDM vol. 3, table 6-1)."""

    DE = 0    # divide error
    DB = 1    # debug: single-step, hardware breakpoint
    NMI = 2
    BP = 3    # breakpoint: the trap int3 raises
    UD = 6    # invalid opcode
    GP = 13   # general protection
    PF = 14   # page fault


INT3 = 0xCC   # the one-byte breakpoint instruction (opcode CC), the byte software breakpoints plant
