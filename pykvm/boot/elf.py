"""ELF executables: ELF32 (i386) entered in 32-bit protected mode, ELF64 (x86-64) in long mode.

Only the program headers matter to a loader: each PT_LOAD segment's file bytes go to its physical
address (``p_paddr``) and the rest of its memory size (the bss) is zeroed. Section headers are never
read. Every field is checked before it is used, because the image is untrusted input: a bad one is
a :class:`~pykvm.errors.BootError` naming the file, the field and its value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import BootError
from ..x86.modes import CpuMode, initial_state, reserved_ranges
from . import E820_RAM, BootPlan, check_fits, check_no_overlap, memory_map

DEFAULT_STACK = 0x7000

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
ET_DYN = 3
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF

# e_type .. e_shstrndx, after the 16-byte e_ident.
_EHDR32 = struct.Struct("<HHIIIIIHHHHHH")
_EHDR64 = struct.Struct("<HHIQQQIHHHHHH")
_PHDR32 = struct.Struct("<IIIIIIII")    # type, offset, vaddr, paddr, filesz, memsz, flags, align
_PHDR64 = struct.Struct("<IIQQQQQQ")    # type, flags, offset, vaddr, paddr, filesz, memsz, align
_NOTE = struct.Struct("<III")           # namesz, descsz, type

_CLASSES = {
    # class: (bits, ELF header size, header struct, program header struct, machine, machine name)
    ELFCLASS32: (32, 16 + _EHDR32.size, _EHDR32, _PHDR32, EM_386, "EM_386 (3)"),
    ELFCLASS64: (64, 16 + _EHDR64.size, _EHDR64, _PHDR64, EM_X86_64, "EM_X86_64 (62)"),
}

_ZERO_CHUNK = bytes(1 << 20)   # shared by every bss write, so a large bss costs no host memory


class LoadSegment(NamedTuple):
    """One PT_LOAD segment: ``data`` goes to ``paddr``, then zeros up to ``memsz`` bytes."""

    paddr: int
    vaddr: int
    data: bytes
    memsz: int


@dataclass
class ElfImage:
    """The parts of an ELF file a loader needs: class, entry, loadable segments, notes."""
    bits: int                          # 32 or 64
    entry: int                         # e_entry, as the file says (not yet checked against segments)
    segments: list[LoadSegment]        # PT_LOAD segments, in program-header order
    notes: list[tuple[bytes, int]] = field(default_factory=list)   # PT_NOTE contents and p_align


def is_elf(image: bytes) -> bool:
    """True if ``image`` starts with the ELF magic."""
    return bytes(image[:4]) == ELF_MAGIC


def parse_elf(image: bytes, name: str) -> ElfImage:
    """Validate an x86 ELF executable's headers and return its loadable segments.

    Raises BootError for anything a loader could not place exactly as the file asks.
    """
    image = bytes(image)
    size = len(image)
    if size < 16 or image[:4] != ELF_MAGIC:
        raise BootError(f"{name} is not an ELF file: it does not start with the ELF magic 7f 45 4c 46")
    elf_class = image[4]
    if elf_class not in _CLASSES:
        raise BootError(f"{name}: ELF EI_CLASS is {elf_class}, not 1 (ELF32) or 2 (ELF64); the file is corrupt")
    bits, ehsize, ehdr, phdr, machine, machine_name = _CLASSES[elf_class]
    limit = 1 << bits
    if size < ehsize:
        raise BootError(f"{name} is truncated: an ELF{bits} header needs {ehsize} bytes but the file has {size}")
    if image[5] != ELFDATA2LSB:
        raise BootError(f"{name}: ELF EI_DATA is {image[5]}, not 1 (little-endian); x86 kernels are little-endian")
    if image[6] != EV_CURRENT:
        raise BootError(f"{name}: ELF EI_VERSION is {image[6]}, not 1 (EV_CURRENT); the file is corrupt")
    (e_type, e_machine, e_version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = ehdr.unpack_from(image, 16)
    if e_type == ET_DYN:
        raise BootError(f"{name}: ELF e_type is {ET_DYN} (ET_DYN, position-independent); pykvm loads only "
                        f"executables (ET_EXEC = 2): link the kernel with -no-pie at a fixed address")
    if e_type != ET_EXEC:
        raise BootError(f"{name}: ELF e_type is {e_type}, not {ET_EXEC} (ET_EXEC); only executables can be booted")
    if e_machine != machine:
        raise BootError(f"{name}: ELF{bits} e_machine is {e_machine}, not {machine_name}; "
                        f"build the kernel for x86 ({'i386' if bits == 32 else 'x86-64'})")
    if e_version != EV_CURRENT:
        raise BootError(f"{name}: ELF e_version is {e_version}, not 1 (EV_CURRENT); the file is corrupt")
    if e_phnum == 0:
        raise BootError(f"{name}: ELF e_phnum is 0: the file has no program headers, so nothing to load")
    if e_phnum == PN_XNUM:
        raise BootError(f"{name}: ELF e_phnum is {PN_XNUM:#x} (PN_XNUM, more than 65534 program headers), "
                        "which pykvm does not support")
    if e_phentsize != phdr.size:
        raise BootError(f"{name}: ELF{bits} e_phentsize is {e_phentsize}, not {phdr.size}; the file is corrupt")
    if e_phoff == 0 or e_phoff + e_phnum * phdr.size > size:
        raise BootError(f"{name}: ELF program header table (e_phoff {e_phoff:#x}, {e_phnum} entries of "
                        f"{phdr.size} bytes) does not lie inside the {size}-byte file; the file is truncated "
                        "or corrupt")

    segments: list[LoadSegment] = []
    notes: list[tuple[bytes, int]] = []
    for i in range(e_phnum):
        fields = phdr.unpack_from(image, e_phoff + i * phdr.size)
        if bits == 32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _p_flags, p_align = fields
        else:
            p_type, _p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = fields
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        what = f"{name}: ELF program header {i} ({'PT_LOAD' if p_type == PT_LOAD else 'PT_NOTE'})"
        if p_offset + p_filesz > size:
            raise BootError(f"{what}: p_offset {p_offset:#x} + p_filesz {p_filesz:#x} runs past the end of the "
                            f"{size}-byte file; the file is truncated or corrupt")
        data = image[p_offset:p_offset + p_filesz]
        if p_type == PT_NOTE:
            notes.append((data, p_align))
            continue
        if p_filesz > p_memsz:
            raise BootError(f"{what}: p_filesz {p_filesz:#x} is larger than p_memsz {p_memsz:#x}; the file is corrupt")
        for field_name, addr in (("p_paddr", p_paddr), ("p_vaddr", p_vaddr)):
            if addr + p_memsz > limit:
                raise BootError(f"{what}: {field_name} {addr:#x} + p_memsz {p_memsz:#x} wraps past the "
                                f"{bits}-bit address space; the file is corrupt")
        segments.append(LoadSegment(p_paddr, p_vaddr, data, p_memsz))
    if not segments:
        raise BootError(f"{name}: the ELF file has no PT_LOAD program header, so there is nothing to load")

    placed = sorted((s.paddr, s.paddr + s.memsz, i) for i, s in enumerate(segments) if s.memsz)
    for (start_a, end_a, a), (start_b, end_b, b) in zip(placed, placed[1:], strict=False):
        if start_b < end_a:
            raise BootError(f"{name}: ELF PT_LOAD segments {a} ({start_a:#x}-{end_a - 1:#x}) and {b} "
                            f"({start_b:#x}-{end_b - 1:#x}) overlap in physical memory (p_paddr); "
                            "fix the linker script")
    return ElfImage(bits, e_entry, segments, notes)


def find_note(image: bytes, owner: bytes, type: int | None, name: str = "kernel") -> bytes | None:
    """The descriptor of the first ELF note from ``owner`` with ``type`` (any type if None) in a
    PT_NOTE segment, or None.

    The image is validated as by :func:`parse_elf`; a malformed note is a BootError.
    """
    elf = parse_elf(image, name)
    for data, p_align in elf.notes:
        align = 8 if p_align == 8 else 4     # 8-byte notes exist in ELF64 (p_align 8); the rest use 4
        pos = 0
        while pos < len(data):
            if len(data) - pos < _NOTE.size:
                raise BootError(f"{name}: ELF note at offset {pos:#x} of a PT_NOTE segment is truncated "
                                f"({len(data) - pos} bytes left, a note header needs {_NOTE.size})")
            namesz, descsz, note_type = _NOTE.unpack_from(data, pos)
            name_start = pos + _NOTE.size
            desc_start = _align_up(name_start + namesz, align)
            desc_end = desc_start + descsz
            if desc_end > len(data):
                raise BootError(f"{name}: ELF note at offset {pos:#x} of a PT_NOTE segment (namesz {namesz:#x}, "
                                f"descsz {descsz:#x}) runs past the end of the {len(data)}-byte segment")
            note_owner = data[name_start:name_start + namesz]
            if (type is None or note_type == type) and note_owner in (owner, owner + b"\0"):
                return data[desc_start:desc_end]
            pos = _align_up(desc_end, align)
    return None


def load_elf(image: bytes, mem_size: int, name: str = "kernel") -> BootPlan:
    """Load an ELF executable: PT_LOADs at their physical addresses, entered at e_entry.

    ELF32 starts in 32-bit protected mode without paging; ELF64 in long mode with the low 4 GiB
    identity-mapped, so its entry point must lie below 4 GiB.
    """
    image = bytes(image)
    elf = parse_elf(image, name)
    mode = CpuMode.PROT32 if elf.bits == 32 else CpuMode.LONG64
    if elf.bits == 64 and elf.entry >= 1 << 32:
        raise BootError(f"{name}: ELF64 e_entry {elf.entry:#x} is above 4 GiB, but pykvm enters 64-bit kernels "
                        "with only the low 4 GiB identity-mapped; link the entry point at a physical address")
    entry = physical_entry(elf, name, allow_virtual=False)
    writes = check_and_place_segments(elf.segments, mem_size, mode, name)
    try:
        cpu, mode_writes = initial_state(mode, entry=entry, stack=DEFAULT_STACK)
    except ValueError as e:
        raise BootError(f"{name}: {e}") from None
    loaded = [s for s in elf.segments if s.memsz]
    low = min(s.paddr for s in loaded)
    high = max(s.paddr + s.memsz for s in loaded)
    return BootPlan(cpu=cpu, writes=mode_writes + writes, irqchip=True, kernel=image,
                    description=f"{name}: ELF{elf.bits}, {len(loaded)} segment(s) at {low:#x}-{high - 1:#x}, "
                                f"entry {entry:#x}, {mode.description}")


# --- helpers shared with the Multiboot loader ----------------------------------------------------

def physical_entry(elf: ElfImage, name: str, allow_virtual: bool) -> int:
    """The physical address execution starts at: e_entry must lie inside a loaded segment.

    With ``allow_virtual``, an e_entry that is a virtual address inside a segment's p_vaddr range is
    translated to the matching physical address (a higher-half kernel entered without paging).
    """
    for seg in elf.segments:
        if seg.paddr <= elf.entry < seg.paddr + seg.memsz:
            return elf.entry
    if allow_virtual:
        for seg in elf.segments:
            if seg.vaddr <= elf.entry < seg.vaddr + seg.memsz:
                return seg.paddr + (elf.entry - seg.vaddr)
    raise BootError(f"{name}: ELF e_entry {elf.entry:#x} is not inside any loaded PT_LOAD segment's physical "
                    "addresses (p_paddr .. p_paddr + p_memsz); the entry point would run uninitialised memory")


def check_usable_ram(what: str, start: int, length: int, mem_size: int) -> None:
    """Raise BootError unless [start, start+length) lies inside one RAM entry of the memory map.

    Stricter than :func:`check_fits`: the holes the memory map reports as reserved (EBDA, VGA/ROM
    window, BIOS area) are guest RAM pykvm may use for its own tables, so nothing is loaded there.
    """
    check_fits(what, start, length, mem_size)
    for entry_start, entry_len, entry_type in memory_map(mem_size):
        if entry_type == E820_RAM and entry_start <= start and start + length <= entry_start + entry_len:
            return
    raise BootError(f"{what} at {start:#x}-{start + max(length, 1) - 1:#x} overlaps the PC's reserved area "
                    f"between 640 KiB and 1 MiB (EBDA, VGA and BIOS window); link it below {0x9FC00:#x} "
                    "or from 1 MiB up")


def check_and_place_segments(segments: list[LoadSegment], mem_size: int, mode: CpuMode, name: str,
                             limit: int | None = None, label: str | None = None) -> list[tuple[int, bytes]]:
    """Check each segment's destination and return its writes (file bytes, then zeros for the bss).

    ``limit``, if given, is an address every segment must end at or below (4 GiB for a kernel
    entered without paging). ``label`` names the image's contents in errors instead of the
    ELF "segment N (p_paddr, p_memsz)".
    """
    reserved = reserved_ranges(mode)
    writes: list[tuple[int, bytes]] = []
    for i, seg in enumerate(segments):
        if not seg.memsz:
            continue
        what = label or f"{name} segment {i} (p_paddr {seg.paddr:#x}, p_memsz {seg.memsz:#x})"
        if limit is not None and seg.paddr + seg.memsz > limit:
            raise BootError(f"{what} ends above {limit:#x}, out of reach of a kernel started with paging off; "
                            "link it lower")
        check_usable_ram(what, seg.paddr, seg.memsz, mem_size)
        check_no_overlap(what, seg.paddr, seg.memsz, reserved, hint="link it at another address")
        writes += load_writes(seg.paddr, seg.data, seg.memsz)
    return writes


def load_writes(addr: int, data: bytes, memsz: int) -> list[tuple[int, bytes]]:
    """Writes placing ``data`` at ``addr`` and zeroing the rest of ``memsz`` bytes (the bss).

    The zeros are written explicitly (RAM may hold an earlier run's bytes), in chunks that share
    one buffer. Callers check ``memsz`` against guest RAM first.
    """
    writes = [(addr, data)] if data else []
    pos, end = addr + len(data), addr + memsz
    while pos < end:
        n = min(end - pos, len(_ZERO_CHUNK))
        writes.append((pos, _ZERO_CHUNK if n == len(_ZERO_CHUNK) else bytes(n)))
        pos += n
    return writes


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align
