"""Multiboot v1 kernels: the boot protocol GRUB and QEMU's -kernel speak to hobby and research OSes.

The kernel carries a header (magic 0x1BADB002, flags, checksum) 4-byte aligned in its first
8192 bytes. Its flags say what it needs from the boot loader; with flag bit 16 (the "a.out kludge")
the header also says where to load the file, otherwise the file is ELF and its program headers do.

At entry the CPU is in 32-bit protected mode with paging off and interrupts disabled, EAX holds
0x2BADB002 and EBX the physical address of the Multiboot information structure: memory sizes, the
memory map, the command line, the boot modules and the boot loader's name.

pykvm provides no framebuffer: a kernel that sets flag bit 2 (video mode wanted) is still booted,
with no video information (info flags bits 11 and 12 stay clear), as in a text-only console.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import BootError
from ..x86.modes import CpuMode, initial_state, reserved_ranges
from . import E820_RAM, BootPlan, allocate, c_string, check_fits, clip, memory_map, ram_below_4g
from .elf import (
    DEFAULT_STACK,
    LoadSegment,
    check_and_place_segments,
    is_elf,
    load_writes,
    parse_elf,
    physical_entry,
)

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002     # what EAX holds at the kernel's entry
SEARCH_LIMIT = 8192               # the header lies wholly within the file's first 8 KiB

# Header flags (bits 0-15: the kernel requires them; 16-31: optional features).
FLAG_PAGE_ALIGN = 1 << 0          # load modules on 4 KiB boundaries
FLAG_MEMORY_INFO = 1 << 1         # mem_lower/mem_upper (and the mmap if we have one) wanted
FLAG_VIDEO_MODE = 1 << 2          # a video mode table wanted (we give none; see the module docstring)
FLAG_AOUT_KLUDGE = 1 << 16        # the header's address fields say where to load the image
SUPPORTED_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

# Information-structure flags: which of its fields are valid.
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9

INFO_SIZE = 116                   # flags .. the framebuffer fields; only the ones flagged are filled
MMAP_ENTRY = struct.Struct("<IQQI")   # size (of the rest: 20), base_addr, length, type
MODULE_ENTRY = struct.Struct("<IIII")   # mod_start, mod_end (exclusive), string, reserved
LOADER_NAME = "pykvm"

INFO_PREFERRED = (0x9000, 0x70000)   # free low memory below pykvm's page-table area
PAGE = 0x1000
FOUR_GIB = 1 << 32

_HEADER = struct.Struct("<III")
_ADDRESSES = struct.Struct("<IIIII")


@dataclass
class MultibootHeader:
    """The Multiboot v1 header found in a kernel image (flags and a.out kludge addresses)."""
    offset: int                        # where the magic is, in the file
    flags: int
    checksum: int
    # The a.out-kludge address fields, read when flag bit 16 is set and they lie in the searched
    # area (file and first 8 KiB); None otherwise.
    header_addr: int | None = None
    load_addr: int | None = None
    load_end_addr: int | None = None
    bss_end_addr: int | None = None
    entry_addr: int | None = None

    @property
    def aout_kludge(self) -> bool:
        """True if the header gives the load addresses itself (flags bit 16)."""
        return bool(self.flags & FLAG_AOUT_KLUDGE)


def find_header(image: bytes) -> MultibootHeader | None:
    """The first Multiboot header (magic and checksum valid) in the image's first 8 KiB, or None."""
    image = bytes(image)
    area = min(len(image), SEARCH_LIMIT)
    for offset in range(0, area - _HEADER.size + 1, 4):
        magic, flags, checksum = _HEADER.unpack_from(image, offset)
        if magic != HEADER_MAGIC or (magic + flags + checksum) % FOUR_GIB:
            continue
        header = MultibootHeader(offset, flags, checksum)
        fields_at = offset + _HEADER.size
        if flags & FLAG_AOUT_KLUDGE and fields_at + _ADDRESSES.size <= area:
            (header.header_addr, header.load_addr, header.load_end_addr, header.bss_end_addr,
             header.entry_addr) = _ADDRESSES.unpack_from(image, fields_at)
        return header
    return None


