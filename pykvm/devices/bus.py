"""The device contract and the two buses (port I/O and MMIO) that route exits to devices.

A device is a plain object with two methods::

    read(offset: int, size: int) -> int
    write(offset: int, size: int, value: int) -> None

``offset`` is relative to the base the device was attached at; ``size`` is 1, 2, 4 or 8 bytes.
KVM reports MMIO accesses of any length from 1 to 8 (``lds``/``les`` load 6 bytes, an access split
at a page boundary leaves 3, 5, 6 or 7): the bus splits those into naturally sized pieces, low
address first, each routed on its own, so a device only ever sees 1, 2, 4 or 8.
Devices hold only register state. Their interrupt line (an :class:`IrqLine`) and any host-side
I/O (terminal, file) are handed to them, so a device never sees the VM.

A bus resolves an address to ``(device, offset)`` with a sorted range table. An access that no
device claims reads as all ones and ignores writes, and is counted in :attr:`Bus.unclaimed`,
never fatal: real hardware answers an empty bus the same way. That table is bounded: at most
:data:`MAX_UNCLAIMED` distinct addresses are kept, later ones only add to
:attr:`Bus.unclaimed_overflow`, so a guest sweeping the address space cannot grow host memory.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import Protocol

from ..kvm.irq import IrqLine

__all__ = ["MAX_UNCLAIMED", "Bus", "BusError", "Device", "IrqLine", "all_ones", "pieces"]

MAX_UNCLAIMED = 4096    # distinct unclaimed addresses counted one by one, per bus


class Device(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(ValueError):
    """A device was attached over another one, or with an empty range."""


def all_ones(size: int) -> int:
    """What an unclaimed read of ``size`` bytes returns: every data line pulled high."""
    return (1 << (8 * size)) - 1


def pieces(size: int) -> list[tuple[int, int]]:
    """An access of ``size`` bytes (1..8) as naturally sized pieces: [(byte offset, size), ...].

    7 -> [(0, 4), (4, 2), (6, 1)]; a size of 1, 2, 4 or 8 is one piece. Raises ValueError
    outside 1..8."""
    if not 1 <= size <= 8:
        raise ValueError(f"an access of {size} bytes: KVM reports 1 to 8")
    result, at = [], 0
    for piece in (8, 4, 2, 1):
        if size - at >= piece:
            result.append((at, piece))
            at += piece
    return result


_SPLIT = {n: pieces(n) for n in (3, 5, 6, 7)}


class Bus:
    """An address space (ports or guest-physical MMIO) mapped to devices.

    Lookups are a bisect over the sorted range starts. The table is replaced as a whole on
    attach, so a vCPU thread looking up an address never sees it half-updated.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, object]] = []  # (start, end, device), sorted
        self.unclaimed: Counter[int] = Counter()  # address -> number of unclaimed accesses (capped)
        self.unclaimed_overflow = 0   # unclaimed accesses to addresses beyond the first MAX_UNCLAIMED
        # address -> (device.read, device.write, offset) for claimed addresses already looked up:
        # the exit loop's fast path, methods pre-bound so an exit costs one dict lookup and one
        # call. Only claimed addresses enter it, so a guest probing at random cannot grow it
        # beyond the sizes of the attached ranges.
        self.cache: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def attach(self, device: object, base: int, length: int) -> None:
        if length <= 0:
            raise BusError(f"{self.name}: device {device!r} attached with empty range")
        end = base + length
        with self._lock:
            for start, stop, other in self._ranges:
                if base < stop and start < end:
                    raise BusError(
                        f"{self.name}: {type(device).__name__} at {base:#x}+{length:#x} overlaps "
                        f"{type(other).__name__} at {start:#x}+{stop - start:#x}"
                    )
            ranges = sorted(self._ranges + [(base, end, device)], key=lambda r: r[0])
            self._ranges = ranges
            self._starts = [r[0] for r in ranges]
            self.cache.clear()   # in place: the exit loops hold this dict

    def find(self, addr: int) -> tuple[object, int] | None:
        """Return (device, offset) for ``addr``, or None if nobody claims it."""
        ranges = self._ranges
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start, end, device = ranges[i]
            if addr < end:
                return device, addr - start
        return None

    def _resolve(self, addr: int) -> tuple | None:
        hit = self.find(addr)
        if hit is None:
            unclaimed = self.unclaimed
            if addr in unclaimed or len(unclaimed) < MAX_UNCLAIMED:
                unclaimed[addr] += 1
            else:
                self.unclaimed_overflow += 1
            return None
        device, offset = hit
        entry = self.cache[addr] = (device.read, device.write, offset)
        return entry

    def read(self, addr: int, size: int) -> int:
        """The value a read of ``size`` bytes (1..8) at ``addr`` returns; all ones if unclaimed."""
        if size in _SPLIT:
            return self._read_pieces(addr, size)
        hit = self.cache.get(addr) or self._resolve(addr)
        if hit is None:
            return all_ones(size)
        return hit[0](hit[2], size)

    def write(self, addr: int, size: int, value: int) -> None:
        """Route a write of ``size`` bytes (1..8) at ``addr``; ignored (and counted) if unclaimed."""
        if size in _SPLIT:
            return self._write_pieces(addr, size, value)
        hit = self.cache.get(addr) or self._resolve(addr)
        if hit is not None:
            hit[1](hit[2], size, value)

    def _read_pieces(self, addr: int, size: int) -> int:
        value = 0
        for at, n in _SPLIT[size]:
            value |= self.read(addr + at, n) << (8 * at)
        return value

    def _write_pieces(self, addr: int, size: int, value: int) -> None:
        for at, n in _SPLIT[size]:
            self.write(addr + at, n, (value >> (8 * at)) & all_ones(n))

    def devices(self) -> list[tuple[int, int, object]]:
        """The attached devices as (base, length, device), in address order."""
        return [(s, e - s, d) for s, e, d in self._ranges]
