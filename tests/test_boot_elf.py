"""The ELF loader: header validation, segment placement, entry state, notes. Pure Python, no KVM."""

from __future__ import annotations

import struct

import pytest
from conftest import assert_plan_in_ram
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.boot.elf import PT_LOAD, PT_NOTE, ElfImage, LoadSegment, find_note, load_elf, parse_elf
from pykvm.errors import BootError
from pykvm.memory import GiB, GuestMemory, MiB
from pykvm.x86.modes import GDT_ADDR, PAGE_TABLES_ADDR, CpuMode
from pykvm.x86.registers import CR0, RFLAGS

MEM = 16 * MiB
CODE = bytes(range(1, 0x41))     # stand-in instructions


# --- a small ELF builder ---------------------------------------------------------------------

def seg(paddr: int, data: bytes = b"", memsz: int | None = None, **kw) -> dict:
    """A program header description for :func:`build_elf` (type PT_LOAD unless ``type`` is given)."""
    return dict(paddr=paddr, data=data, memsz=len(data) if memsz is None else memsz, **kw)


def build_elf(bits: int = 32, entry: int = 0x100000, segments: list[dict] | None = None, *, e_type: int = 2,
              machine: int | None = None, version: int = 1, elf_class: int | None = None, data_enc: int = 1,
              ident_version: int = 1, phentsize: int | None = None, phnum: int | None = None,
              phoff: int | None = None) -> bytes:
    if segments is None:
        segments = [seg(0x100000, CODE, 0x100)]
    ehsize, phsize = (52, 32) if bits == 32 else (64, 56)
    data_start = ehsize + phsize * len(segments)
    blobs = bytearray()
    phdrs = bytearray()
    for s in segments:
        data = s["data"]
        offset = s.get("offset", data_start + len(blobs))
        if "offset" not in s:
            blobs += data + bytes(-len(data) % 8)
        fields = (s.get("type", PT_LOAD), offset, s.get("vaddr", s["paddr"]), s["paddr"], s.get("filesz", len(data)),
                  s["memsz"], s.get("flags", 5), s.get("align", 0x1000))
        if bits == 32:
            phdrs += struct.pack("<IIIIIIII", *fields)
        else:
            p_type, p_offset, vaddr, paddr, filesz, memsz, flags, align = fields
            phdrs += struct.pack("<IIQQQQQQ", p_type, flags, p_offset, vaddr, paddr, filesz, memsz, align)
    ident = b"\x7fELF" + bytes([elf_class or (1 if bits == 32 else 2), data_enc, ident_version]) + bytes(9)
    machine = (3 if bits == 32 else 62) if machine is None else machine
    rest = (phentsize if phentsize is not None else phsize, len(segments) if phnum is None else phnum, 0, 0, 0)
    fmt = "<HHIIIIIHHHHHH" if bits == 32 else "<HHIQQQIHHHHHH"
    header = struct.pack(fmt, e_type, machine, version, entry, ehsize if phoff is None else phoff, 0, 0, ehsize,
                         *rest)
    return ident + header + bytes(phdrs) + bytes(blobs)


def note(owner: bytes, n_type: int, desc: bytes, align: int = 4) -> bytes:
    name = owner + b"\0"
    head = struct.pack("<III", len(name), len(desc), n_type) + name
    body = head + bytes(-len(head) % align) + desc
    return body + bytes(-len(body) % align)


def writes_by_addr(plan) -> dict[int, bytes]:
    return {gpa: bytes(data) for gpa, data in plan.writes}


def memory_after(plan, size: int = MEM) -> GuestMemory:
    mem = GuestMemory(size)
    for gpa, data in plan.writes:
        mem.write(gpa, data)
    return mem


# --- loading good images ---------------------------------------------------------------------

