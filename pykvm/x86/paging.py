"""Identity-mapped page tables for the three x86 paging modes, as guest-memory writes.

Each builder returns ``(cr3, writes)`` where ``writes`` is a list of (guest-physical address,
bytes). All three map the low 4 GiB 1:1 with large pages, so whatever address a guest uses below
4 GiB (RAM, or the MMIO hole where devices live) means the same linear and physical address.
"""

from __future__ import annotations

import struct

from .registers import CR0, CR4, EFER

# Page-table entry bits (shared by all formats where they exist).
P = 1 << 0    # present
RW = 1 << 1   # writable
US = 1 << 2   # user accessible
PS = 1 << 7   # large page (4 MiB in 32-bit PDEs, 2 MiB in PAE/long-mode PDEs)

FOUR_GIB = 1 << 32


def paging32(base: int) -> tuple[int, list[tuple[int, bytes]]]:
    """32-bit paging with 4 MiB pages (needs CR4.PSE): one page directory of 1024 entries."""
    pd = b"".join(struct.pack("<I", (i << 22) | PS | RW | P) for i in range(1024))
    return base, [(base, pd)]


def _pae_directories(base: int) -> tuple[list[int], list[tuple[int, bytes]]]:
    """Four page directories of 512 2 MiB entries each: 4 x 1 GiB."""
    addrs, writes = [], []
    for d in range(4):
        addr = base + d * 0x1000
        entries = (((d << 30) | (i << 21)) | PS | RW | P for i in range(512))
        writes.append((addr, b"".join(struct.pack("<Q", e) for e in entries)))
        addrs.append(addr)
    return addrs, writes


def paging_pae(base: int) -> tuple[int, list[tuple[int, bytes]]]:
    """PAE paging: a 4-entry PDPT (only P may be set in PAE PDPTEs) over four 2 MiB-page directories.

    Uses [base, base + 0x5000): PDPT at base, directories at base + 0x1000..
    """
    pds, writes = _pae_directories(base + 0x1000)
    pdpt = b"".join(struct.pack("<Q", pd | P) for pd in pds)
    return base, [(base, pdpt)] + writes


def paging_long(base: int) -> tuple[int, list[tuple[int, bytes]]]:
    """4-level paging: PML4[0] -> PDPT (4 entries) -> four 2 MiB-page directories.

    Uses [base, base + 0x6000): PML4 at base, PDPT at base + 0x1000, directories after.
    """
    pds, writes = _pae_directories(base + 0x2000)
    pdpt = b"".join(struct.pack("<Q", pd | RW | P) for pd in pds)
    pml4 = struct.pack("<Q", (base + 0x1000) | RW | P)
    return base, [(base, pml4), (base + 0x1000, pdpt)] + writes


class PageFault(Exception):
    """A linear address that the guest's page tables do not map."""


def translate(mem, vaddr: int, cr0: int, cr3: int, cr4: int, efer: int) -> int:
    """Walk the guest's page tables (no paging, 32-bit, PAE, 4-level) and return the physical
    address of linear address ``vaddr``. Table reads go through ``mem`` (GuestMemory), so a
    hostile CR3 or entry raises GuestMemoryError or PageFault, never reads host memory."""
    if not cr0 & CR0.PG:                          # paging off: linear == physical
        return vaddr & 0xFFFF_FFFF
    if efer & EFER.LMA:                           # IA-32e mode: 4-level (48-bit) paging
        if cr4 & CR4.LA57:
            raise PageFault("5-level paging (CR4.LA57) is not supported by the walker")
        table = cr3 & 0x000F_FFFF_FFFF_F000
        for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
            entry = mem.read_u64(table + ((vaddr >> shift) & 0x1FF) * 8)
            if not entry & P:
                raise PageFault(f"{vaddr:#x}: not present at level {level}")
            base = entry & 0x000F_FFFF_FFFF_F000
            if level in (3, 2) and entry & PS:
                size = 1 << shift
                return (base & ~(size - 1)) | (vaddr & (size - 1))
            table = base
        return table | (vaddr & 0xFFF)
    vaddr &= 0xFFFF_FFFF
    if cr4 & CR4.PAE:                             # PAE: PDPT -> PD -> PT, 64-bit entries
        pdpte = mem.read_u64((cr3 & 0xFFFF_FFE0) + (vaddr >> 30) * 8)
        if not pdpte & P:
            raise PageFault(f"{vaddr:#x}: PDPT entry not present")
        pde = mem.read_u64((pdpte & 0x000F_FFFF_FFFF_F000) + ((vaddr >> 21) & 0x1FF) * 8)
        if not pde & P:
            raise PageFault(f"{vaddr:#x}: PD entry not present")
        if pde & PS:
            return (pde & 0x000F_FFFF_FFE0_0000) | (vaddr & 0x1F_FFFF)
        pte = mem.read_u64((pde & 0x000F_FFFF_FFFF_F000) + ((vaddr >> 12) & 0x1FF) * 8)
        if not pte & P:
            raise PageFault(f"{vaddr:#x}: PT entry not present")
        return (pte & 0x000F_FFFF_FFFF_F000) | (vaddr & 0xFFF)
    pde = mem.read_u32((cr3 & 0xFFFF_F000) + (vaddr >> 22) * 4)   # 32-bit paging
    if not pde & P:
        raise PageFault(f"{vaddr:#x}: PD entry not present")
    if pde & PS and cr4 & CR4.PSE:
        return (pde & 0xFFC0_0000) | (vaddr & 0x3F_FFFF)
    pte = mem.read_u32((pde & 0xFFFF_F000) + ((vaddr >> 12) & 0x3FF) * 4)
    if not pte & P:
        raise PageFault(f"{vaddr:#x}: PT entry not present")
    return (pte & 0xFFFF_F000) | (vaddr & 0xFFF)
