"""The Multiboot v1 loader: header search, the a.out kludge, ELF kernels, the entry state and the
information structure the kernel is handed. Pure Python, no KVM."""

from __future__ import annotations

import struct

import pytest
from conftest import assert_plan_in_ram
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.boot import memory_map
from pykvm.boot.multiboot import BOOTLOADER_MAGIC, HEADER_MAGIC, MultibootHeader, find_header, load_multiboot
from pykvm.errors import BootError
from pykvm.memory import GuestMemory, MiB
from pykvm.x86.modes import CpuMode
from pykvm.x86.registers import CR0, RFLAGS

MEM = 16 * MiB
AOUT = 1 << 16
PAGE_ALIGN = 1 << 0


# --- image builders ----------------------------------------------------------------------------

def mb_header(flags: int = 0, addresses: tuple[int, int, int, int, int] | None = None,
              checksum: int | None = None) -> bytes:
    if checksum is None:
        checksum = -(HEADER_MAGIC + flags) % 2**32
    header = struct.pack("<III", HEADER_MAGIC, flags, checksum)
    if addresses is not None:
        header += struct.pack("<IIIII", *addresses)
    return header


def pattern(n: int, seed: int = 3) -> bytes:
    """``n`` recognisable bytes (a 256-byte cycle) that are unlikely to hold a stray header."""
    cycle = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (cycle * (n // 256 + 1))[:n]


def build_aout(load_addr: int = 0x100000, header_offset: int = 0x20, size: int = 0x400, bss: int = 0x1000,
               entry_offset: int = 0x40, flags: int = 0, prefix: int = 0, fields: dict | None = None) -> bytes:
    """A kernel with an a.out-kludge header: ``prefix`` bytes not loaded, then ``size`` bytes that go
    to ``load_addr``, the header ``header_offset`` bytes into them. ``fields`` override header fields."""
    values = dict(header_addr=load_addr + header_offset, load_addr=load_addr, load_end_addr=load_addr + size,
                  bss_end_addr=load_addr + size + bss if bss else 0, entry_addr=load_addr + entry_offset)
    values.update(fields or {})
    body = bytearray(pattern(size))
    header = mb_header(flags | AOUT, tuple(values[k] for k in ("header_addr", "load_addr", "load_end_addr",
                                                                 "bss_end_addr", "entry_addr")))
    body[header_offset:header_offset + len(header)] = header
    return pattern(prefix, seed=99) + bytes(body)


def build_elf(bits: int, entry: int, segments: list[tuple[int, int, bytes, int]], machine: int | None = None) -> bytes:
    """An ELF executable; segments are (paddr, vaddr, data, memsz), data placed right after the headers."""
    ehsize, phsize = (52, 32) if bits == 32 else (64, 56)
    offset = ehsize + phsize * len(segments)
    phdrs, blobs = b"", b""
    for paddr, vaddr, data, memsz in segments:
        if bits == 32:
            phdrs += struct.pack("<IIIIIIII", 1, offset, vaddr, paddr, len(data), memsz, 5, 0x1000)
        else:
            phdrs += struct.pack("<IIQQQQQQ", 1, 5, offset, vaddr, paddr, len(data), memsz, 0x1000)
        padded = data + bytes(-len(data) % 8)
        blobs += padded
        offset += len(padded)
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1, 1]) + bytes(9)
    machine = (3 if bits == 32 else 62) if machine is None else machine
    fmt = "<HHIIIIIHHHHHH" if bits == 32 else "<HHIQQQIHHHHHH"
    return ident + struct.pack(fmt, 2, machine, 1, entry, ehsize, 0, 0, ehsize, phsize, len(segments), 0, 0, 0) \
        + phdrs + blobs


def mb_elf(bits: int = 32, flags: int = 0, entry: int = 0x100010, vaddr: int = 0x100000, **kw) -> bytes:
    text = mb_header(flags) + pattern(0x100)
    return build_elf(bits, entry, [(0x100000, vaddr, text, 0x2000)], **kw)


# --- reading the plan back ---------------------------------------------------------------------

def c_string(mem: GuestMemory, addr: int) -> str:
    out = b""
    while b"\0" not in out:
        out += mem.read(addr + len(out), min(4096, mem.size - addr - len(out)))
    return out[:out.index(b"\0")].decode()


