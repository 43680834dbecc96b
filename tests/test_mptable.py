"""MP tables, parsed back with the layouts of the Intel MultiProcessor Specification 1.4
(chapter 4) and checked the way an OS checks them before trusting them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.x86.mptable import build_mptable

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


@dataclass
class MpTable:
    pointer: bytes
    header: bytes
    entries: list[bytes]

    def of_type(self, kind: int) -> list[bytes]:
        return [e for e in self.entries if e[0] == kind]


def parse(blob: bytes, base: int = 0xF0000) -> MpTable:
    pointer = blob[:16]
    assert pointer[:4] == b"_MP_"
    physptr, length, rev = struct.unpack_from("<IBB", pointer, 4)
    assert (length, rev) == (1, 4)
    assert sum(pointer) % 256 == 0
    table = blob[physptr - base:]
    assert table[:4] == b"PCMP"
    (table_len,) = struct.unpack_from("<H", table, 4)
    assert sum(table[:table_len]) % 256 == 0
    header = table[:44]
    (count,) = struct.unpack_from("<H", header, 34)
    entries, pos = [], 44
    for _ in range(count):
        size = ENTRY_SIZES[table[pos]]
        entries.append(table[pos:pos + size])
        pos += size
    assert pos == table_len
    return MpTable(pointer, header, entries)


@pytest.fixture
def four() -> MpTable:
    return parse(build_mptable(4))


# ---- the floating pointer -------------------------------------------------------------------

def test_floating_pointer_is_16_bytes_pointing_just_past_itself() -> None:
    blob = build_mptable(2)
    signature, physptr, length, rev, _csum, f1, f2, f3, f4, f5 = struct.unpack("<4sIBBBBBBBB", blob[:16])
    assert signature == b"_MP_"
    assert physptr == 0xF0000 + 16
    assert (length, rev) == (1, 4)
    assert (f1, f2, f3, f4, f5) == (0, 0, 0, 0, 0)       # table present; virtual wire mode, no IMCR


def test_the_pointer_follows_the_base() -> None:
    blob = build_mptable(1, base=0x9FC00)
    assert struct.unpack_from("<I", blob, 4)[0] == 0x9FC10
    parse(blob, base=0x9FC00)


def test_base_must_be_paragraph_aligned() -> None:
    with pytest.raises(ValueError):
        build_mptable(1, base=0xF0008)


@pytest.mark.parametrize("ncpus", [0, -1, 255, 1000])
def test_cpu_count_out_of_range(ncpus: int) -> None:
    with pytest.raises(ValueError):
        build_mptable(ncpus)


# ---- the configuration table header ---------------------------------------------------------

def test_header(four: MpTable) -> None:
    (signature, length, rev, _csum, oem, product, oem_ptr, oem_size, count, lapic,
     ext_len, ext_csum, _reserved) = struct.unpack("<4sHBB8s12sIHHIHBB", four.header)
    assert signature == b"PCMP"
    assert rev == 4
    assert oem == b"PYKVM   "
    assert product == b"PYKVM       "
    assert (oem_ptr, oem_size) == (0, 0)
    assert count == len(four.entries) == 4 + 1 + 1 + 15 + 2
    assert length == 44 + 4 * 20 + (1 + 1 + 15 + 2) * 8
    assert lapic == 0xFEE00000
    assert (ext_len, ext_csum) == (0, 0)


def test_entries_are_sorted_by_type(four: MpTable) -> None:
    kinds = [e[0] for e in four.entries]
    assert kinds == sorted(kinds)


# ---- entries --------------------------------------------------------------------------------

def test_one_processor_entry_per_cpu_with_bp_only_on_cpu_0(four: MpTable) -> None:
    cpus = [struct.unpack("<BBBBII8s", e) for e in four.of_type(0)]
    assert [c[1] for c in cpus] == [0, 1, 2, 3]               # APIC ids
    assert all(c[2] == 0x14 for c in cpus)                    # local APIC version
    assert [c[3] for c in cpus] == [0x03, 0x01, 0x01, 0x01]   # EN | BP, then EN
    for _, _, _, _, signature, features, reserved in cpus:
        assert (signature >> 8) & 0xF == 6                    # family 6
        assert features & 1 and features & (1 << 9)          # FPU, APIC
        assert reserved == bytes(8)


def test_one_isa_bus(four: MpTable) -> None:
    assert four.of_type(1) == [struct.pack("<BB6s", 1, 0, b"ISA   ")]


def test_io_apic_follows_the_cpu_ids(four: MpTable) -> None:
    assert four.of_type(2) == [struct.pack("<BBBBI", 2, 4, 0x11, 0x01, 0xFEC00000)]


def test_isa_interrupts(four: MpTable) -> None:
    routes = {}
    for e in four.of_type(3):
        _, irqtype, flags, bus, irq, apic, pin = struct.unpack("<BBHBBBB", e)
        assert (irqtype, flags, bus, apic) == (0, 0, 0, 4)    # INT, conforming, ISA bus, the I/O APIC
        routes[irq] = pin
    assert 2 not in routes                                    # the cascade
    assert routes == {0: 2, **{irq: irq for irq in range(1, 16) if irq != 2}}


def test_irq0_can_follow_kvms_default_routing() -> None:
    table = parse(build_mptable(1, irq0_pin=0))
    routes = {e[5]: e[7] for e in table.of_type(3)}   # source IRQ -> INTIN#
    assert routes[0] == 0 and 2 not in routes
    with pytest.raises(ValueError):
        build_mptable(1, irq0_pin=1)


def test_local_interrupts_extint_to_lint0_and_nmi_to_lint1_of_all_cpus(four: MpTable) -> None:
    lints = [struct.unpack("<BBHBBBB", e) for e in four.of_type(4)]
    assert lints == [(4, 3, 0, 0, 0, 0xFF, 0), (4, 1, 0, 0, 0, 0xFF, 1)]


# ---- any size -------------------------------------------------------------------------------

@given(st.integers(1, 254), st.integers(0, 0xFFFF).map(lambda p: p * 16))
def test_every_table_parses_and_checksums(ncpus: int, base: int) -> None:
    blob = build_mptable(ncpus, base)
    table = parse(blob, base)
    assert len(table.of_type(0)) == ncpus
    assert [e[3] & 2 for e in table.of_type(0)].count(2) == 1
    assert table.of_type(2)[0][1] == ncpus
    assert len(blob) == 16 + 44 + 20 * ncpus + 19 * 8
