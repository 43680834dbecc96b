"""CPU-mode set-up without KVM: descriptors, page tables and the state each mode needs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.memory import GuestMemory, MiB
from pykvm.x86 import paging
from pykvm.x86.modes import GDT_ADDR, PAGE_TABLES_ADDR, CpuMode, initial_state, mode_of, reserved_ranges
from pykvm.x86.registers import CR0, CR4, EFER, RFLAGS
from pykvm.x86.segments import FLAT_CODE32, FLAT_CODE64, FLAT_DATA, Segment, flat_gdt


def test_flat_descriptors_have_the_textbook_encoding():
    # The well-known flat 4 GiB descriptors: code 0x00cf9b000000ffff, data 0x00cf93000000ffff,
    # 64-bit code 0x00af9b000000ffff (accessed bit set, as pykvm loads them pre-accessed).
    assert FLAT_CODE32.pack() == bytes.fromhex("ffff0000009bcf00")
    assert FLAT_DATA.pack() == bytes.fromhex("ffff00000093cf00")
    assert FLAT_CODE64.pack() == bytes.fromhex("ffff0000009baf00")


@settings(max_examples=200)
@given(base=st.integers(0, 0xFFFF_FFFF), limit=st.integers(0, 0xFFFFF), type_=st.integers(0, 15),
       dpl=st.integers(0, 3), l=st.integers(0, 1), db=st.integers(0, 1), g=st.integers(0, 1))
def test_descriptor_round_trip(base, limit, type_, dpl, l, db, g):
    seg = Segment(selector=0x10, base=base, limit=(limit << 12 | 0xFFF) if g else limit, type=type_, dpl=dpl,
                  l=l, db=db, g=g)
    assert Segment.unpack(0x10, seg.pack()) == seg


def test_gdt_layout_follows_linux_boot_selectors():
    table, code, data = flat_gdt(long_mode=True)
    assert len(table) == 32 and table[:8] == bytes(8)
    assert code.selector == 0x10 and data.selector == 0x18
    assert Segment.unpack(0x10, table[0x10:0x18]).l == 1
    assert Segment.unpack(0x08, table[0x08:0x10]).db == 1


@pytest.fixture()
def mem():
    with GuestMemory(16 * MiB) as m:
        yield m


@pytest.mark.parametrize("mode", [CpuMode.PAGED32, CpuMode.PAE, CpuMode.LONG64])
def test_page_tables_identity_map_the_low_4_gib(mem, mode):
    state, writes = initial_state(mode, entry=0x8000, stack=0x7000)
    for gpa, data in writes:
        mem.write(gpa, data)
    for vaddr in (0, 0x8000, 0x1234_5678, 0xD000_0008, 0xFFFF_FFFF, 0x7FFF_F000):
        assert paging.translate(mem, vaddr, state.cr0, state.cr3, state.cr4, state.efer) == vaddr


def test_long_mode_walk_refuses_unmapped_addresses(mem):
    state, writes = initial_state(CpuMode.LONG64, entry=0x8000, stack=0x7000)
    for gpa, data in writes:
        mem.write(gpa, data)
    with pytest.raises(paging.PageFault):
        paging.translate(mem, 1 << 40, state.cr0, state.cr3, state.cr4, state.efer)


def test_walk_through_hostile_cr3_stays_inside_guest_memory(mem):
    from pykvm.memory import GuestMemoryError
    with pytest.raises(GuestMemoryError):
        paging.translate(mem, 0x1000, int(CR0.PE | CR0.PG), 0xFFFF_F000, 0, int(EFER.LME | EFER.LMA))


@pytest.mark.parametrize("mode,cr0,cr4,efer", [
    (CpuMode.REAL, 0, 0, 0),
    (CpuMode.PROT32, CR0.PE, 0, 0),
    (CpuMode.PAGED32, CR0.PE | CR0.PG, CR4.PSE, 0),
    (CpuMode.PAE, CR0.PE | CR0.PG, CR4.PAE, 0),
    (CpuMode.LONG64, CR0.PE | CR0.PG, CR4.PAE, EFER.LME | EFER.LMA),
])
def test_each_mode_sets_exactly_its_bits(mode, cr0, cr4, efer):
    state, _ = initial_state(mode, entry=0x8000, stack=0x7000)
    mask0 = CR0.PE | CR0.PG
    assert state.cr0 & mask0 == cr0
    assert state.cr4 & (CR4.PSE | CR4.PAE) == cr4
    assert state.efer == efer
    assert state.regs["rflags"] == RFLAGS.FIXED   # interrupts off
    assert state.cs.l == (mode is CpuMode.LONG64)
    assert state.idt == (0, 0)
    if mode is not CpuMode.REAL:
        assert state.gdt == (GDT_ADDR, 31)


def test_real_mode_entry_above_64k_uses_a_segment():
    state, writes = initial_state(CpuMode.REAL, entry=0x12340, stack=0x7000)
    assert writes == []
    assert state.cs.selector == 0x1234 and state.cs.base == 0x12340 and state.regs["rip"] == 0
    low, _ = initial_state(CpuMode.REAL, entry=0x7C00, stack=0x7000)
    assert low.cs.selector == 0 and low.regs["rip"] == 0x7C00
    with pytest.raises(ValueError):
        initial_state(CpuMode.REAL, entry=0x12345, stack=0x7000)
    with pytest.raises(ValueError):
        initial_state(CpuMode.REAL, entry=0x100000, stack=0x7000)


def test_reserved_ranges_cover_what_is_written():
    for mode in CpuMode:
        _, writes = initial_state(mode, entry=0x8000, stack=0x7000)
        ranges = reserved_ranges(mode)
        for gpa, data in writes:
            assert any(start <= gpa and gpa + len(data) <= end for start, end, _ in ranges), (mode, hex(gpa))
    assert reserved_ranges(CpuMode.LONG64)[1][0] == PAGE_TABLES_ADDR


def test_mode_names():
    assert mode_of(0, 0, 0, 0) == "real mode"
    assert mode_of(CR0.PE | CR0.PG, CR4.PAE, EFER.LME | EFER.LMA, 1) == "64-bit long mode"
    assert "PAE" in mode_of(CR0.PE | CR0.PG, CR4.PAE, 0, 0)
