"""Linux bzImage, booted with the 64-bit boot protocol (Documentation/arch/x86/boot.rst).

A bzImage is a real-mode setup program followed by the protected-mode kernel (with its own
decompressor). Its ``setup_header`` at offset 0x1f1 describes both. A 64-bit boot loader skips the
real-mode part entirely: it loads the protected-mode kernel at its preferred address, fills a
``boot_params`` "zero page" (a copy of the setup header plus the memory map, command line and
initrd location), and jumps to ``startup_64`` at load address + 0x200 in long mode, with RSI
pointing at boot_params and the boot GDT's 0x10 code / 0x18 data segments loaded.

Every header field is checked before use; a malformed image is a BootError naming the field.
"""

from __future__ import annotations

import struct

from ..errors import BootError
from ..x86.modes import CpuMode, initial_state, reserved_ranges
from . import E820_RAM, BootPlan, allocate, c_string, check_no_overlap, clip, highest_fit, memory_map, ram_below_4g
from .elf import DEFAULT_STACK

HDRS = b"HdrS"
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x0206            # cmdline_size exists from 2.06 on
XLF_KERNEL_64 = 1 << 0           # the kernel has the 64-bit entry point at +0x200
LOADFLAG_LOADED_HIGH = 1 << 0
TYPE_OF_LOADER_UNDEFINED = 0xFF
STARTUP_64 = 0x200
ZERO_PAGE_SIZE = 4096
E820_MAX = 128
SETUP_AREA = (0x9000, 0x70000)   # where boot_params and the command line go
PAGE = 0x1000
FOUR_GIB = 1 << 32

# boot_params offsets (arch/x86/include/uapi/asm/bootparam.h)
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_HDR = 0x1F1
BP_E820_TABLE = 0x2D0
E820_ENTRY = struct.Struct("<QQI")

# setup_header fields we read or write: name -> (offset in the file / zero page, struct format)
FIELDS = {
    "setup_sects": (0x1F1, "B"), "syssize": (0x1F4, "I"), "boot_flag": (0x1FE, "H"), "jump": (0x200, "H"),
    "header": (0x202, "4s"), "version": (0x206, "H"), "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"), "code32_start": (0x214, "I"), "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"), "cmd_line_ptr": (0x228, "I"), "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"), "relocatable_kernel": (0x234, "B"), "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"), "pref_address": (0x258, "Q"), "init_size": (0x260, "I"),
}


# Linux parameters a KVM backend needs, by backend (see the README's platform section): kvm_pvm's
# instruction emulator cannot run XSAVE, CLAC/STAC (SMAP), POPCNT or CMPXCHG16B at CPL0, and
# KVM_SET_CPUID2 does not hide them, so the guest is told not to use them. ERMS/FSRM off makes
# Linux copy 8 bytes per emulated step instead of 1 (a large boot-time gain there).
PLATFORM_QUIRKS = {
    "kvm_pvm": "noxsave clearcpuid=smap,popcnt,erms,fsrm,cx16",
}


def linux_quirks(backend: str) -> str:
    """The command-line parameters a Linux guest needs on ``backend`` ('' for hardware KVM)."""
    return PLATFORM_QUIRKS.get(backend, "")


def is_bzimage(image: bytes) -> bool:
    """True if ``image`` carries the Linux boot protocol's setup header ("HdrS")."""
    return len(image) >= 0x206 and image[0x202:0x206] == HDRS


def _get(image: bytes, field: str) -> int | bytes:
    offset, fmt = FIELDS[field]
    return struct.unpack_from("<" + fmt, image, offset)[0]