def read_info(plan, mem_size: int = MEM) -> dict:
    """Apply the plan's writes to a fresh guest RAM and decode the Multiboot information structure."""
    with GuestMemory(mem_size) as mem:
        for gpa, data in plan.writes:
            mem.write(gpa, data)
        addr = plan.cpu.regs["rbx"]
        flags, mem_lower, mem_upper, _boot_device, cmdline, mods_count, mods_addr = \
            struct.unpack("<7I", mem.read(addr, 28))
        mmap_length, mmap_addr = struct.unpack("<II", mem.read(addr + 44, 8))
        mmap, pos = [], mmap_addr
        while pos < mmap_addr + mmap_length:
            size = mem.read_u32(pos)
            assert size == 20
            mmap.append(struct.unpack("<QQI", mem.read(pos + 4, 20)))
            pos += size + 4
        modules = []
        for i in range(mods_count):
            start, end, string, reserved = struct.unpack("<4I", mem.read(mods_addr + 16 * i, 16))
            assert reserved == 0
            modules.append((start, end, mem.read(start, end - start), c_string(mem, string)))
        return dict(addr=addr, flags=flags, mem_lower=mem_lower, mem_upper=mem_upper, cmdline=c_string(mem, cmdline),
                    mmap=mmap, modules=modules, loader=c_string(mem, mem.read_u32(addr + 64)),
                    mmap_addr=mmap_addr, mods_addr=mods_addr)


def writes_by_addr(plan) -> dict[int, bytes]:
    return {gpa: bytes(data) for gpa, data in plan.writes}


# --- finding the header ------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 4, 0x100, 0x1000, 8192 - 12])
def test_header_found_at_aligned_offsets_within_8k(offset):
    image = bytes(offset) + mb_header(PAGE_ALIGN) + bytes(64)
    header = find_header(image)
    assert isinstance(header, MultibootHeader)
    assert header.offset == offset and header.flags == PAGE_ALIGN and not header.aout_kludge


@pytest.mark.parametrize("offset", [8192 - 8, 8192, 0x3000])
def test_header_not_found_beyond_8k(offset):
    image = bytes(offset) + mb_header() + bytes(64)
    assert find_header(image) is None
    with pytest.raises(BootError, match="not a Multiboot kernel"):
        load_multiboot(image, MEM, name="late.bin")


@pytest.mark.parametrize("offset", [1, 2, 3, 0x101])
def test_header_not_found_unaligned(offset):
    assert find_header(bytes(offset) + mb_header() + bytes(64)) is None


def test_wrong_checksum_is_not_a_header():
    image = mb_header(checksum=0x12345678) + bytes(64)
    assert find_header(image) is None
    with pytest.raises(BootError, match=r"bad\.bin: the Multiboot header at offset 0x0 has checksum 0x12345678"):
        load_multiboot(image, MEM, name="bad.bin")


def test_first_valid_header_wins_after_a_bad_one():
    image = mb_header(checksum=1) + bytes(4) + mb_header(PAGE_ALIGN) + mb_header(0)
    header = find_header(image)
    assert header is not None and header.offset == 16 and header.flags == PAGE_ALIGN


def test_find_header_on_tiny_images():
    for image in (b"", b"\x02\xb0\xad\x1b", mb_header()[:11]):
        assert find_header(image) is None


def test_aout_fields_are_read():
    image = build_aout(load_addr=0x200000, header_offset=0x20, size=0x400, bss=0x100, entry_offset=0x44)
    header = find_header(image)
    assert header is not None and header.aout_kludge
    assert (header.header_addr, header.load_addr, header.load_end_addr, header.bss_end_addr, header.entry_addr) == \
        (0x200020, 0x200000, 0x200400, 0x200500, 0x200044)


# --- the a.out kludge --------------------------------------------------------------------------

