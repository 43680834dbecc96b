"""A tiny MMIO device for tests and the exit-latency benchmark.

Registers (little-endian, guest-physical base 0xd0000000 in the MMIO hole):

=======  ======  =====================================================================
offset   access  meaning
=======  ======  =====================================================================
0x00     R       ID: 0x4f494d4d, the ASCII bytes "MMIO"
0x08     R/W     scratch: reads back the last value written at 0x08, zero-extended
0x10     R       the bitwise NOT of scratch, at the width of the access
=======  ======  =====================================================================

Reads are byte lanes of these registers (any offset, any width); beyond 0x18 they read zero.
Writes other than to scratch are ignored.
"""

from __future__ import annotations

BASE = 0xD000_0000
SIZE = 0x1000
ID = 0x4F49_4D4D
_MASK = [(1 << (8 * n)) - 1 for n in range(9)]   # size in bytes (1..8, as the bus delivers) -> value mask


class MmioTestDevice:
    """The registers above as byte lanes: a read of any width at any offset returns those bytes
    (so a bus that splits a 6-byte ``lfs``/``lds`` read into 4 + 2 reads back what was written)."""

    def __init__(self) -> None:
        self.scratch = 0
        self.writes = 0

    def _bytes(self) -> bytes:
        return (ID.to_bytes(8, "little") + self.scratch.to_bytes(8, "little")
                + (~self.scratch & (1 << 64) - 1).to_bytes(8, "little"))

    def read(self, offset: int, size: int) -> int:
        """``size`` bytes from ``offset``, little-endian; zero beyond the registers."""
        if offset == 0x08:     # the benchmark's register: no byte shuffling
            return self.scratch & _MASK[size]
        return int.from_bytes(self._bytes()[offset:offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """At 0x08: scratch = value (zero-extended); at 0x09-0x0f: just those bytes of scratch."""
        if offset == 0x08:     # the benchmark's register: one mask, no call (an exit's hot path)
            self.scratch = value & _MASK[size]
            self.writes += 1
        elif 0x08 < offset < 0x10:
            shift, mask = 8 * (offset - 8), (1 << (8 * min(size, 0x10 - offset))) - 1
            self.scratch = (self.scratch & ~(mask << shift)) | ((value & mask) << shift)
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