def load_multiboot(image: bytes, mem_size: int, cmdline: str = "",
                   modules: Sequence[tuple[str, bytes, str]] = (), name: str = "kernel") -> BootPlan:
    """Load a Multiboot v1 kernel and its modules, and build the information structure it is given.

    ``modules`` are (name, contents, arguments); each module's string is "name arguments".
    """
    image = bytes(image)
    header = find_header(image)
    if header is None:
        raise BootError(_no_header_message(image, name))
    required = header.flags & 0xFFFF & ~SUPPORTED_REQUIRED
    if required:
        bit = (required & -required).bit_length() - 1
        raise BootError(f"{name}: Multiboot header flags {header.flags:#010x} set bit {bit}, a feature the kernel "
                        "requires but pykvm does not provide (only bits 0, 1, 2 and 16 are supported)")
    mode = CpuMode.PROT32

    # The kernel: where each piece goes, and the entry point.
    label = None
    if header.aout_kludge:
        segments, entry = _aout_layout(image, header, name)
        kind = "a.out kludge"
        label = f"{name} (load_addr {segments[0].paddr:#x}, {segments[0].memsz:#x} bytes with its bss)"
    else:
        if not is_elf(image):
            raise BootError(f"{name}: its Multiboot header (offset {header.offset:#x}) does not set flag bit 16 "
                            "(load addresses in the header) and the file is not ELF, so there is no way to know "
                            "where to load it")
        elf = parse_elf(image, name)
        segments = elf.segments
        entry = physical_entry(elf, name, allow_virtual=True)
        kind = f"ELF{elf.bits}"
    writes = check_and_place_segments(segments, mem_size, mode, name, limit=FOUR_GIB, label=label)
    kernel = [(s.paddr, s.paddr + s.memsz) for s in segments if s.memsz]   # not empty: the entry is in one
    kernel_start, kernel_end = min(start for start, _ in kernel), max(end for _, end in kernel)
    occupied = kernel + [(start, end) for start, end, _ in reserved_ranges(mode)]

    # Boot modules, after the kernel.
    full_cmdline = f"{name} {cmdline}" if cmdline else name
    align = PAGE if header.flags & FLAG_PAGE_ALIGN else 4
    ram = ram_below_4g(mem_size)
    module_entries: list[tuple[int, int, bytes]] = []     # start, end, string
    for index, (mod_name, data, args) in enumerate(modules):
        data = bytes(data)
        what = f"module {index} ({mod_name})"
        start = allocate(len(data), align, clip(ram, kernel_end), occupied)
        if start is None:
            raise BootError(f"{what}: no room for its {len(data)} bytes in guest RAM below 4 GiB after the kernel; "
                            "give the guest more memory with --mem")
        check_fits(what, start, len(data), mem_size)
        occupied.append((start, start + len(data)))
        writes += load_writes(start, data, len(data))
        module_entries.append((start, start + len(data), c_string(f"{mod_name} {args}" if args else mod_name,
                                                                   f"the string of {what}", name)))

    # The information structure and everything it points to, as one block.
    cmdline_bytes = c_string(full_cmdline, "the command line", name)
    loader_bytes = c_string(LOADER_NAME, "the boot loader name", name)
    mmap = memory_map(mem_size)
    mmap_off = INFO_SIZE
    mods_off = mmap_off + MMAP_ENTRY.size * len(mmap)
    strings_off = mods_off + MODULE_ENTRY.size * len(module_entries)
    block_size = strings_off + len(cmdline_bytes) + len(loader_bytes) + sum(len(s) for _, _, s in module_entries)
    info = allocate(block_size, 16, clip(ram, *INFO_PREFERRED), occupied)
    if info is None:
        highest = max(end for _, end in occupied)
        info = allocate(block_size, PAGE, clip(ram, highest), occupied)
    if info is None:
        raise BootError(f"{name}: no room in guest RAM below 4 GiB for the {block_size}-byte Multiboot information "
                        "structure; give the guest more memory with --mem or shorten the command line")
    check_fits("the Multiboot information structure", info, block_size, mem_size)
    block = bytearray(block_size)
    strings = bytearray()

    def add_string(data: bytes) -> int:
        addr = info + strings_off + len(strings)
        strings.extend(data)
        return addr

    cmdline_addr = add_string(cmdline_bytes)
    loader_addr = add_string(loader_bytes)
    for i, (start, end, string) in enumerate(module_entries):
        MODULE_ENTRY.pack_into(block, mods_off + i * MODULE_ENTRY.size, start, end, add_string(string), 0)
    for i, (start, length, kind_) in enumerate(mmap):
        MMAP_ENTRY.pack_into(block, mmap_off + i * MMAP_ENTRY.size, MMAP_ENTRY.size - 4, start, length, kind_)
    block[strings_off:] = strings
    mem_lower, mem_upper = _memory_sizes(mmap)
    struct.pack_into("<III", block, 0, INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME,
                     mem_lower, mem_upper)
    struct.pack_into("<III", block, 16, cmdline_addr, len(module_entries), info + mods_off)
    struct.pack_into("<II", block, 44, MMAP_ENTRY.size * len(mmap), info + mmap_off)
    struct.pack_into("<I", block, 64, loader_addr)
    writes.append((info, bytes(block)))

    cpu, mode_writes = initial_state(mode, entry=entry, stack=DEFAULT_STACK)
    cpu.regs["rax"] = BOOTLOADER_MAGIC
    cpu.regs["rbx"] = info
    return BootPlan(cpu=cpu, writes=mode_writes + writes, irqchip=True, cmdline=full_cmdline, kernel=image,
                    description=f"{name}: Multiboot ({kind}) at {kernel_start:#x}-{kernel_end - 1:#x}, "
                                f"entry {entry:#x}, "
                                f"{len(module_entries)} module(s), info at {info:#x}, {mode.description}")