def test_aout_kernel_loads_where_the_header_says():
    image = build_aout(load_addr=0x100000, header_offset=0x20, size=0x400, bss=0x1000, entry_offset=0x40)
    plan = load_multiboot(image, MEM, name="k.bin")
    writes = writes_by_addr(plan)
    assert writes[0x100000] == image
    assert writes[0x100400] == bytes(0x1000)
    cpu = plan.cpu
    assert cpu.mode is CpuMode.PROT32
    assert cpu.regs["rip"] == 0x100040
    assert cpu.regs["rax"] == BOOTLOADER_MAGIC == 0x2BADB002
    assert cpu.regs["rbx"] == read_info(plan)["addr"]
    assert cpu.cr0 & CR0.PE and not cpu.cr0 & CR0.PG
    assert not cpu.regs["rflags"] & RFLAGS.IF
    assert plan.irqchip and plan.kernel == image and plan.cmdline == "k.bin"
    assert "k.bin" in plan.description and "Multiboot" in plan.description
    assert_plan_in_ram(plan, MEM)


def test_aout_skips_the_bytes_before_load_addr():
    # 0x1000 bytes of file prefix (say an a.out header) are not loaded: the header is 0x10 past load_addr
    # but 0x1010 into the file.
    image = build_aout(load_addr=0x200000, header_offset=0x10, prefix=0x1000, size=0x300, bss=0)
    plan = load_multiboot(image, MEM)
    writes = writes_by_addr(plan)
    assert writes[0x200000] == image[0x1000:0x1300]
    assert 0x200300 not in writes   # bss_end_addr 0: no bss


def test_aout_load_end_zero_loads_to_end_of_file():
    image = build_aout(load_addr=0x100000, size=0x800, bss=0, fields=dict(load_end_addr=0))
    assert writes_by_addr(load_multiboot(image, MEM))[0x100000] == image


def test_aout_load_end_may_stop_before_end_of_file():
    image = build_aout(load_addr=0x100000, size=0x800, bss=0x10,
                       fields=dict(load_end_addr=0x100200, bss_end_addr=0x100300))
    writes = writes_by_addr(load_multiboot(image, MEM))
    assert writes[0x100000] == image[:0x200]
    assert writes[0x100200] == bytes(0x100)


def test_kernel_linked_below_1mib_loads():
    image = build_aout(load_addr=0x10000, size=0x2000, bss=0x1000)
    plan = load_multiboot(image, MEM, modules=[("m", b"module", "")])
    info = read_info(plan)
    assert writes_by_addr(plan)[0x10000] == image
    assert info["addr"] == 0x9000                        # free low memory below the kernel
    (start, end, data, _), = info["modules"]
    assert start == 0x13000 and data == b"module"        # right after the kernel's bss, 4-aligned
    assert_plan_in_ram(plan, MEM)


def test_info_moves_when_the_kernel_covers_0x9000():
    image = build_aout(load_addr=0x8000, size=0x3000, bss=0x1000)
    plan = load_multiboot(image, MEM)
    info = read_info(plan)
    assert info["addr"] == 0xC000
    assert_plan_in_ram(plan, MEM)


def test_info_goes_after_kernel_and_modules_when_low_memory_is_full():
    image = build_aout(load_addr=0x8000, size=0x1000, bss=0x9F000 - 0x9000)
    plan = load_multiboot(image, MEM, modules=[("m", pattern(0x1234), "x")], cmdline="a b")
    info = read_info(plan)
    assert info["modules"][0][0] == 0x100000             # the module skips the EBDA/VGA/BIOS hole
    assert info["addr"] == 0x102000                      # page-aligned after the module
    assert_plan_in_ram(plan, MEM)


AOUT_ERRORS = {
    "load_addr above header_addr": (dict(load_addr=0x100100), "load_addr 0x100100 is above header_addr 0x100020"),
    "before the file": (dict(header_addr=0x100800), "more than the header's file offset"),
    "load_end not above": (dict(load_end_addr=0x100000), "load_end_addr 0x100000 is not above load_addr"),
    "load_end past file": (dict(load_end_addr=0x101000), "load_end_addr 0x101000"),
    "bss_end below load_end": (dict(bss_end_addr=0x100200), "bss_end_addr 0x100200"),
    "entry outside": (dict(entry_addr=0x100400), "entry_addr 0x100400"),
    "entry below": (dict(entry_addr=0xFFFFC), "entry_addr 0xffffc"),
    "above 4 GiB": (dict(load_addr=0xFFFFFF00, header_addr=0xFFFFFF20, load_end_addr=0, bss_end_addr=0,
                         entry_addr=0xFFFFFF40), "ends above 4 GiB"),
    "huge bss": (dict(bss_end_addr=0xFFFFFFFF), "does not fit in guest RAM"),
}