def test_elf32_segments_load_at_paddr_with_bss_zeroed():
    text = CODE
    data = b"DATA" * 4
    image = build_elf(32, entry=0x100010, segments=[
        seg(0x100000, text, vaddr=0xC0100000),
        seg(0x200000, data, memsz=0x3000, flags=6),
    ])
    plan = load_elf(image, MEM, name="k.elf")
    writes = writes_by_addr(plan)
    assert writes[0x100000] == text
    assert writes[0x200000] == data
    assert writes[0x200000 + len(data)] == bytes(0x3000 - len(data))
    assert plan.cpu.mode is CpuMode.PROT32
    assert plan.cpu.regs["rip"] == 0x100010 and plan.cpu.regs["rsp"] == 0x7000
    assert not plan.cpu.regs["rflags"] & RFLAGS.IF
    assert plan.cpu.cr0 & CR0.PE and not plan.cpu.cr0 & CR0.PG
    assert GDT_ADDR in writes
    assert plan.irqchip and plan.kernel == image
    assert "k.elf" in plan.description and "ELF32" in plan.description
    with memory_after(plan) as mem:
        assert mem.read(0x100000, len(text)) == text
        assert mem.read(0x200000, 0x3000) == data + bytes(0x3000 - len(data))


def test_elf64_enters_long_mode_with_page_tables():
    image = build_elf(64, entry=0x800020, segments=[seg(0x800000, CODE, 0x2000)])
    plan = load_elf(image, MEM)
    assert plan.cpu.mode is CpuMode.LONG64
    assert plan.cpu.regs["rip"] == 0x800020
    writes = writes_by_addr(plan)
    assert writes[0x800000] == CODE
    assert writes[0x800000 + len(CODE)] == bytes(0x2000 - len(CODE))
    assert PAGE_TABLES_ADDR in writes


def test_parse_elf_reports_segments():
    image = build_elf(64, entry=0x100000, segments=[seg(0x100000, CODE, 0x80, vaddr=0xFFFFFFFF80100000),
                                                   seg(0x300000, b"", 0x10, type=7)])   # PT_TLS: ignored
    elf = parse_elf(image, "k")
    assert isinstance(elf, ElfImage)
    assert elf.bits == 64 and elf.entry == 0x100000
    assert elf.segments == [LoadSegment(0x100000, 0xFFFFFFFF80100000, CODE, 0x80)]


def test_large_bss_is_written_in_shared_chunks():
    image = build_elf(32, segments=[seg(0x100000, CODE, 9 * MiB + 5)])
    plan = load_elf(image, MEM)
    zeros = [(gpa, data) for gpa, data in plan.writes if gpa > 0x100000]
    assert sum(len(d) for _, d in zeros) == 9 * MiB + 5 - len(CODE)
    assert all(not any(d[:64]) for _, d in zeros)
    pos = 0x100000 + len(CODE)
    for gpa, data in zeros:
        assert gpa == pos
        pos += len(data)


def test_zero_size_segment_is_ignored():
    image = build_elf(32, segments=[seg(0x100000, CODE), seg(0x100000, b"", 0)])
    assert writes_by_addr(load_elf(image, MEM))[0x100000] == CODE


def test_bytearray_and_memoryview_images_are_accepted():
    image = build_elf(32)
    assert load_elf(bytearray(image), MEM).kernel == image
    assert load_elf(memoryview(image), MEM).kernel == image


# --- validation: every bad field is a BootError naming it ------------------------------------

