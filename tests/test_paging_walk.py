"""The page walker (pykvm.x86.paging.translate) on 4 KiB pages built by hand, in every paging
format, and guest-virtual reads/writes over it (pykvm.debug.vmem). No KVM needed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.debug.vmem import Unmapped, read_virtual, write_virtual
from pykvm.memory import GuestMemory, MiB
from pykvm.x86 import paging
from pykvm.x86.paging import PS, RW, P
from pykvm.x86.registers import CR0, CR4, EFER

PG = int(CR0.PE | CR0.PG)
LONG = (int(CR4.PAE), int(EFER.LME | EFER.LMA))


@pytest.fixture()
def mem():
    with GuestMemory(4 * MiB) as m:
        yield m


def put32(mem, table, index, value):
    mem.write(table + index * 4, struct.pack("<I", value))


def put64(mem, table, index, value):
    mem.write(table + index * 8, struct.pack("<Q", value))


# --- 32-bit paging: PD -> PT -> 4 KiB page ---------------------------------------------------
def test_32bit_4k_page(mem):
    pd, pt = 0x10000, 0x11000
    vaddr = 0xC012_3456                       # PD index 0x300, PT index 0x123, offset 0x456
    put32(mem, pd, vaddr >> 22, pt | RW | P)
    put32(mem, pt, (vaddr >> 12) & 0x3FF, 0x0020_0000 | RW | P)
    assert paging.translate(mem, vaddr, PG, pd, 0, 0) == 0x0020_0456
    with pytest.raises(paging.PageFault, match="PT entry not present"):
        paging.translate(mem, vaddr + 0x1000, PG, pd, 0, 0)
    with pytest.raises(paging.PageFault, match="PD entry not present"):
        paging.translate(mem, 0x0040_0000, PG, pd, 0, 0)


def test_32bit_large_page_needs_pse(mem):
    pd = 0x10000
    put32(mem, pd, 1, 0x0080_0000 | PS | RW | P)
    assert paging.translate(mem, 0x0040_1234, PG, pd, int(CR4.PSE), 0) == 0x0080_1234
    # Without CR4.PSE the PS bit is ignored: the entry points to a page table (at 0x800000,
    # outside this 4 MiB guest) and the walk must stop at the guest memory boundary.
    from pykvm.memory import GuestMemoryError
    with pytest.raises(GuestMemoryError):
        paging.translate(mem, 0x0040_1234, PG, pd, 0, 0)


# --- PAE: PDPT -> PD -> PT -> 4 KiB page ----------------------------------------------------
def test_pae_4k_page(mem):
    pdpt, pd, pt = 0x10000, 0x11000, 0x12000
    vaddr = 0x8060_1ABC                       # PDPT 2, PD 3, PT 1, offset 0xabc
    put64(mem, pdpt, 2, pd | P)
    put64(mem, pd, 3, pt | RW | P)
    put64(mem, pt, 1, 0x0030_0000 | RW | P)
    assert paging.translate(mem, vaddr, PG, pdpt, int(CR4.PAE), 0) == 0x0030_0ABC
    with pytest.raises(paging.PageFault, match="PDPT entry not present"):
        paging.translate(mem, 0x4000_0000, PG, pdpt, int(CR4.PAE), 0)
    with pytest.raises(paging.PageFault, match="PT entry not present"):
        paging.translate(mem, vaddr + 0x1000, PG, pdpt, int(CR4.PAE), 0)


# --- 4-level: PML4 -> PDPT -> PD -> PT -> 4 KiB page, plus 1 GiB and 2 MiB pages ---------------
def long_tables(mem):
    pml4, pdpt, pd, pt = 0x10000, 0x11000, 0x12000, 0x13000
    put64(mem, pml4, 0x1FF, pdpt | RW | P)         # the top 512 GiB (kernel half)
    put64(mem, pdpt, 0x1FE, pd | RW | P)
    put64(mem, pd, 5, pt | RW | P)
    put64(mem, pt, 7, 0x0012_3000 | RW | P)        # a 4 KiB page
    put64(mem, pt, 8, 0x0012_5000 | RW | P)        # the next virtual page, elsewhere physically
    put64(mem, pd, 6, 0x0020_0000 | PS | RW | P)   # a 2 MiB page
    put64(mem, pdpt, 0x1FF, 0x4000_0000 | PS | RW | P)   # a 1 GiB page
    return pml4


KERNEL = 0xFFFF_FFFF_8000_0000                     # PML4 511, PDPT 510


def test_long_mode_4k_page(mem):
    cr3 = long_tables(mem)
    vaddr = KERNEL + (5 << 21) + (7 << 12) + 0x9A
    assert paging.translate(mem, vaddr, PG, cr3, *LONG) == 0x0012_309A
    assert paging.translate(mem, vaddr + 0x1000, PG, cr3, *LONG) == 0x0012_509A


def test_long_mode_large_pages(mem):
    cr3 = long_tables(mem)
    assert paging.translate(mem, KERNEL + (6 << 21) + 0x1_2345, PG, cr3, *LONG) == 0x0021_2345
    assert paging.translate(mem, KERNEL + (1 << 30) + 0x1234_5678, PG, cr3, *LONG) == 0x5234_5678


@pytest.mark.parametrize("vaddr,level", [
    (0x0000_0000_0000_1000, 4),                                   # PML4 entry 0 absent
    (0xFFFF_FF80_0000_0000, 3),                                   # PDPT entry 0 absent
    (KERNEL + (9 << 21), 2),                                      # PD entry 9 absent
    (KERNEL + (5 << 21) + (9 << 12), 1),                          # PT entry 9 absent
])
def test_long_mode_not_present_at_each_level(mem, vaddr, level):
    cr3 = long_tables(mem)
    with pytest.raises(paging.PageFault, match=f"level {level}"):
        paging.translate(mem, vaddr, PG, cr3, *LONG)


def test_paging_off_is_identity(mem):
    assert paging.translate(mem, 0x1234_5678, int(CR0.PE), 0xDEAD_0000, 0, 0) == 0x1234_5678


# --- guest-virtual access over those tables ----------------------------------------------------
def test_read_and_write_virtual_cross_a_page_boundary(mem):
    cr3 = long_tables(mem)
    paging_state = (PG, cr3, *LONG)
    page = KERNEL + (5 << 21) + (7 << 12)
    mem.write(0x0012_3FFE, b"ab")
    mem.write(0x0012_5000, b"cd")
    assert read_virtual(mem, paging_state, page + 0xFFE, 4) == b"abcd"
    write_virtual(mem, paging_state, page + 0xFFF, b"XY")
    assert mem.read(0x0012_3FFF, 1) == b"X" and mem.read(0x0012_5000, 1) == b"Y"


def test_read_virtual_stops_at_an_unmapped_page_and_write_refuses(mem):
    cr3 = long_tables(mem)
    paging_state = (PG, cr3, *LONG)
    last = KERNEL + (5 << 21) + (8 << 12) + 0xFFC           # 4 bytes before PT entry 9 (absent)
    assert read_virtual(mem, paging_state, last, 16) == mem.read(0x0012_5FFC, 4)
    assert read_virtual(mem, paging_state, last + 4, 4) == b""
    before = mem.read(0x0012_5FFC, 4)
    with pytest.raises(Unmapped):
        write_virtual(mem, paging_state, last, b"12345678")
    assert mem.read(0x0012_5FFC, 4) == before                # nothing written: all or nothing


@pytest.fixture(scope="module")
def identity_long64():
    from pykvm.x86.modes import CpuMode, initial_state
    with GuestMemory(4 * MiB) as m:
        state, writes = initial_state(CpuMode.LONG64, entry=0x8000, stack=0x7000)
        for gpa, data in writes:
            m.write(gpa, data)
        m.write(0x0030_0000, bytes(range(256)) * 48)
        yield m, (state.cr0, state.cr3, state.cr4, state.efer)


@settings(max_examples=100, deadline=None)
@given(offset=st.integers(0, 0xFFF), n=st.integers(0, 0x2000))
def test_identity_long_mode_reads_equal_physical_reads(identity_long64, offset, n):
    m, paging_state = identity_long64
    addr = 0x0030_0000 + offset
    assert read_virtual(m, paging_state, addr, n) == m.read(addr, n)