@pytest.mark.parametrize("case", sorted(AOUT_ERRORS))
def test_bad_aout_fields_are_boot_errors(case):
    fields, expected = AOUT_ERRORS[case]
    image = build_aout(load_addr=0x100000, header_offset=0x20, size=0x400, bss=0x100, fields=fields)
    with pytest.raises(BootError) as info:
        load_multiboot(image, MEM, name="aout.bin")
    assert expected in str(info.value) and "aout.bin" in str(info.value)


@pytest.mark.parametrize("load_addr,expected", [
    (0x400, "the boot GDT"),
    (0xF00000, "does not fit in guest RAM"),
    (0x9F000, "640 KiB and 1 MiB"),
])
def test_aout_kernel_placement_is_checked(load_addr, expected):
    image = build_aout(load_addr=load_addr, size=0x400, bss=0x200000 if load_addr == 0xF00000 else 0x1000)
    with pytest.raises(BootError, match=expected):
        load_multiboot(image, MEM, name="low.bin")


def test_truncated_aout_fields_are_a_boot_error():
    image = bytes(0x20) + mb_header(AOUT) + b"\x00\x00\x10\x00"    # only one of the five address fields
    with pytest.raises(BootError, match="flag bit 16 but its address fields"):
        load_multiboot(image, MEM)


# --- header flags ------------------------------------------------------------------------------

@pytest.mark.parametrize("bit", [3, 4, 8, 15])
def test_unsupported_required_flag_is_refused(bit):
    image = build_aout(flags=1 << bit)
    with pytest.raises(BootError, match=f"set bit {bit}, a feature the kernel requires"):
        load_multiboot(image, MEM, name="needy.bin")


def test_video_flag_is_accepted_without_video_info():
    plan = load_multiboot(build_aout(flags=1 << 2), MEM)
    assert read_info(plan)["flags"] & ((1 << 11) | (1 << 12)) == 0


@pytest.mark.parametrize("bit", [17, 20, 31])
def test_optional_flags_beyond_16_are_ignored(bit):
    """An optional flag pykvm does not know changes nothing the kernel gets: the same info
    structure and the same entry state as without it."""
    plain, flagged = load_multiboot(build_aout(), MEM), load_multiboot(build_aout(flags=1 << bit), MEM)
    assert read_info(flagged) == read_info(plain)
    assert flagged.cpu.regs == plain.cpu.regs and flagged.cpu.mode is plain.cpu.mode


def test_memory_info_flag_is_honoured():
    info = read_info(load_multiboot(build_aout(flags=1 << 1), MEM))
    assert info["flags"] & 1 and info["flags"] & (1 << 6)


# --- ELF kernels -------------------------------------------------------------------------------

def test_elf32_multiboot_kernel():
    image = mb_elf(32)
    plan = load_multiboot(image, MEM, name="k.elf")
    writes = writes_by_addr(plan)
    assert writes[0x100000][:4] == struct.pack("<I", HEADER_MAGIC)
    assert plan.cpu.mode is CpuMode.PROT32 and plan.cpu.regs["rip"] == 0x100010
    assert plan.cpu.regs["rax"] == BOOTLOADER_MAGIC
    assert "ELF32" in plan.description
    assert_plan_in_ram(plan, MEM)


def test_elf64_multiboot_kernel_is_entered_in_32_bit_mode():
    plan = load_multiboot(mb_elf(64), MEM)
    assert plan.cpu.mode is CpuMode.PROT32 and plan.cpu.regs["rip"] == 0x100010
    assert not plan.cpu.efer and not plan.cpu.cr0 & CR0.PG


def test_higher_half_elf_entry_is_translated_to_physical():
    plan = load_multiboot(mb_elf(32, entry=0xC0100010, vaddr=0xC0100000), MEM)
    assert plan.cpu.regs["rip"] == 0x100010