def _patch(image: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(image)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


GOOD32 = build_elf(32)
GOOD64 = build_elf(64)

BAD_IMAGES = {
    "empty": (b"", "not an ELF file"),
    "magic": (b"\x7fELG" + GOOD32[4:], "ELF magic"),
    "class": (build_elf(32, elf_class=3), "EI_CLASS is 3"),
    "truncated header": (GOOD64[:40], "header needs 64 bytes"),
    "big endian": (build_elf(32, data_enc=2), "EI_DATA is 2"),
    "ident version": (build_elf(32, ident_version=0), "EI_VERSION is 0"),
    "dyn": (build_elf(64, e_type=3), "ET_DYN"),
    "rel": (build_elf(32, e_type=1), "e_type is 1"),
    "machine32": (build_elf(32, machine=62), "e_machine is 62"),
    "machine64": (build_elf(64, machine=3), "e_machine is 3"),
    "version": (build_elf(32, version=2), "e_version is 2"),
    "phnum 0": (build_elf(32, phnum=0), "e_phnum is 0"),
    "pn_xnum": (build_elf(32, phnum=0xFFFF), "PN_XNUM"),
    "phentsize": (build_elf(64, phentsize=32), "e_phentsize is 32"),
    "phoff 0": (build_elf(32, phoff=0), "e_phoff 0x0"),
    "phoff past end": (build_elf(32, phoff=0x10000), "e_phoff 0x10000"),
    "phdrs truncated": (GOOD32[:52 + 16], "e_phoff"),
    "p_offset": (build_elf(32, segments=[seg(0x100000, CODE, offset=0x5000)]), "p_offset 0x5000"),
    "p_filesz": (build_elf(32, segments=[seg(0x100000, CODE, filesz=0x10000)]), "p_filesz 0x10000"),
    "filesz > memsz": (build_elf(32, segments=[seg(0x100000, CODE, memsz=8)]), "larger than p_memsz 0x8"),
    "paddr wraps 32": (build_elf(32, segments=[seg(0xFFFFF000, CODE, 0x2000)]), "p_paddr 0xfffff000"),
    "vaddr wraps 32": (build_elf(32, segments=[seg(0x100000, CODE, vaddr=0xFFFFFFF0)]), "p_vaddr 0xfffffff0"),
    "paddr wraps 64": (build_elf(64, segments=[seg(2**64 - 0x10, CODE)]), "wraps past the 64-bit"),
    "huge memsz 64": (build_elf(64, segments=[seg(0x100000, CODE, 2**63)]), "does not fit in guest RAM"),
    "no PT_LOAD": (build_elf(32, segments=[seg(0x100000, CODE, type=PT_NOTE)]), "no PT_LOAD"),
    "overlap": (build_elf(32, segments=[seg(0x100000, CODE, 0x1000), seg(0x100800, CODE)]), "overlap"),
    "entry outside": (build_elf(32, entry=0x500000), "e_entry 0x500000"),
    "entry in bss-less gap": (build_elf(32, entry=0x100100), "e_entry 0x100100"),
    "entry64 above 4G": (build_elf(64, entry=0xFFFFFFFF80100000, segments=[seg(0x100000, CODE,
                                                                              vaddr=0xFFFFFFFF80100000)]),
                         "e_entry 0xffffffff80100000"),
    "too big for RAM": (build_elf(32, entry=0x1000000, segments=[seg(0x1000000, CODE, 0x100)]),
                        "does not fit in guest RAM"),
    "over the GDT": (build_elf(32, entry=0x400, segments=[seg(0x400, CODE, 0x200)]), "the boot GDT"),
    "over page tables (64)": (build_elf(64, entry=0x70000, segments=[seg(0x70000, CODE)]), "page tables"),
    "over the VGA hole": (build_elf(32, entry=0xA0000, segments=[seg(0xA0000, CODE)]), "640 KiB and 1 MiB"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_a_boot_error_naming_the_problem(case):
    image, expected = BAD_IMAGES[case]
    with pytest.raises(BootError) as info:
        load_elf(image, MEM, name="bad.elf")
    message = str(info.value)
    assert expected in message
    assert "bad.elf" in message
    assert "\n" not in message


def test_elf32_low_load_below_1mib_avoiding_gdt_is_fine():
    plan = load_elf(build_elf(32, entry=0x8000, segments=[seg(0x8000, CODE)]), MEM)
    assert writes_by_addr(plan)[0x8000] == CODE


def test_elf64_page_table_area_is_free_for_elf32():
    plan = load_elf(build_elf(32, entry=0x70000, segments=[seg(0x70000, CODE)]), MEM)
    assert writes_by_addr(plan)[0x70000] == CODE


def test_elf64_may_load_above_4gib_when_ram_is_there():
    mem = 4 * GiB   # 3 GiB low + 1 GiB from 4 GiB up
    image = build_elf(64, entry=0x100000, segments=[seg(0x100000, CODE), seg(0x100000000, b"hi", 0x1000)])
    writes = writes_by_addr(load_elf(image, mem))
    assert writes[0x100000000] == b"hi"


# --- notes -------------------------------------------------------------------------------------

def _with_notes(payload: bytes, bits: int = 64, align: int = 4) -> bytes:
    return build_elf(bits, segments=[seg(0x100000, CODE, 0x100), seg(0, payload, 0, type=PT_NOTE, align=align)])


def test_find_note_returns_the_matching_descriptor():
    entry = struct.pack("<I", 0x1000040)
    image = _with_notes(note(b"GNU", 3, b"\x01\x02\x03\x04\x05") + note(b"Xen", 17, b"no") + note(b"Xen", 18, entry))
    assert find_note(image, b"Xen", 18) == entry
    assert find_note(image, b"GNU", 3) == b"\x01\x02\x03\x04\x05"
    assert find_note(image, b"Xen", 19) is None
    assert find_note(image, b"Xe", 18) is None
    assert find_note(build_elf(32), b"Xen", 18) is None


def test_find_note_with_8_byte_alignment():
    image = _with_notes(note(b"GNU", 5, b"abcdefghijkl", align=8) + note(b"Xen", 18, b"\x10\x00\x00\x01", align=8),
                        align=8)
    assert find_note(image, b"Xen", 18) == b"\x10\x00\x00\x01"


@pytest.mark.parametrize("payload,expected", [
    (b"\x04\x00\x00\x00\x04", "truncated"),
    (struct.pack("<III", 4, 0x100, 18) + b"Xen\0", "runs past the end"),
    (struct.pack("<III", 0xFFFFFFFF, 4, 18), "namesz 0xffffffff"),
])
def test_find_note_rejects_malformed_notes(payload, expected):
    with pytest.raises(BootError, match=expected):
        find_note(_with_notes(payload), b"Xen", 18, name="pvh.elf")


def test_find_note_rejects_a_note_segment_outside_the_file():
    image = build_elf(64, segments=[seg(0x100000, CODE), seg(0, b"", 0, type=PT_NOTE, offset=0x9000, filesz=16)])
    with pytest.raises(BootError, match="PT_NOTE.*p_offset 0x9000"):
        find_note(image, b"Xen", 18)


# --- fuzzing: a mutated image is a clean BootError or a plan that stays in RAM -------------------


INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000, 0xFFFFF000]


@st.composite
def mutated(draw, image: bytes, start: int = 4):
    """``image`` with a few bytes or aligned words from ``start`` on replaced, sometimes truncated.

    The ELF magic (bytes 0-3) is left alone by default: a wrong magic is tested above, and keeping it
    lets most examples reach the deeper checks.
    """
    data = bytearray(image)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "u32", "u64"]))
        if kind == "byte":
            pos = draw(st.integers(start, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        else:
            size = 4 if kind == "u32" else 8
            pos = draw(st.integers(start // 4, (len(data) - size) // 4)) * 4
            value = draw(st.sampled_from(INTERESTING) | st.integers(0, 2 ** (8 * size) - 1))
            data[pos:pos + size] = value.to_bytes(size, "little")
    if draw(st.integers(0, 3)) == 0:     # truncate: shortest-first and longest-first equally often
        keep = draw(st.integers(0, len(data)))
        data = data[:keep] if draw(st.booleans()) else data[:len(data) - keep]
    return bytes(data)


FUZZ32 = build_elf(32, entry=0x100004, segments=[seg(0x100000, CODE, 0x100), seg(0x180000, b"dd", 0x40)])
FUZZ64 = build_elf(64, entry=0x100004, segments=[seg(0x100000, CODE, 0x100), seg(0x180000, b"dd", 0x40),
                                                seg(0, note(b"Xen", 18, b"\0\0\x10\0"), 0, type=PT_NOTE)])


@settings(max_examples=300, deadline=None)
@given(image=mutated(FUZZ32))
def test_mutated_elf32_is_boot_error_or_safe_plan(image):
    try:
        plan = load_elf(image, MEM, name="fuzz.elf")
    except BootError as e:
        assert "fuzz.elf" in str(e)
        return
    assert_plan_in_ram(plan, MEM)


@settings(max_examples=300, deadline=None)
@given(image=mutated(FUZZ64))
def test_mutated_elf64_is_boot_error_or_safe_plan(image):
    try:
        desc = find_note(image, b"Xen", 18, name="fuzz.elf")
        assert desc is None or isinstance(desc, bytes)
        plan = load_elf(image, MEM, name="fuzz.elf")
    except BootError as e:
        assert "fuzz.elf" in str(e)
        return
    assert_plan_in_ram(plan, MEM)
