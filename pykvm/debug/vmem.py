"""Guest-virtual memory access for the debugger and the tracer.

A guest-virtual (linear) address is translated page by page through the guest's own page tables
(:func:`pykvm.x86.paging.translate`, given CR0/CR3/CR4/EFER) and then read or written through
:class:`pykvm.memory.GuestMemory`, the only door into guest RAM. A range that crosses into an
unmapped page, or into guest-physical space that is not RAM, stops there: reads return the
readable prefix, writes raise.
"""

from __future__ import annotations

from ..memory import GuestMemoryError
from ..x86.paging import PageFault, translate

PAGE = 0x1000


class Unmapped(Exception):
    """A guest-virtual address with no RAM behind it (not mapped, or mapped to a hole)."""


def _chunks(addr: int, n: int):
    """(address, length) pieces of [addr, addr+n) that do not cross a page boundary."""
    while n > 0:
        step = min(n, PAGE - (addr & (PAGE - 1)))
        yield addr, step
        addr += step
        n -= step


def to_physical(memory, paging, addr: int) -> int:
    """The guest-physical address of a guest-virtual one; ``paging`` is (cr0, cr3, cr4, efer)."""
    try:
        return translate(memory, addr, *paging)
    except (PageFault, GuestMemoryError) as e:
        raise Unmapped(str(e)) from None


def read_virtual(memory, paging, addr: int, n: int) -> bytes:
    """Up to ``n`` bytes at guest-virtual ``addr``: all of them, or the prefix that is readable."""
    out = bytearray()
    for start, length in _chunks(addr, n):
        try:
            phys = to_physical(memory, paging, start)
        except Unmapped:
            break
        readable = length
        while readable > 0 and not memory.contains(phys, readable):   # RAM may end inside the page
            readable -= 1
        if readable:
            out += memory.read(phys, readable)
        if readable < length:
            break
    return bytes(out)


def write_virtual(memory, paging, addr: int, data: bytes) -> None:
    """Write ``data`` at guest-virtual ``addr``; nothing is written unless all of it is RAM."""
    pieces = []
    offset = 0
    for start, length in _chunks(addr, len(data)):
        phys = to_physical(memory, paging, start)
        if not memory.contains(phys, length):
            raise Unmapped(f"{start:#x} (physical {phys:#x}) is not RAM")
        pieces.append((phys, data[offset:offset + length]))
        offset += length
    for phys, chunk in pieces:
        memory.write(phys, chunk)