def test_elf_without_aout_kludge_must_be_elf():
    with pytest.raises(BootError, match="does not set flag bit 16.*not ELF"):
        load_multiboot(mb_header() + bytes(64), MEM, name="raw.bin")


@pytest.mark.parametrize("image,expected", [
    (mb_elf(32, machine=62), "e_machine is 62"),
    (mb_elf(32, entry=0x200000), "e_entry 0x200000"),
    (build_elf(64, 0x100000, [(0x100000000, 0x100000000, mb_header(), 0x100)]), "e_entry 0x100000"),
])
def test_bad_elf_multiboot_kernel(image, expected):
    with pytest.raises(BootError, match=expected):
        load_multiboot(image, MEM)


def test_elf64_segment_above_4gib_is_refused():
    image = build_elf(64, 0x100000, [(0x100000, 0x100000, mb_header(), 0x100),
                                     (0x100000000, 0x100000000, b"hi", 0x10)])
    with pytest.raises(BootError, match="ends above 0x100000000"):
        load_multiboot(image, 5 << 30)


# --- the information structure -----------------------------------------------------------------

def test_information_structure():
    initrd, extra = pattern(5000, seed=1), b"E" * 10
    image = build_aout(flags=PAGE_ALIGN, size=0x1800, bss=0x2345)
    plan = load_multiboot(image, MEM, cmdline="console=ttyS0 debug", name="mykernel",
                          modules=[("initrd.img", initrd, "root=/dev/ram"), ("extra", extra, "")])
    info = read_info(plan)
    assert info["flags"] == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert info["mem_lower"] == 639
    assert info["mem_upper"] == (MEM - MiB) // 1024
    assert info["mmap"] == [(start, length, kind) for start, length, kind in memory_map(MEM)]
    assert info["cmdline"] == plan.cmdline == "mykernel console=ttyS0 debug"
    assert info["loader"] == "pykvm"
    kernel_end = 0x100000 + 0x1800 + 0x2345
    (s1, e1, d1, str1), (s2, e2, d2, str2) = info["modules"]
    assert s1 % 4096 == 0 and s2 % 4096 == 0
    assert kernel_end <= s1 and e1 == s1 + len(initrd) <= s2 and e2 == s2 + len(extra)
    assert (d1, str1, d2, str2) == (initrd, "initrd.img root=/dev/ram", extra, "extra")
    assert info["addr"] == 0x9000
    assert_plan_in_ram(plan, MEM)


def test_modules_are_4_aligned_without_flag_bit_0():
    plan = load_multiboot(build_aout(size=0x401, bss=0, fields=dict(load_end_addr=0)), MEM,
                          modules=[("a", b"123", ""), ("b", b"4567", "x y"), ("c", b"", "")])
    (s1, e1, _, _), (s2, e2, d2, str2), (s3, e3, _, _) = read_info(plan)["modules"]
    assert (s1, e1, s2, e2, s3, e3) == (0x100404, 0x100407, 0x100408, 0x10040C, 0x10040C, 0x10040C)
    assert d2 == b"4567" and str2 == "b x y"


def test_no_cmdline_means_just_the_name():
    plan = load_multiboot(build_aout(), MEM, name="/boot/kernel")
    assert read_info(plan)["cmdline"] == plan.cmdline == "/boot/kernel"


def test_small_guest_has_no_upper_memory():
    plan = load_multiboot(build_aout(load_addr=0x10000), MiB)
    info = read_info(plan, MiB)
    assert (info["mem_lower"], info["mem_upper"]) == (639, 0)
    assert info["mmap"] == list(memory_map(MiB))


def test_modules_that_do_not_fit_are_a_boot_error():
    with pytest.raises(BootError, match=r"module 0 \(big\): no room"):
        load_multiboot(build_aout(), 2 * MiB, modules=[("big", bytes(MiB), "")])


def test_huge_command_line_moves_info_above_the_kernel():
    plan = load_multiboot(build_aout(), MEM, cmdline="x" * 0x70000)
    info = read_info(plan)
    assert info["addr"] == 0x102000 and len(info["cmdline"]) == 0x70000 + len("kernel ")
    assert_plan_in_ram(plan, MEM)


