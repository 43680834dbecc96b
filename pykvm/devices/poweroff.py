"""The Bochs/QEMU "Shutdown" port (0x8900).

Bochs, and QEMU before ACPI, gave BIOSes and test programs a way to switch the machine off
without ACPI: write the ASCII bytes of ``Shutdown`` to port 0x8900, one ``outb`` each. When the
eight bytes have arrived in order, the VMM powers off (``on_poweroff()``). A byte that breaks the
sequence discards the partial match, except that an ``S`` begins a new one, so ``SShutdown``
still counts. Wider writes count their low byte. Reads return all ones, as from an empty port.

Attach at :data:`PORT` with length 1. A lock keeps the match position consistent when several
vCPUs write; ``on_poweroff`` is called after the lock is released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .bus import all_ones

PORT = 0x8900
MAGIC = b"Shutdown"


class PowerOff:
    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._matched = 0   # how many bytes of MAGIC have arrived in sequence
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> int:
        """All ones of ``size`` bytes."""
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Match the byte against "Shutdown"; the last letter powers off, a wrong one restarts the match."""
        byte = value & 0xFF
        with self._lock:
            if byte == MAGIC[self._matched]:
                self._matched += 1
            else:
                self._matched = 1 if byte == MAGIC[0] else 0
            done = self._matched == len(MAGIC)
            if done:
                self._matched = 0
        if done:
            self._on_poweroff()

    def state(self) -> dict:
        """How many bytes of ``Shutdown`` have arrived in sequence, as plain data (for a snapshot)."""
        with self._lock:
            return {"matched": self._matched}

    def load_state(self, state: dict) -> None:
        """Take the match position from :meth:`state`'s record; ValueError if it is malformed."""
        matched = state.get("matched") if isinstance(state, dict) else None
        if type(matched) is not int or not 0 <= matched < len(MAGIC):
            raise ValueError(f"shutdown-port state is malformed: matched {matched!r}")
        with self._lock:
            self._matched = matched

    @classmethod
    def from_state(cls, state: dict, on_poweroff: Callable[[], None]) -> PowerOff:
        """A port in the state :meth:`state` recorded, with its host hook."""
        device = cls(on_poweroff)
        device.load_state(state)
        return device
