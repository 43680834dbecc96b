"""Loaders: each turns an image into a :class:`BootPlan` and never touches KVM.

A BootPlan is everything the machine needs to start: the bytes to place in guest memory and the
initial vCPU state. Keeping loaders pure makes every header check unit-testable without a VM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BootError
from ..memory import ram_layout
from ..x86.modes import CpuState


@dataclass
class BootPlan:
    """A loader's result: bytes to place in guest memory and the initial vCPU state."""
    cpu: CpuState
    writes: list[tuple[int, bytes]] = field(default_factory=list)   # (guest-physical, bytes)
    description: str = ""
    irqchip: bool = False     # does the guest expect interrupt controllers (PIC/IOAPIC/LAPIC, PIT)?
    # What firmware-style interfaces (fw_cfg) report about the boot:
    cmdline: str = ""
    kernel: bytes = b""
    initrd: bytes = b""
    # Linux's serial driver empties the UART FIFO when it opens the port: hold host input until then.
    console_waits_for_driver: bool = False


# Memory-map entry types, as the BIOS E820 call, Multiboot and PVH number them.
E820_RAM = 1
E820_RESERVED = 2

EBDA_START = 0x9FC00          # the last KiB of conventional memory, kept for the BIOS on a PC
BIOS_AREA = (0xF0000, 0x100000)   # where the MP floating pointer and tables live


def memory_map(mem_size: int) -> list[tuple[int, int, int]]:
    """The guest's physical memory map as (start, length, type), in address order.

    RAM as laid out by :func:`pykvm.memory.ram_layout`, with the PC's traditional hole below 1 MiB
    marked reserved as one range: the EBDA's last KiB of conventional memory, the VGA/ROM window
    and the BIOS area at 0xF0000 (where pykvm puts the MP table). Linux merges its own ISA-hole
    reservation into the same range, so the map it prints is exactly this one.
    """
    entries: list[tuple[int, int, int]] = []
    for start, length in ram_layout(mem_size):
        end = start + length
        if start == 0:
            entries.append((0, min(end, EBDA_START), E820_RAM))
            if end > EBDA_START:
                entries.append((EBDA_START, 0x100000 - EBDA_START, E820_RESERVED))
            if end > 0x100000:
                entries.append((0x100000, end - 0x100000, E820_RAM))
        else:
            entries.append((start, length, E820_RAM))
    return entries


def check_fits(what: str, start: int, length: int, mem_size: int) -> None:
    """Raise BootError unless [start, start+length) lies inside guest RAM of ``mem_size`` bytes."""
    for gpa, size in ram_layout(mem_size):
        if gpa <= start and start + length <= gpa + size:
            return
    ranges = ", ".join(f"{g:#x}-{g + s - 1:#x}" for g, s in ram_layout(mem_size))
    raise BootError(
        f"{what} at {start:#x}-{start + max(length, 1) - 1:#x} does not fit in guest RAM ({ranges}); "
        "choose another address or give the guest more memory with --mem")


def check_no_overlap(what: str, start: int, length: int, reserved: list[tuple[int, int, str]],
                     hint: str = "load it elsewhere (--load-addr)") -> None:
    """Raise BootError (ending with ``hint``) if [start, start+length) overlaps a ``reserved`` range."""
    for rstart, rend, rwhat in reserved:
        if start < rend and rstart < start + length:
            raise BootError(
                f"{what} at {start:#x}-{start + length - 1:#x} overlaps {rwhat} that pykvm places at "
                f"{rstart:#x}-{rend - 1:#x} for this CPU mode; {hint}")


# --- placing boot data in guest RAM (shared by the Multiboot, PVH and bzImage loaders) ---

FOUR_GIB = 1 << 32
PAGE = 0x1000


def c_string(text: str, what: str, name: str) -> bytes:
    """``text`` as NUL-terminated UTF-8; bytes that were not UTF-8 on the command line or in a file name
    (Python's surrogateescape) go through unchanged, as the user gave them. Raises BootError if it
    contains a NUL (``what``/``name`` say where)."""
    if "\0" in text:
        raise BootError(f"{name}: {what} {text!r} contains a NUL character, which would cut it short")
    return text.encode("utf-8", "surrogateescape") + b"\0"


def ram_below_4g(mem_size: int) -> list[tuple[int, int]]:
    """(start, end) of each RAM entry of the memory map that a 32-bit address can reach."""
    return [(start, min(start + length, FOUR_GIB)) for start, length, kind in memory_map(mem_size)
            if kind == E820_RAM and start < FOUR_GIB]


def clip(ranges: list[tuple[int, int]], low: int, high: int = FOUR_GIB) -> list[tuple[int, int]]:
    """The parts of (start, end) ``ranges`` that lie within [low, high), empty ones dropped."""
    return [(max(s, low), min(e, high)) for s, e in ranges if max(s, low) < min(e, high)]


def allocate(size: int, align: int, ranges: list[tuple[int, int]],
              occupied: list[tuple[int, int]]) -> int | None:
    """The lowest ``align``-aligned address in ``ranges`` where ``size`` bytes avoid ``occupied``."""
    for start, end in ranges:
        addr = -(-start // align) * align
        while addr + size <= end:
            clash = [e for s, e in occupied if addr < e and s < addr + max(size, 1)]
            if not clash:
                return addr
            addr = -(-max(clash) // align) * align
    return None


def highest_fit(size: int, ram: list[tuple[int, int]], occupied: list[tuple[int, int]]) -> int | None:
    """The highest page-aligned address where ``size`` bytes fit in ``ram`` clear of ``occupied``
    (initrds go high, out of the kernel's way, as boot loaders traditionally place them)."""
    for start, end in sorted(ram, reverse=True):
        addr = (end - size) // PAGE * PAGE
        while addr >= start:
            clash = [s for s, e in occupied if addr < e and s < addr + size]
            if not clash:
                return addr
            addr = (min(clash) - size) // PAGE * PAGE
    return None