def test_no_room_for_info_is_a_boot_error():
    with pytest.raises(BootError, match="Multiboot information structure"):
        load_multiboot(build_aout(), 2 * MiB, cmdline="x" * MiB)


def test_nul_in_command_line_is_a_boot_error():
    with pytest.raises(BootError, match="NUL"):
        load_multiboot(build_aout(), MEM, cmdline="a\0b")
    with pytest.raises(BootError, match="NUL"):
        load_multiboot(build_aout(), MEM, modules=[("m\0", b"", "")])


# --- fuzzing -----------------------------------------------------------------------------------

INTERESTING = [0, 1, 0x400, 0x9000, 0x100000, 0x7FFFFFFF, 0x80000000, 0xFFFFF000, 0xFFFFFFFF]
FUZZ_AOUT = build_aout(load_addr=0x100000, header_offset=0x20, size=0x200, bss=0x300)
FUZZ_ELF = mb_elf(32)


@st.composite
def mutated_multiboot(draw, image: bytes, header_offset: int):
    """Header words and bytes replaced, the checksum often repaired so the header still counts."""
    data = bytearray(image)
    region = header_offset + 32
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            pos = draw(st.integers(0, region // 4 - 1)) * 4
            value = draw(st.sampled_from(INTERESTING) | st.integers(0, 2**32 - 1)
                         | st.integers(-0x1000, 0x1000).map(lambda d: (0x100000 + d) % 2**32))
            data[pos:pos + 4] = value.to_bytes(4, "little")
        else:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 3)):
        magic, flags = struct.unpack_from("<II", data, header_offset)
        struct.pack_into("<I", data, header_offset + 8, -(magic + flags) % 2**32)
    if draw(st.integers(0, 3)) == 0:
        keep = draw(st.integers(0, len(data)))
        data = data[:keep] if draw(st.booleans()) else data[:len(data) - keep]
    return bytes(data)


def _load_or_boot_error(image: bytes, **kw):
    try:
        plan = load_multiboot(image, MEM, name="fuzz.bin", **kw)
    except BootError as e:
        assert "fuzz.bin" in str(e) or "module" in str(e)
        return None
    assert_plan_in_ram(plan, MEM)
    assert plan.cpu.regs["rax"] == BOOTLOADER_MAGIC
    return plan


@settings(max_examples=300, deadline=None)
@given(image=mutated_multiboot(FUZZ_AOUT, 0x20))
def test_mutated_aout_kernel_is_boot_error_or_safe_plan(image):
    _load_or_boot_error(image, modules=[("m", b"mod", "arg")])


@settings(max_examples=300, deadline=None)
@given(image=mutated_multiboot(FUZZ_ELF, 52 + 32))
def test_mutated_elf_multiboot_kernel_is_boot_error_or_safe_plan(image):
    _load_or_boot_error(image)


@settings(max_examples=300, deadline=None)
@given(load_addr=st.sampled_from([0x8000, 0x10000, 0x20000, 0x100000, 0x400000]),
       size=st.integers(0x40, 0x30000), bss=st.integers(0, 0x100000), flags=st.sampled_from([0, PAGE_ALIGN]),
       modules=st.lists(st.tuples(st.text("abc", max_size=5), st.integers(0, 0x20000), st.text("xyz ", max_size=8)),
                        max_size=4),
       cmdline=st.text(max_size=40).filter(lambda s: "\0" not in s))
def test_any_layout_is_boot_error_or_consistent_plan(load_addr, size, bss, flags, modules, cmdline):
    image = build_aout(load_addr=load_addr, size=size, bss=bss, flags=flags)
    mods = [(name or "m", bytes([i + 1]) * n, args) for i, (name, n, args) in enumerate(modules)]
    plan = _load_or_boot_error(image, modules=mods, cmdline=cmdline)
    if plan is None:
        return
    info = read_info(plan)
    assert info["cmdline"] == (f"fuzz.bin {cmdline}" if cmdline else "fuzz.bin")
    assert [m[2] for m in info["modules"]] == [m[1] for m in mods]
    align = 4096 if flags else 4
    assert all(m[0] % align == 0 and m[0] >= load_addr + size + bss for m in info["modules"])
