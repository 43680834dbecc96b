"""PCI configuration mechanism #1 with an empty bus: the 0xCF8/0xCFC port pair.

The PCI Local Bus Specification's configuration mechanism #1 has two 32-bit registers:

* CONFIG_ADDRESS at 0xCF8. Bit 31 enables configuration cycles; bits 23-16 bus, 15-11 device,
  10-8 function, 7-2 the dword register. Bits 30-24 are reserved and bits 1-0 are fixed; both
  read back as 0, the rest as written. Only 32-bit accesses at 0xCF8 reach it: byte and word
  accesses to 0xCF8-0xCFB pass through as ordinary I/O (guests rely on that, e.g. Linux's
  probe writes a byte to 0xCFB), and nothing else answers there, so they read all ones.
* CONFIG_DATA at 0xCFC-0xCFF: with bit 31 set, an access of any size here reads or writes the
  addressed register of the addressed function. pykvm has no PCI functions, so every
  configuration read ends in a master abort and returns all ones, and writes vanish. With bit 31
  clear the access is ordinary I/O to an empty port: also all ones. Either way: all ones.

A guest therefore finds mechanism #1 present (the address register reads back) and every slot
empty (vendor ID 0xFFFF), which is how an OS learns "no PCI devices" without taking a fault.

Attach at :data:`BASE` with length 8. No lock is needed: the only state is one integer,
replaced whole.
"""

from __future__ import annotations

from .bus import all_ones

BASE = 0xCF8
LENGTH = 8
DATA_OFFSET = 4   # CONFIG_DATA at 0xCFC

ENABLE = 1 << 31
ADDRESS_MASK = ENABLE | 0x00FF_FFFC   # reserved bits 30-24 and bits 1-0 read as 0


def config_address(bus: int, device: int, function: int, register: int) -> int:
    """The CONFIG_ADDRESS value that selects one dword of configuration space."""
    return ENABLE | bus << 16 | device << 11 | function << 8 | (register & 0xFC)


class PciConfigIo:
    def __init__(self) -> None:
        self._address = 0

    @property
    def address(self) -> int:
        """The last CONFIG_ADDRESS written (port 0xCF8)."""
        return self._address

    def read(self, offset: int, size: int) -> int:
        """A 32-bit read of CONFIG_ADDRESS returns it; anything else all ones (no devices)."""
        if offset == 0 and size == 4:
            return self._address
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        """A 32-bit write sets CONFIG_ADDRESS; other widths are ignored."""
        if offset == 0 and size == 4:
            self._address = value & ADDRESS_MASK

    def state(self) -> dict:
        """CONFIG_ADDRESS as plain data (for a snapshot)."""
        return {"address": self._address}

    def load_state(self, state: dict) -> None:
        """Take CONFIG_ADDRESS from :meth:`state`'s record; ValueError if it is malformed."""
        address = state.get("address") if isinstance(state, dict) else None
        if type(address) is not int or address & ~ADDRESS_MASK:
            raise ValueError(f"PCI configuration state is malformed: address {address!r}")
        self._address = address

    @classmethod
    def from_state(cls, state: dict) -> PciConfigIo:
        """The port pair in the state :meth:`state` recorded."""
        device = cls()
        device.load_state(state)
        return device
