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

    def state(self) -> dict:
        """The scratch register and the write count, as plain data (for a snapshot)."""
        return {"scratch": self.scratch, "writes": self.writes}

    def load_state(self, state: dict) -> None:
        """Take the registers from :meth:`state`'s record; ValueError if they are malformed."""
        scratch = state.get("scratch") if isinstance(state, dict) else None
        writes = state.get("writes") if isinstance(state, dict) else None
        if type(scratch) is not int or not 0 <= scratch < 1 << 64 or type(writes) is not int or writes < 0:
            raise ValueError(f"MMIO test device state is malformed: {state!r:.80}")
        self.scratch, self.writes = scratch, writes

    @classmethod
    def from_state(cls, state: dict) -> MmioTestDevice:
        """A device in the state :meth:`state` recorded."""
        device = cls()
        device.load_state(state)
        return device