def load_linux(image: bytes, mem_size: int, cmdline: str = "", initrd: bytes = b"", name: str = "bzImage") -> BootPlan:
    """A bzImage (64-bit boot protocol) with initrd and command line -> BootPlan. Raises BootError."""
    image = bytes(image)
    if len(image) < 0x270 or not is_bzimage(image):
        raise BootError(f"{name} is not a Linux bzImage: no 'HdrS' setup header at offset 0x202"
                        + (f" (the file is only {len(image)} bytes)" if len(image) < 0x270 else ""))
    version = _get(image, "version")
    if version < MIN_PROTOCOL:
        raise BootError(f"{name}: boot protocol {version >> 8}.{version & 0xFF:02d} is too old; pykvm needs 2.06 "
                        "or newer (Linux 2.6.22+)")
    if _get(image, "boot_flag") != BOOT_FLAG:
        raise BootError(f"{name}: setup header boot_flag is {_get(image, 'boot_flag'):#06x}, not 0xaa55")
    if not _get(image, "xloadflags") & XLF_KERNEL_64:
        raise BootError(f"{name}: xloadflags lacks XLF_KERNEL_64: this kernel has no 64-bit entry point, and "
                        "pykvm boots bzImages only through the 64-bit boot protocol")
    setup_sects = _get(image, "setup_sects") or 4
    kernel_offset = (setup_sects + 1) * 512
    header_end = 0x202 + image[0x201]
    syssize = _get(image, "syssize") * 16
    if kernel_offset >= len(image) or header_end > kernel_offset:
        raise BootError(f"{name}: setup_sects = {setup_sects} puts the kernel at offset {kernel_offset:#x}, "
                        f"beyond the {len(image)}-byte file (a truncated or non-Linux image)")
    kernel = image[kernel_offset:]
    if syssize > len(kernel):
        raise BootError(f"{name}: the setup header says the protected-mode kernel is {syssize} bytes "
                        f"(syssize), but only {len(kernel)} follow the setup code: the file is truncated")

    # Where the kernel goes: its preferred address, aligned as it asks.
    align = _get(image, "kernel_alignment")
    if align == 0 or align & (align - 1) or align > 1 << 30:
        raise BootError(f"{name}: kernel_alignment {align:#x} is not a power of two up to 1 GiB")
    load = _get(image, "pref_address") if version >= 0x020A else 0x100000
    if load % align:
        if not _get(image, "relocatable_kernel"):
            raise BootError(f"{name}: pref_address {load:#x} is not aligned to kernel_alignment {align:#x} "
                            "and the kernel is not relocatable")
        load = -(-load // align) * align
    init_size = max(_get(image, "init_size") if version >= 0x020A else 0, len(kernel))
    mode = CpuMode.LONG64
    what = f"{name}'s kernel (load address {load:#x}, init_size {init_size:#x})"
    if load + init_size > FOUR_GIB or not any(
            kind == E820_RAM and start <= load and load + init_size <= start + length
            for start, length, kind in memory_map(mem_size)):
        raise BootError(f"{what} does not fit in guest RAM; give the guest more memory with --mem")
    check_no_overlap(what, load, init_size, reserved_ranges(mode))
    occupied = [(load, load + init_size)] + [(s, e) for s, e, _ in reserved_ranges(mode)]
    writes = [(load, kernel)]
    ram = ram_below_4g(mem_size)

    # The command line, within the kernel's limit.
    cmdline_bytes = c_string(cmdline, "the command line", name)
    limit = _get(image, "cmdline_size")
    if len(cmdline_bytes) - 1 > limit:
        raise BootError(f"the command line is {len(cmdline_bytes) - 1} bytes, over {name}'s limit of {limit} "
                        "(cmdline_size in its setup header)")

    # The zero page and the command line, one block in low memory.
    block_size = ZERO_PAGE_SIZE + len(cmdline_bytes)
    params_addr = allocate(block_size, PAGE, clip(ram, *SETUP_AREA), occupied)
    if params_addr is None:
        raise BootError(f"no room below {SETUP_AREA[1]:#x} for boot_params and the command line")
    occupied.append((params_addr, params_addr + block_size))
    params = bytearray(ZERO_PAGE_SIZE)
    params[BP_HDR:header_end] = image[BP_HDR:header_end]
    _put(params, "type_of_loader", TYPE_OF_LOADER_UNDEFINED)
    _put(params, "loadflags", _get(image, "loadflags") | LOADFLAG_LOADED_HIGH)
    _put(params, "code32_start", load)
    cmd_ptr = params_addr + ZERO_PAGE_SIZE
    _put(params, "cmd_line_ptr", cmd_ptr & 0xFFFF_FFFF)
    struct.pack_into("<I", params, BP_EXT_CMD_LINE_PTR, cmd_ptr >> 32)

    # The initrd: as high as the kernel allows, inside RAM.
    if initrd:
        max_addr = min(_get(image, "initrd_addr_max"), FOUR_GIB - 1)
        start = highest_fit(len(initrd), clip(ram, 0, max_addr + 1), occupied)
        if start is None:
            raise BootError(f"the initrd ({len(initrd)} bytes) does not fit in guest RAM below {name}'s "
                            f"initrd_addr_max {max_addr:#x} next to the kernel; give the guest more memory with --mem")
        writes.append((start, bytes(initrd)))
        _put(params, "ramdisk_image", start & 0xFFFF_FFFF)
        _put(params, "ramdisk_size", len(initrd) & 0xFFFF_FFFF)
        struct.pack_into("<II", params, BP_EXT_RAMDISK_IMAGE, start >> 32, len(initrd) >> 32)

    # The memory map, exactly as pykvm laid out RAM.
    mmap = memory_map(mem_size)[:E820_MAX]
    params[BP_E820_ENTRIES] = len(mmap)
    for i, entry in enumerate(mmap):
        E820_ENTRY.pack_into(params, BP_E820_TABLE + i * E820_ENTRY.size, *entry)
    writes.append((params_addr, bytes(params) + cmdline_bytes))

    cpu, mode_writes = initial_state(mode, entry=load + STARTUP_64, stack=DEFAULT_STACK)
    cpu.regs["rsi"] = params_addr
    return BootPlan(cpu=cpu, writes=mode_writes + writes, irqchip=True, cmdline=cmdline, kernel=image,
                    console_waits_for_driver=True,
                    initrd=bytes(initrd),
                    description=f"{name}: bzImage protocol {version >> 8}.{version & 0xFF:02d}, kernel at {load:#x}, "
                                f"boot_params at {params_addr:#x}, 64-bit entry {load + STARTUP_64:#x}")


def _put(params: bytearray, field: str, value: int) -> None:
    offset, fmt = FIELDS[field]
    struct.pack_into("<" + fmt, params, offset, value)
