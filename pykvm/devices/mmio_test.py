"""A tiny MMIO device for tests and the exit-latency benchmark.

Registers (little-endian, guest-physical base 0xd0000000 in the MMIO hole):

=======  ======  =====================================================================
offset   access  meaning
=======  ======  =====================================================================
0x00     R       ID: 0x4f494d4d, the ASCII bytes "MMIO"
0x08     R/W     scratch: reads back the last value written (1, 2, 4 or 8 bytes)
0x10     R       the bitwise NOT of scratch, at the width of the access
=======  ======  =====================================================================

Any other offset reads as zero; writes other than to scratch are ignored.
"""

from __future__ import annotations

BASE = 0xD000_0000
SIZE = 0x1000
ID = 0x4F49_4D4D


class MmioTestDevice:
    def __init__(self) -> None:
        self.scratch = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        if offset == 0x00:
            return ID & mask
        if offset == 0x08:
            return self.scratch & mask
        if offset == 0x10:
            return ~self.scratch & mask
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x08:
            self.scratch = value
            self.writes += 1