def _aout_layout(image: bytes, header: MultibootHeader, name: str) -> tuple[list[LoadSegment], int]:
    """The one segment and entry point the header's a.out-kludge address fields describe."""
    where = f"{name}: Multiboot header at offset {header.offset:#x}"
    if header.header_addr is None:
        raise BootError(f"{where} sets flag bit 16 but its address fields (20 bytes after the checksum) run past "
                        f"the end of the file or its first {SEARCH_LIMIT} bytes; the image is truncated")
    header_addr, load_addr = header.header_addr, header.load_addr
    load_end_addr, bss_end_addr, entry_addr = header.load_end_addr, header.bss_end_addr, header.entry_addr
    assert load_addr is not None and load_end_addr is not None
    assert bss_end_addr is not None and entry_addr is not None
    if load_addr > header_addr:
        raise BootError(f"{where}: load_addr {load_addr:#x} is above header_addr {header_addr:#x}; the spec "
                        "requires load_addr <= header_addr")
    file_start = header.offset - (header_addr - load_addr)
    if file_start < 0:
        raise BootError(f"{where}: header_addr {header_addr:#x} - load_addr {load_addr:#x} is more than the "
                        f"header's file offset, so loading would start {-file_start:#x} bytes before the file")
    if load_end_addr == 0:
        load_size = len(image) - file_start
    else:
        if load_end_addr <= load_addr:
            raise BootError(f"{where}: load_end_addr {load_end_addr:#x} is not above load_addr {load_addr:#x}")
        load_size = load_end_addr - load_addr
        if file_start + load_size > len(image):
            raise BootError(f"{where}: load_end_addr {load_end_addr:#x} asks for {load_size:#x} bytes from file "
                            f"offset {file_start:#x}, past the end of the {len(image)}-byte file")
    load_end = load_addr + load_size
    if load_end > FOUR_GIB:
        raise BootError(f"{where}: load_addr {load_addr:#x} plus the {load_size:#x} bytes to load ends above 4 GiB")
    if bss_end_addr == 0:
        memsz = load_size
    elif bss_end_addr < load_end:
        raise BootError(f"{where}: bss_end_addr {bss_end_addr:#x} is below the end of the loaded image "
                        f"{load_end:#x}; it must be 0 (no bss) or at least that")
    else:
        memsz = bss_end_addr - load_addr
    if not load_addr <= entry_addr < load_end:
        raise BootError(f"{where}: entry_addr {entry_addr:#x} is outside the loaded image "
                        f"{load_addr:#x}-{load_end - 1:#x}")
    data = image[file_start:file_start + load_size]
    return [LoadSegment(load_addr, load_addr, data, memsz)], entry_addr


def _no_header_message(image: bytes, name: str) -> str:
    area = min(len(image), SEARCH_LIMIT)
    for offset in range(0, area - _HEADER.size + 1, 4):
        magic, flags, checksum = _HEADER.unpack_from(image, offset)
        if magic == HEADER_MAGIC:
            return (f"{name}: the Multiboot header at offset {offset:#x} has checksum {checksum:#010x}, but magic + "
                    f"flags + checksum must be 0 mod 2^32, so it should be {(-(magic + flags)) % FOUR_GIB:#010x}")
    return (f"{name} is not a Multiboot kernel: no header with magic {HEADER_MAGIC:#x} at a 4-byte-aligned offset "
            f"in its first {SEARCH_LIMIT} bytes")


def _memory_sizes(mmap: list[tuple[int, int, int]]) -> tuple[int, int]:
    """mem_lower (KiB of RAM from 0) and mem_upper (KiB of RAM from 1 MiB), as the spec defines them."""
    lower = upper = 0
    for start, length, kind in mmap:
        if kind != E820_RAM:
            continue
        if start == 0:
            lower = min(length, 0xA0000) // 1024
        elif start == 0x100000:
            upper = length // 1024
    return lower, upper
