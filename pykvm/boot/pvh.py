"""PVH boot of an uncompressed Linux ``vmlinux`` (or any ELF kernel with a PVH entry note).

The kernel announces a 32-bit entry point in an ELF note (owner "Xen", type
XEN_ELFNOTE_PHYS32_ENTRY = 18). The VMM loads the PT_LOAD segments at their physical addresses and
enters that point in 32-bit protected mode with paging off, EBX holding the physical address of an
``hvm_start_info`` structure: magic, the command line, the initrd as module 0, the memory map.
This skips the bzImage's real-mode setup and its decompressor, which is why it is the fast way to
boot Linux (on kvm_pvm, where the decompressor runs emulated, by minutes).
"""

from __future__ import annotations

import struct

from ..errors import BootError
from ..x86.modes import CpuMode, initial_state, reserved_ranges
from . import BootPlan, allocate, c_string, clip, highest_fit, memory_map, ram_below_4g
from .elf import DEFAULT_STACK, check_and_place_segments, parse_elf

XEN_ELFNOTE_PHYS32_ENTRY = 18
START_INFO_MAGIC = 0x336EC578
START_INFO = struct.Struct("<IIIIQQQQII")      # magic, version, flags, nr_modules, modlist, cmdline,
#                                                rsdp, memmap_paddr, memmap_entries, reserved
MODLIST_ENTRY = struct.Struct("<QQQQ")         # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")          # addr, size, type, reserved
INFO_AREA = (0x9000, 0x70000)                  # low memory pykvm keeps free of its own tables
PAGE = 0x1000
FOUR_GIB = 1 << 32
CMDLINE_MAX = 64 * 1024


def pvh_entry(image: bytes, name: str) -> int | None:
    """The kernel's PVH 32-bit entry point, or None if it has no such note."""
    from .elf import find_note
    desc = find_note(image, b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, name)
    if desc is None:
        return None
    if len(desc) not in (4, 8):
        raise BootError(f"{name}: its XEN_ELFNOTE_PHYS32_ENTRY note is {len(desc)} bytes; it must hold a "
                        "32-bit (or 64-bit) address")
    entry = int.from_bytes(desc, "little")
    if entry >= FOUR_GIB:
        raise BootError(f"{name}: PVH entry {entry:#x} is above 4 GiB, unreachable in 32-bit mode")
    return entry


def load_pvh(image: bytes, mem_size: int, cmdline: str = "", initrd: bytes = b"", name: str = "vmlinux") -> BootPlan:
    """A vmlinux with a PVH entry note -> BootPlan (hvm_start_info, memory map, initrd). Raises BootError."""
    image = bytes(image)
    elf = parse_elf(image, name)
    entry = pvh_entry(image, name)
    if entry is None:
        raise BootError(f"{name} is an ELF kernel without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build "
                        "Linux with CONFIG_PVH=y, or boot its bzImage instead")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in elf.segments):
        raise BootError(f"{name}: PVH entry {entry:#x} is not inside any loaded segment")
    mode = CpuMode.PROT32
    writes = check_and_place_segments(elf.segments, mem_size, mode, name, limit=FOUR_GIB)
    occupied = [(s.paddr, s.paddr + s.memsz) for s in elf.segments if s.memsz]
    occupied += [(start, end) for start, end, _ in reserved_ranges(mode)]
    ram = ram_below_4g(mem_size)

    modules = []
    if initrd:
        start = highest_fit(len(initrd), ram, occupied)
        if start is None:
            raise BootError(f"the initrd ({len(initrd)} bytes) does not fit in guest RAM below 4 GiB next to "
                            f"{name}; give the guest more memory with --mem")
        occupied.append((start, start + len(initrd)))
        writes.append((start, bytes(initrd)))
        modules.append((start, len(initrd)))

    cmdline_bytes = c_string(cmdline, "the command line", name)
    if len(cmdline_bytes) > CMDLINE_MAX:
        raise BootError(f"the command line is {len(cmdline_bytes) - 1} bytes; pykvm passes at most "
                        f"{CMDLINE_MAX - 1} to a PVH kernel")
    mmap = memory_map(mem_size)
    mods_off = START_INFO.size
    mmap_off = mods_off + MODLIST_ENTRY.size * len(modules)
    cmdline_off = mmap_off + MEMMAP_ENTRY.size * len(mmap)
    size = cmdline_off + len(cmdline_bytes)
    info = allocate(size, 16, clip(ram, *INFO_AREA), occupied)
    if info is None:
        raise BootError(f"no room below {INFO_AREA[1]:#x} for the {size}-byte PVH start info; "
                        f"{name} occupies that memory")
    block = bytearray(size)
    START_INFO.pack_into(block, 0, START_INFO_MAGIC, 1, 0, len(modules), info + mods_off if modules else 0,
                         info + cmdline_off, 0, info + mmap_off, len(mmap), 0)
    for i, (start, length) in enumerate(modules):
        MODLIST_ENTRY.pack_into(block, mods_off + i * MODLIST_ENTRY.size, start, length, 0, 0)
    for i, (start, length, kind) in enumerate(mmap):
        MEMMAP_ENTRY.pack_into(block, mmap_off + i * MEMMAP_ENTRY.size, start, length, kind, 0)
    block[cmdline_off:] = cmdline_bytes
    writes.append((info, bytes(block)))

    cpu, mode_writes = initial_state(mode, entry=entry, stack=DEFAULT_STACK)
    cpu.regs["rbx"] = info
    return BootPlan(cpu=cpu, writes=mode_writes + writes, irqchip=True, cmdline=cmdline, kernel=image,
                    console_waits_for_driver=True,
                    initrd=bytes(initrd),
                    description=f"{name}: PVH entry {entry:#x}, start info at {info:#x}"
                                + (f", initrd {len(initrd)} bytes at {modules[0][0]:#x}" if modules else ""))
